"""Training: data as tensors on the device, batches by index, one function per concern.

Runs single-process, or under torchrun as DistributedDataParallel (see distributed.py):
every rank draws the same permutation per epoch and takes its slice of each global batch,
so N ranks make exactly the optimizer steps one process would with the same global batch.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fmnist.training import augment as aug
from fmnist import data
from fmnist.models import checkpoint
from fmnist.utils.atomic import write_json, write_text
from fmnist.classes import MEAN, STD
from fmnist.data import split_seed
from fmnist.training.config import TrainConfig, from_dict, validate
from fmnist.training.distributed import DistInfo
from fmnist.inference.forward import autocast, predict_logits, to_input
from fmnist.models.networks import count_parameters, create_model, fit_whitening, model_config
from fmnist.utils.runinfo import environment, pick_device

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- pieces

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate as a pure function of the step, so resuming needs only the step count."""
    if cfg.schedule == "constant":
        return cfg.lr
    warm = max(1, int(cfg.warmup * total))
    if step < warm:  # linear warm-up from lr/10 (onecycle's usual start) or 0 (cosine)
        lo = cfg.lr / 10 if cfg.schedule == "onecycle" else 0.0
        return lo + (cfg.lr - lo) * step / warm
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "onecycle":  # linear decay to 0: simplest anneal that measured as well as cosine
        return cfg.lr * (1 - t)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def resumed_epochs(saved: TrainConfig, asked: int, run_dir: Path) -> int:
    """How many epochs a resumed run has in all. 0 (not asked) = as planned. A one-cycle or cosine
    schedule is laid out over the planned steps (lr_at), so a different count would change the
    learning rate of every step still to come: refused. A constant-lr run may be extended."""
    if not asked or asked == saved.epochs:
        return saved.epochs
    if saved.schedule != "constant":
        raise ValueError(f"{run_dir} is planned for {saved.epochs} epochs of a {saved.schedule} learning-rate "
                         f"schedule; --resume finishes it as planned, so leave out --epochs (or start a new "
                         f"run with --epochs {asked})")
    if asked < saved.epochs:
        raise ValueError(f"{run_dir} is planned for {saved.epochs} epochs; --resume --epochs may extend a "
                         f"constant-lr run, not shorten it (its best.pt is already saved after each epoch)")
    return asked


def optimizer_options(cfg: TrainConfig, device: torch.device) -> dict:
    """Implementation switches for the optimizer on `device`: on CUDA, Adam(W)'s fused kernel
    (one launch per step for all parameters instead of a few per tensor, so a small model's
    step is not bound by launches). Elsewhere torch's default."""
    return {"fused": True} if device.type == "cuda" and cfg.optimizer in ("adam", "adamw") else {}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device | None = None
                   ) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters: decaying them only hurts (timm's default).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opts = optimizer_options(cfg, device or next(model.parameters()).device)
    if cfg.optimizer == "adam":
        # eps 1e-7 is Keras's default (torch's is 1e-8); kept for the faithful `seed` recipe.
        return torch.optim.Adam(groups, lr=cfg.lr, eps=1e-7, **opts)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **opts)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **opts)


class EMA:
    """Exponential moving average of weights (buffers copied), evaluated in place of the model."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.buffers = list(self.model.buffers())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int):
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are not worth keeping
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)
        if self.buffers:  # BatchNorm statistics: one launch, not one per buffer
            torch._foreach_copy_(self.buffers, list(model.buffers()))


class Lookahead:
    """Lookahead (Zhang et al. 2019) around any optimizer: every k steps the slow weights move
    halfway to where the optimizer took the weights, and training goes on from the slow ones.
    Short runs gain from it (docs/decisions.md): the steps of a high learning
    rate are averaged rather than taken at face value. Buffers (BatchNorm statistics) are left
    to the model."""

    ALPHA = 0.5  # the paper's default; its results hold over 0.5-0.8

    def __init__(self, model: torch.nn.Module, k: int):
        self.k = k
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.slow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.k == 0:
            torch._foreach_lerp_(self.slow, [p.detach() for p in self.params], self.ALPHA)
            torch._foreach_copy_(self.params, self.slow)

    def state_dict(self) -> list[torch.Tensor]:
        return self.slow

    @torch.no_grad()
    def load_state_dict(self, slow: list[torch.Tensor]) -> None:
        torch._foreach_copy_(self.slow, [t.to(s.device) for s, t in zip(self.slow, slow)])


def evaluate_split(model, images, labels, cfg: TrainConfig, amp: str | None = None, shift: bool = False) -> dict:
    logits = predict_logits(model, images, cfg.eval_batch_size, cfg.tta_flip, cfg.channels_last,
                            cfg.amp if amp is None else amp, tta_shift=shift and cfg.tta_shift)
    return {"loss": F.cross_entropy(logits, labels).item(),
            "acc": (logits.argmax(1) == labels).float().mean().item()}


def train_one_epoch(model, opt, ema, images, labels, cfg: TrainConfig, *, epoch: int, step: int,
                    total_steps: int, gen: dict, dist: DistInfo, lookahead: Lookahead | None = None,
                    teacher=None) -> tuple[dict, int]:
    """One pass over `images` (uint8, on device). Returns (metrics, global step after). With a
    teacher (--distill), the loss also pulls towards its probabilities on the same batch."""
    model.train()
    n = len(images)
    # Same permutation on every rank (shared seed); each rank takes its slice of a global batch.
    perm = torch.randperm(n, generator=gen["perm"]).to(images.device)
    steps = n // cfg.batch_size + (1 if n % cfg.batch_size >= 2 * dist.world_size else 0)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    seen = 0
    # A progress bar where INFO messages show (the CLI without --quiet) and stderr is a terminal.
    show = dist.is_main and log.isEnabledFor(logging.INFO)
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None if show else True,
               unit="batch", dynamic_ncols=True, file=sys.stderr)
    # Nothing in a step waits for the device (no .item(), no data-dependent branch), so a GPU
    # runs ahead of the host; only a progress bar on a terminal reads the running figures.
    for s in bar:
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size][dist.rank::dist.world_size]
        x = to_input(images[idx], cfg.channels_last)
        y = labels[idx]
        x = aug.augment(x, cfg.augment, gen["aug"], y)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        with autocast(x.device, cfg.amp):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
        loss = photo_loss(logits.float(), y, cfg)
        if teacher is not None:
            w = cfg.distill_weight
            loss = (1 - w) * loss + w * distill_loss(logits.float(), t_logits.float(), cfg.distill_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if lookahead is not None:
            lookahead.update(step)
        if ema is not None:
            ema.update(dist.unwrap(model), step)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)  # outlier rows (y = -1) count as wrong: accuracy reads a little low with outliers
        if not bar.disable and (s % 20 == 0 or s == steps - 1):  # .item() syncs the device: not every step
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}")
    stats = dist.all_reduce_sum(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=images.device)]))
    return {"loss": (stats[0] / stats[2]).item(), "acc": (stats[1] / stats[2]).item()}, step


def photo_loss(logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the classes; rows labelled OUTLIER (photos of no clothing) are pulled
    towards the uniform distribution instead (outlier exposure, Hendrycks et al. 2019), so the
    model learns to be unsure of things that are not clothing rather than call them a Bag."""
    ce = F.cross_entropy(logits, y.clamp(min=0), label_smoothing=cfg.label_smoothing, reduction="none")
    uniform = -logits.log_softmax(1).mean(1)
    return torch.where(y >= 0, ce, cfg.outlier_weight * uniform).mean()


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) at temperature t, times t^2 so that its gradients keep their
    size as t changes (Hinton et al. 2015); 0 when the two agree."""
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def load_teacher(path: str, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The --distill teacher, frozen and in eval mode (its BatchNorm and dropout as at inference)."""
    teacher, _ = checkpoint.load_model(path, device)
    teacher.requires_grad_(False)
    return (teacher.to(memory_format=torch.channels_last) if channels_last else teacher).eval()


TRAIN_SPLITS = ("dev", "train")   # real-photo splits that may be trained on; "heldout" never
OUTLIER = -1                      # training label of a "none" photo (no clothing)


# --real-conversions: the robust conversion's seed thresholds (multiples of the border's own colour
# spread) a photo is converted with; the first is the default, the one predict uses.
REAL_SEED_K = (1.0, 0.6, 2.0)


def real_training_images(roots: str, conversions: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The dev and train splits of real-photo folders (comma-separated), converted as predict
    does, and with `conversions` > 1 also with the other seed thresholds of REAL_SEED_K, one
    block per conversion: (N * conversions, 28, 28) uint8 and labels. Held-out photos are never
    read, so they stay a fair test."""
    from fmnist.photos import realphotos
    from fmnist.classes import CLASS_NAMES
    from fmnist.photos.preprocess import preprocess
    from fmnist.photos.robust import RobustOptions

    photos = [p for p in realphotos.read_manifests(roots) if p.split in TRAIN_SPLITS]
    if not any(p.label in CLASS_NAMES for p in photos):
        raise ValueError(f"{roots}: no dev- or train-split photos of a class to train on")
    x = torch.from_numpy(np.stack([preprocess(p.path, options=RobustOptions(seed_k=k)).image
                                   for k in REAL_SEED_K[:conversions] for p in photos]))
    y = torch.tensor([CLASS_NAMES.index(p.label) if p.label in CLASS_NAMES else OUTLIER for p in photos])
    return x, y.repeat(conversions)


def real_composite_images(roots: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` composites (fmnist.training.composites) of each dev- or train-split clothing photo of
    `roots`, on the grounds of the others: (M, 28, 28) uint8 and their labels."""
    from fmnist.classes import CLASS_NAMES
    from fmnist.photos import realphotos
    from fmnist.photos.preprocess import load_rgb
    from fmnist.photos.robust import WORK
    from fmnist.training import composites

    photos = [p for p in realphotos.read_manifests(roots) if p.split in TRAIN_SPLITS and p.label in CLASS_NAMES]
    rgb = [np.asarray(load_rgb(p.path, work=WORK)) for p in photos]
    x, src = composites.make(rgb, [p.contributor or str(p.path) for p in photos], n, seed)
    y = torch.tensor([CLASS_NAMES.index(photos[i].label) for i in src], dtype=torch.long)
    return torch.from_numpy(x), y


BALANCE_CAP = 4.0  # a class of a handful of photos is not repeated past this many times its share


def balanced_repeats(labels: torch.Tensor, repeat: int) -> torch.Tensor:
    """Per-photo repeats for --real-balance: `repeat` scaled by (mean count over the classes
    present) / (own class's count), capped at BALANCE_CAP, at least 1; OUTLIER photos keep
    `repeat`. Every class's photos then appear about equally often in all, and the real photos'
    share of an epoch stays about what it was."""
    clothing = labels >= 0
    counts = torch.bincount(labels[clothing], minlength=10).double()
    weight = torch.ones(len(labels), dtype=torch.float64)
    if clothing.any():
        target = counts[counts > 0].mean()
        weight[clothing] = (target / counts[labels[clothing]]).clamp(max=BALANCE_CAP)
    return (weight * repeat).round().clamp(min=1).long()


def shared_with_composites(labels: torch.Tensor, reps: torch.Tensor, n_composites: int, repeat: int,
                           per_photo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(repeats of the photos, repeats of their composites) for --real-composites: a clothing photo's
    repeats are shared with its `per_photo` composites, so they do not raise the real photos' share of
    an epoch; photos of no clothing (OUTLIER) keep theirs."""
    share = 1 + per_photo
    photos = torch.where(labels >= 0, (reps / share).round().clamp(min=1).long(), reps)
    return photos, torch.full((n_composites,), max(1, round(repeat / share)), dtype=torch.long)


# ---------------------------------------------------------------------------- run directory

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "eval_seconds",
                  "elapsed", "test_acc"]


def write_history(run_dir: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in HISTORY_FIELDS})
    write_text(run_dir / "history.csv", buf.getvalue())


def new_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.out_dir) / f"{stamp}-{cfg.preset}"
    run_dir, i = base, 1
    while run_dir.exists():
        i += 1
        run_dir = base.with_name(f"{base.name}-{i}")
    run_dir.mkdir(parents=True)
    return run_dir


def epoch_generators(seed: int, epoch: int, rank: int, device: torch.device) -> dict:
    """Every random stream of an epoch is a function of (seed, epoch, rank), so a run resumed
    at an epoch boundary replays exactly what an uninterrupted run does, at any world size,
    with no generator state in the checkpoint."""
    torch.manual_seed(seed * 1_000_003 + epoch * 1009 + rank)  # dropout: its own stream per rank
    aug_dev = device if device.type == "cuda" else torch.device("cpu")
    return {"perm": torch.Generator().manual_seed(seed * 7919 + epoch),  # the same on every rank
            "aug": torch.Generator(device=aug_dev).manual_seed(seed * 104_729 + epoch * 1013 + rank + 1)}


# ---------------------------------------------------------------------------- main loop

def _resume_config(cfg: TrainConfig) -> tuple[TrainConfig, dict | None, Path | None]:
    """cfg.resume: the run's own config (to the end of its own schedule) and its last.pt."""
    if not cfg.resume:
        return cfg, None, None
    run_dir = Path(cfg.resume)
    if run_dir.is_file():
        run_dir = run_dir.parent
    if not (run_dir / "last.pt").exists():
        raise checkpoint.CheckpointError(f"{run_dir}: no last.pt to resume from (is this a run directory "
                                         f"of `fmnist train`?)")
    ckpt = checkpoint.load(run_dir / "last.pt")
    if "optimizer" not in ckpt:
        raise checkpoint.CheckpointError(f"{run_dir / 'last.pt'}: holds no training state to resume")
    mean, std = checkpoint.normalization(ckpt)
    if (mean, std) != (MEAN, STD):   # the rest of the run would see other inputs than its start
        raise checkpoint.CheckpointError(
            f"{run_dir / 'last.pt'}: trained on inputs normalised with mean {mean:g} and std {std:g}, where this "
            f"version of fmnist uses {MEAN:g} and {STD:g}; finish it with the version of fmnist that started it, "
            f"or start a new run")
    # A run saved before Lookahead existed ran without it (today's default would resume it with).
    saved = from_dict({"lookahead": 0, **ckpt["train_config"]})
    # Everything comes from the run being continued, which ends where it was planned to.
    saved.epochs = resumed_epochs(saved, cfg.epochs, run_dir)
    saved.resume = str(run_dir)
    saved.device = cfg.device if cfg.device != "auto" else saved.device
    saved.threads = cfg.threads or saved.threads  # same kernels as before, unless told otherwise
    return saved, ckpt, run_dir


def _splits(cfg: TrainConfig, ds, device: torch.device, dist: DistInfo) -> dict:
    """Training images (plus real photos), validation and (reporting only) test, on the device."""
    train_idx, val_idx = data.stratified_split(ds.train_labels, cfg.val_fraction, split_seed(cfg))
    if not len(val_idx):  # a fraction that rounds to 0 images per class: NaN validation figures
        raise ValueError(f"--val-fraction {cfg.val_fraction} holds out no validation images "
                         f"(~{len(ds.train_labels) // 10} per class); give at least 0.001")
    if cfg.subset:
        # A seeded random subset of the split (near-stratified at these sizes), and a validation
        # set a fifth its size (at least 100 images).
        g = torch.Generator().manual_seed(cfg.seed)
        train_idx = train_idx[torch.randperm(len(train_idx), generator=g)[:cfg.subset]]
        val_idx = val_idx[torch.randperm(len(val_idx), generator=g)[:max(cfg.subset // 5, 100)]]
    tr_x, tr_y = ds.train_images[train_idx].to(device), ds.train_labels[train_idx].to(device)
    if cfg.real_photos:
        rx, ry = real_training_images(cfg.real_photos, cfg.real_conversions)
        n_photos, n_none = len(rx) // cfg.real_conversions, int((ry == OUTLIER).sum()) // cfg.real_conversions
        # Each conversion real_repeat/N times (at least once), so more conversions do not raise
        # the real photos' share of an epoch.
        repeat = max(1, round(cfg.real_repeat / cfg.real_conversions))
        if cfg.real_balance or cfg.real_composites:
            reps = balanced_repeats(ry, repeat) if cfg.real_balance else torch.full((len(ry),), repeat)
            if cfg.real_composites:
                cx, cy = real_composite_images(cfg.real_photos, cfg.real_composites, cfg.seed)
                reps = torch.cat(shared_with_composites(ry, reps, len(cy), repeat, cfg.real_composites))
                rx, ry = torch.cat([rx, cx]), torch.cat([ry, cy])
                if dist.is_main:
                    log.info("with %d composites of the clothing photos on other contributors' grounds", len(cx))
            reps = reps.to(device)
            tr_x = torch.cat([tr_x, rx.to(device).repeat_interleave(reps, dim=0)])
            tr_y = torch.cat([tr_y, ry.to(device).repeat_interleave(reps)])
        else:
            tr_x = torch.cat([tr_x, rx.to(device).repeat(repeat, 1, 1)])
            tr_y = torch.cat([tr_y, ry.to(device).repeat(repeat)])
        if dist.is_main:
            log.info("training with %d real photos (dev/train splits of %s; %d of no clothing) x %d conversion(s)"
                     " x %d%s%s", n_photos, cfg.real_photos, n_none, cfg.real_conversions, repeat,
                     " scaled by class rarity (--real-balance)" if cfg.real_balance else "",
                     f", shared with {cfg.real_composites} composite(s) each" if cfg.real_composites else "")
    test = (ds.test_images.to(device), ds.test_labels.to(device)) if cfg.report_test else (None, None)
    return {"train": (tr_x, tr_y), "val": (ds.train_images[val_idx].to(device), ds.train_labels[val_idx].to(device)),
            "test": test, "val_idx": val_idx}


def _build(cfg: TrainConfig, mcfg: dict, device: torch.device, dist: DistInfo, train_images: torch.Tensor):
    """-> (model, the module the steps call, optimizer, EMA or None, Lookahead or None)."""
    torch.manual_seed(cfg.seed)  # initial weights: the same on every rank (DDP also broadcasts them)
    model = create_model(cfg.model, mcfg).to(device)
    fit_whitening(model, train_images)  # the same images, so the same filters, on every rank
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.enabled:
        model = dist.wrap(model)
    opt = make_optimizer(model, cfg, device)
    ema = EMA(dist.unwrap(model), cfg.ema) if cfg.ema else None
    lookahead = Lookahead(dist.unwrap(model), cfg.lookahead) if cfg.lookahead else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
    fwd_model = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    return model, fwd_model, opt, ema, lookahead


def _restore_state(ckpt: dict, model, opt, ema, lookahead, cfg: TrainConfig, device: torch.device,
                   dist: DistInfo) -> dict:
    """Weights, optimizer, EMA, Lookahead and history from last.pt -> where the loop picks up."""
    dist.unwrap(model).load_state_dict(ckpt["state_dict"])
    opt.load_state_dict(ckpt["optimizer"])
    for group in opt.param_groups:  # saved groups carry the saving device's switches (fused on CUDA)
        group.update(optimizer_options(cfg, device) or {"fused": None})
    if ema is not None:
        ema.model.load_state_dict(ckpt["ema"])
    if lookahead is not None:
        lookahead.load_state_dict(ckpt["lookahead"])
    history = list(ckpt["history"])
    return {"history": history, "step": ckpt["step"], "start_epoch": ckpt["epoch"] + 1,
            "best_acc": max((h["val_acc"] for h in history), default=-1.0),
            "elapsed": history[-1]["elapsed"] if history else 0.0}


def best_to_beat(run_dir: Path, history_best: float) -> float:
    """The validation accuracy a resumed run must beat to replace best.pt: the larger of last.pt's
    history's best and the one best.pt records. On a GPU last.pt is written every few epochs and
    best.pt at every improvement, so best.pt can hold an epoch after last.pt; its replay is not
    bit-identical there, and a replayed epoch a little worse must not overwrite the better file."""
    path = run_dir / "best.pt"
    if not path.is_file():
        return history_best
    try:
        acc = checkpoint.load(path, check_calibration=False).get("metrics", {}).get("val_acc")
    except checkpoint.CheckpointError as e:
        log.warning(f"{e}; it is replaced by the first resumed epoch that beats last.pt's history")
        return history_best
    if isinstance(acc, (int, float)) and math.isfinite(acc) and acc > history_best:
        log.info(f"{path} holds validation accuracy {acc:.4f}, above last.pt's best {history_best:.4f}: "
                 f"it is replaced only by a better epoch")
        return float(acc)
    return history_best


# last.pt (weights, optimizer, EMA: ~280 MB for best-gpu's wrn) is written when the time since the
# last write is at least this many times what that write took, and after the final epoch: saving
# then costs at most about 1/SAVE_COST_RATIO of the run, and a crash loses at most that many
# save-times of work. On a CPU an epoch outlasts 10 saves, so every epoch is saved; on a GPU,
# best-gpu's ~2 s epochs would otherwise each spend what one write of it took on the 2-core VM in
# a dev timing, 0.2-0.7 s (plus the copy off the GPU).
SAVE_COST_RATIO = 10.0


def last_due(epoch: int, epochs: int, since_save: float, save_cost: float) -> bool:
    """Write last.pt after this epoch? (since_save: seconds since the last write; the first
    epoch is always written, as there is nothing to resume from before it)."""
    return epoch == epochs or since_save >= SAVE_COST_RATIO * save_cost


def _save_epoch(run_dir: Path, cfg: TrainConfig, mcfg: dict, cfg_dict: dict, model, eval_model, opt, ema,
                lookahead, va: dict, epoch: int, step: int, history: list, best_acc: float, dist: DistInfo,
                last: bool = True) -> tuple[bool, float]:
    """best.pt when validation improved, last.pt (the whole training state) when `last`, and
    history.csv, every epoch. -> (is best, best validation accuracy so far)."""
    meta = dict(metrics={"val_acc": va["acc"], "val_loss": va["loss"], "epoch": epoch},
                epoch=epoch, train_config=cfg_dict)
    is_best = not (va["acc"] <= best_acc)  # NaN (no validation split) counts as best
    if is_best:
        best_acc = va["acc"]
        checkpoint.save(checkpoint.make(cfg.model, mcfg, eval_model.state_dict(), **meta), run_dir / "best.pt")
    if last:
        checkpoint.save(checkpoint.make(
            cfg.model, mcfg, dist.unwrap(model).state_dict(), **meta,
            optimizer=opt.state_dict(), step=step, history=history,
            **({"ema": ema.model.state_dict()} if ema is not None else {}),
            **({"lookahead": lookahead.state_dict()} if lookahead is not None else {})), run_dir / "last.pt")
    write_history(run_dir, history)
    return is_best, best_acc


def _stopped(run_dir: Path, saved: int, interrupted: bool, new_run: bool) -> None:
    """A run that stops early says what --resume can continue. One stopped before its first
    last.pt holds only config.json and environment.json (and perhaps a best.pt, no use without
    a last.pt to resume): it can be neither resumed nor evaluated, and the command that made it
    recreates it, so it is removed rather than left in runs/ looking like a run."""
    if saved or not new_run:  # never remove a directory this call did not create
        if interrupted:
            log.warning(f"stopped: {saved} complete epoch(s) saved in {run_dir}; "
                        f"continue with `fmnist train --resume {run_dir}`")
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    log.warning(f"stopped before epoch 1 completed: nothing saved; removed {run_dir}")


def train(cfg: TrainConfig) -> Path | None:
    """Train per `cfg` (or continue cfg.resume) and calibrate best.pt on validation; returns the
    run directory (None on the other ranks of a distributed run). Progress goes to the
    `fmnist.training.train` logger; the test-set evaluation is the caller's (evaluate.evaluate_run)."""
    dist = DistInfo.from_env()
    cfg, resume_ckpt, run_dir = _resume_config(cfg)
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device) if not dist.enabled else dist.device(cfg.device)
    dist.init(device)
    # Before the data and the run directory: a teacher that cannot be read stops nothing half-made.
    teacher = load_teacher(cfg.distill, device, cfg.channels_last) if cfg.distill else None
    ds = data.load(cfg.data_dir)
    sp = _splits(cfg, ds, device, dist)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = sp["train"], sp["val"], sp["test"]

    mcfg = model_config(cfg.model, cfg.model_config)
    model, fwd_model, opt, ema, lookahead = _build(cfg, mcfg, device, dist, tr_x)
    steps_per_epoch = len(tr_x) // cfg.batch_size + (1 if len(tr_x) % cfg.batch_size >= 2 * dist.world_size else 0)
    total_steps = steps_per_epoch * cfg.epochs

    state = {"history": [], "step": 0, "start_epoch": 1, "best_acc": -1.0, "elapsed": 0.0}
    if resume_ckpt is not None:
        state = _restore_state(resume_ckpt, model, opt, ema, lookahead, cfg, device, dist)
        if dist.is_main:
            state["best_acc"] = best_to_beat(run_dir, state["best_acc"])
    elif dist.is_main:
        run_dir = new_run_dir(cfg)
    else:
        run_dir = None
    history, step, best_acc = state["history"], state["step"], state["best_acc"]
    cfg_dict = asdict(cfg)
    if dist.is_main:
        write_json(run_dir / "config.json", {**cfg_dict, "model_config": mcfg})
        write_json(run_dir / "environment.json", {**environment(device), "world_size": dist.world_size})
        n_params = count_parameters(model)
        log.info(f"run {run_dir}  preset={cfg.preset} model={cfg.model} ({n_params:,} params) device={device}"
                 f" threads={torch.get_num_threads()} world={dist.world_size}  train/val {len(tr_x)}/{len(va_x)}")
        if state["start_epoch"] > 1:
            log.info(f"resuming after epoch {state['start_epoch'] - 1} (step {step})")

    # Ctrl-C (KeyboardInterrupt) abandons the epoch in flight; the last complete one is on disk
    # already, and atomic writes mean an interrupted save leaves the previous file intact.
    t_start = time.perf_counter() - state["elapsed"]
    saved = state["start_epoch"] - 1  # the epoch last.pt holds: what --resume would continue from
    t_saved, save_cost = -math.inf, 0.0  # when last.pt was last written, and what that took
    try:
        for epoch in range(state["start_epoch"], cfg.epochs + 1):
            gen = epoch_generators(cfg.seed, epoch, dist.rank, device)
            t0 = time.perf_counter()
            tr, step = train_one_epoch(fwd_model, opt, ema, tr_x, tr_y, cfg, epoch=epoch, step=step,
                                       total_steps=total_steps, gen=gen, dist=dist, lookahead=lookahead,
                                       teacher=teacher)
            train_seconds = time.perf_counter() - t0
            eval_model = ema.model if ema is not None else dist.unwrap(model)
            t1 = time.perf_counter()
            # Rank 0 alone evaluates (the others go on to the next epoch's first all-reduce and wait).
            va = (evaluate_split(eval_model, va_x, va_y, cfg) if len(va_x) and dist.is_main
                  else {"loss": float("nan"), "acc": float("nan")})
            row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                   "val_acc": va["acc"], "lr": lr_at(step - 1, total_steps, cfg), "seconds": train_seconds,
                   "eval_seconds": time.perf_counter() - t1, "elapsed": time.perf_counter() - t_start}
            if cfg.report_test and dist.is_main:  # reporting only: nothing is chosen on the test set
                # The last epoch's figure is the final model's as predict serves it (--tta-shift's
                # 5x views: too dear for every epoch, like validation).
                row["test_acc"] = evaluate_split(eval_model, te_x, te_y, cfg, amp="off",
                                                 shift=epoch == cfg.epochs)["acc"]
            history.append(row)
            if dist.is_main:
                t2 = time.perf_counter()
                last = last_due(epoch, cfg.epochs, t2 - t_saved, save_cost)
                is_best, best_acc = _save_epoch(run_dir, cfg, mcfg, cfg_dict, model, eval_model, opt, ema,
                                                lookahead, va, epoch, step, history, best_acc, dist, last)
                if last:
                    t_saved = time.perf_counter()
                    saved, save_cost = epoch, t_saved - t2
                log.info(f"epoch {epoch:3d}/{cfg.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}  "
                         f"val loss {va['loss']:.4f} acc {va['acc']:.4f}  {train_seconds:5.1f}s"
                         f"{'  *' if is_best else ''}")
    except BaseException as e:
        if dist.is_main:
            _stopped(run_dir, saved, interrupted=isinstance(e, KeyboardInterrupt), new_run=resume_ckpt is None)
        if isinstance(e, KeyboardInterrupt):
            dist.cleanup()
        raise
    # Leave together: a rank that tears down its gloo group while rank 0 is still validating and
    # writing checkpoints was seen to abort ("terminate called without an active exception").
    dist.barrier()
    dist.cleanup()
    if dist.is_main:
        write_json(run_dir / "train_summary.json", {
            "train_seconds": sum(h["seconds"] for h in history), "elapsed": history[-1]["elapsed"],
            "best_val_acc": best_acc, "epochs": len(history), "steps": step})
        if len(sp["val_idx"]):
            # Temperature and unsure threshold from the validation split, into best.pt itself.
            from fmnist.evaluation.calibrate import calibrate
            calibrate(run_dir / "best.pt", dataset=ds, device=device, val_idx=sp["val_idx"], report_test=False)  # logs
    return run_dir if dist.is_main else None
