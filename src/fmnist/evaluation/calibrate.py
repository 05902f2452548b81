"""Honest confidence: temperature scaling and an 'unsure' threshold, both fitted on validation.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted to minimise
the validation NLL: the ranking (and so accuracy) is unchanged, the probabilities become
calibrated. The unsure threshold is the calibrated top probability at which the model's local
accuracy on validation falls to 50%: under it, the answer is more likely wrong than right.
Both go into the checkpoint under "calibration"; predict.py reads them. The test set is used
only to report the expected calibration error before and after.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from fmnist import data
from fmnist.models import checkpoint
from fmnist.utils.atomic import write_json
from fmnist.data import split_seed
from fmnist.inference.forward import predict_logits

log = logging.getLogger(__name__)

MIN_BELOW = 20   # the threshold needs at least this many validation predictions under it


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """T minimising the NLL of softmax(logits / T): a coarse log grid, then golden-section."""
    logits, labels = logits.double(), labels.long()

    def nll(t: float) -> float:
        return F.cross_entropy(logits / t, labels).item()

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
    i = int(np.argmin([nll(t) for t in grid]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (np.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| averaged over equal-width bins."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def choose_threshold(conf: np.ndarray, correct: np.ndarray) -> float:
    """The confidence where the model's local accuracy crosses 50%: scanning predictions by
    confidence, the highest one whose neighbourhood (a window of ~2% of them, at least
    MIN_BELOW) is right at most half the time. Below it, an answer is more likely wrong."""
    order = np.argsort(conf)
    c, ok = conf[order], correct[order].astype(np.float64)
    n = len(c)
    if n < MIN_BELOW:
        return 0.5
    w = max(MIN_BELOW, n // 50)
    local = np.convolve(ok, np.ones(w) / w, mode="valid")      # accuracy of c[i : i + w]
    low = np.flatnonzero(local <= 0.5)
    if not len(low):
        return float(c[0])                                      # never mostly wrong: flag nothing
    return float(c[low[-1] + w // 2])                           # the window's middle


def validation_indices(ckpt: dict, labels: torch.Tensor, path) -> torch.Tensor:
    """The checkpoint's own validation split of the training set (`labels`: its labels)."""
    cfg = ckpt.get("train_config") or {}
    val_fraction, seed = cfg.get("val_fraction", 0.1), split_seed(cfg)
    if not val_fraction:
        raise ValueError(f"{path}: trained without a validation split (--val-fraction 0); "
                         f"nothing to calibrate on")
    return data.stratified_split(labels, val_fraction, seed)[1]


def fit(v_logits: torch.Tensor, v_labels: torch.Tensor) -> dict:
    """Temperature and unsure threshold for these validation logits, with the NLL and ECE
    before and after."""
    t = fit_temperature(v_logits, v_labels)
    v_probs = torch.softmax(v_logits / t, 1).numpy()
    thr = choose_threshold(v_probs.max(1), v_probs.argmax(1) == v_labels.numpy())
    return {"temperature": t, "threshold": thr, "fitted_on": f"validation split ({len(v_labels)} images)",
            "val_nll_before": F.cross_entropy(v_logits, v_labels).item(),
            "val_nll_after": F.cross_entropy(v_logits / t, v_labels).item(),
            "val_ece_before": ece(torch.softmax(v_logits, 1).numpy(), v_labels.numpy()),
            "val_ece_after": ece(v_probs, v_labels.numpy())}


def calibrate(path, dataset=None, device: str = "cpu", val_idx: torch.Tensor | None = None,
              report_test: bool = True, val_logits: torch.Tensor | None = None,
              test_logits: torch.Tensor | None = None) -> dict:
    """Fit T and the threshold on the checkpoint's own validation split (or the training set
    indices val_idx); write them into the checkpoint and calibration.json beside it. The test
    set only reports ECE before and after (report_test). val_logits / test_logits: the model's
    fp32 logits on those images where the caller already has them (fmnist ensemble), so they
    are not computed twice."""
    path = checkpoint.resolve_path(path)
    ckpt = checkpoint.load(path, check_calibration=False)  # refitted here: a damaged one is repaired
    ds = dataset or data.load((ckpt.get("train_config") or {}).get("data_dir"))
    if val_idx is None:
        val_idx = validation_indices(ckpt, ds.train_labels, path)
    tta, shift = checkpoint.trained_with_tta(ckpt), checkpoint.trained_with_shift_tta(ckpt)
    model = None   # built on first use: a caller that passes both splits' logits needs none

    def logits_of(images):
        nonlocal model
        if model is None:
            model = checkpoint.build_model(ckpt, device)
        return predict_logits(model, images.to(device), tta_flip=tta, amp="off", tta_shift=shift).cpu()

    v_labels = ds.train_labels[val_idx]
    v_logits = logits_of(ds.train_images[val_idx]) if val_logits is None else val_logits.float().cpu()
    res = fit(v_logits, v_labels)
    t, thr = res["temperature"], res["threshold"]
    if report_test:
        test = ds.first_test((ckpt.get("train_config") or {}).get("test_subset"))   # as evaluate_run measures
        te_labels = test.test_labels.numpy()
        te_logits = logits_of(test.test_images) if test_logits is None else test_logits.float().cpu()
        p1, pt = torch.softmax(te_logits, 1).numpy(), torch.softmax(te_logits / t, 1).numpy()
        sure = pt.max(1) >= thr
        right = pt.argmax(1) == te_labels
        res.update({"test_ece_before": ece(p1, te_labels), "test_ece_after": ece(pt, te_labels),
                    "test_unsure_fraction": float(1 - sure.mean()),
                    "test_acc_when_sure": float(right[sure].mean()) if sure.any() else None,
                    "test_acc_when_unsure": float(right[~sure].mean()) if (~sure).any() else None})
    ckpt["calibration"] = res
    checkpoint.save(ckpt, path)
    if path.name in ("best.pt", "last.pt"):   # a run directory keeps the figures beside the weights
        write_json(path.parent / "calibration.json", res)
    log.info("calibrated %s: T=%.3f, unsure below %.2f; validation ECE %.4f -> %.4f", path, t, thr,
             res["val_ece_before"], res["val_ece_after"])
    return res
