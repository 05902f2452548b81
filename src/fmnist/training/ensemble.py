"""`fmnist ensemble`: several trained runs of one recipe (different seeds) averaged into one
checkpoint, which predict, serve, evaluate and export use like any other.

Why: three seeds of the photo recipe get 73.0 to 79.5 % of the held-out real photos
(docs/results.md), and averaging seeds removes much of that luck. What it costs: one
forward pass per member, so inference takes n times as long.

The members must share an architecture and a validation split (`fmnist train --split-seed`), so
that temperature scaling and the unsure threshold are refitted on images none of them trained on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fmnist import data
from fmnist.models import checkpoint
from fmnist.utils.atomic import write_json
from fmnist.evaluation.calibrate import calibrate
from fmnist.data import split_seed
from fmnist.evaluation.evaluate import evaluate_checkpoint
from fmnist.inference.forward import predict_logits
from fmnist.models.networks import ENSEMBLE

log = logging.getLogger(__name__)


class EnsembleError(ValueError):
    pass


def _member(path) -> tuple[Path, dict]:
    p = checkpoint.resolve_path(path)
    ckpt = checkpoint.load(p)
    if ckpt["model"] == ENSEMBLE:
        raise EnsembleError(f"{p} is already an ensemble; give the runs it was made from")
    return p, ckpt


def check_members(members: list[tuple[Path, dict]], calibrated: bool = True) -> None:
    """EnsembleError naming the first member that does not fit with the first."""
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 runs, got {len(members)}")
    (p0, c0), paths = members[0], [p for p, _ in members]
    dup = {p for p in paths if paths.count(p) > 1}
    if dup:
        raise EnsembleError(f"{sorted(map(str, dup))[0]} is given more than once; give runs of different seeds")
    t0 = c0.get("train_config", {})
    for p, c in members[1:]:
        t = c.get("train_config", {})
        for what, a, b in (("architecture", c0["model"], c["model"]),
                           ("model_config", c0["model_config"], c["model_config"]),
                           ("class names", c0["class_names"], c["class_names"]),
                           ("normalisation", "mean {:g}, std {:g}".format(*checkpoint.normalization(c0)),
                            "mean {:g}, std {:g}".format(*checkpoint.normalization(c))),
                           ("flip TTA", bool(t0.get("tta_flip")), bool(t.get("tta_flip"))),
                           ("shift TTA", checkpoint.trained_with_shift_tta(c0), checkpoint.trained_with_shift_tta(c))):
            if a != b:
                raise EnsembleError(f"{p}: its {what} ({b}) differs from {p0}'s ({a}); "
                                    f"an ensemble's members are runs of one recipe")
        if calibrated and (split_seed(t), t.get("val_fraction")) != (split_seed(t0), t0.get("val_fraction")):
            raise EnsembleError(
                f"{p}: its validation split (seed {split_seed(t)}, fraction {t.get('val_fraction')}) differs from "
                f"{p0}'s (seed {split_seed(t0)}, fraction {t0.get('val_fraction')}), so each member trained on "
                f"images the others validate on; train the members with one --split-seed")


def make(paths: list, out_dir, calibrated: bool = True, dataset=None) -> dict:
    """Writes OUT_DIR/best.pt (the ensemble), its test report (metrics.json, report.md) and, with
    `calibrated`, its temperature and unsure threshold fitted on the members' shared validation
    split. -> {checkpoint, val_acc, test_acc, calibration, members}. Uncalibrated (members of any
    splits; no val_acc or calibration) is for comparing accuracy only."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EnsembleError(f"--out {out} is a file; give a directory for the ensemble (it is created)")
    members = [_member(p) for p in paths]
    check_members(members, calibrated)
    c0 = members[0][1]
    state = {f"members.{i}.{k}": v for i, (_, c) in enumerate(members) for k, v in c["state_dict"].items()}
    tc = {**c0.get("train_config", {}), "split_seed": split_seed(c0.get("train_config", {}))}
    info = [{"checkpoint": str(p), "seed": c.get("train_config", {}).get("seed"), "epoch": c.get("epoch"),
             "val_acc": c.get("metrics", {}).get("val_acc"), "provenance": c.get("provenance")} for p, c in members]
    ckpt = checkpoint.make(ENSEMBLE, {"member": c0["model"], "member_config": c0["model_config"], "n": len(members)},
                           state, metrics={}, epoch=[m["epoch"] for m in info], train_config=tc, members=info)
    ckpt["class_names"] = list(c0["class_names"])
    ckpt["normalization"] = c0.get("normalization", ckpt["normalization"])   # the members' own, as they were trained
    path = out / "best.pt"
    model = checkpoint.build_model(ckpt, source=path)   # the weights fit: refuse before anything is written
    ds = dataset or data.load(tc.get("data_dir"))
    # Each split goes through the members once (fp32, as calibrate computes them): the report and
    # the calibration share the test logits, val_acc and the calibration the validation ones.
    tta, shift = bool(tc.get("tta_flip")), checkpoint.trained_with_shift_tta(ckpt)
    if calibrated:
        _, val_idx = data.stratified_split(ds.train_labels, tc.get("val_fraction", 0.1), tc["split_seed"])
        val_logits = predict_logits(model, ds.train_images[val_idx], tta_flip=tta, tta_shift=shift)
        ckpt["metrics"] = {"val_acc": (val_logits.argmax(1) == ds.train_labels[val_idx]).float().mean().item()}
    # The test images the members' own figures were measured on (evaluate_run's rule): with a
    # --test-subset, the ensemble's figure is comparable to theirs only on the same first images.
    subsets = [c.get("train_config", {}).get("test_subset") for _, c in members]
    ckpt["train_config"]["test_subset"] = min(subsets) if all(subsets) else None
    ds = ds.first_test(ckpt["train_config"]["test_subset"])
    test_logits = predict_logits(model, ds.test_images, tta_flip=tta, tta_shift=shift)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(ckpt, path)
    m = evaluate_checkpoint(path, device="cpu", dataset=ds, out_dir=out, logits=test_logits)
    cal = (calibrate(path, dataset=ds, val_idx=val_idx, val_logits=val_logits, test_logits=test_logits)
           if calibrated else None)
    # What scripts/ship_model.py reads beside a run's best.pt: the first member's environment and
    # the members' training time together.
    runs = [p.parent for p, _ in members]
    seconds = [json.loads((r / "train_summary.json").read_text())["train_seconds"]
               for r in runs if (r / "train_summary.json").is_file()]
    write_json(out / "train_summary.json", {"train_seconds": sum(seconds) if len(seconds) == len(runs) else None,
                                            "members": len(runs)})
    if (runs[0] / "environment.json").is_file():
        write_json(out / "environment.json", json.loads((runs[0] / "environment.json").read_text()))
    write_json(out / "members.json", info)
    log.info("ensemble of %d runs -> %s: test accuracy %.2f%%", len(members), path, m["test_acc"] * 100)
    return {"checkpoint": str(path), "val_acc": ckpt["metrics"].get("val_acc"), "test_acc": m["test_acc"],
            "calibration": cal, "members": info}
