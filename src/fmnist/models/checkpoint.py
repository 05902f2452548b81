"""Self-describing checkpoints: weights plus everything needed to rebuild and trust them.

A checkpoint is a plain dict of tensors and primitives, so it loads with
torch.load(weights_only=True) (no pickled code runs). Keys:
  format, model, model_config, state_dict, class_names, normalization, metrics, epoch,
  train_config; resumable ones (last.pt) add optimizer, step, ema (when used), history. No random
  state: every random stream is a function of (seed, epoch, rank) (train.epoch_generators).
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from fmnist.utils.atomic import torch_save
from fmnist.classes import CLASS_NAMES, MEAN, NUM_CLASSES, STD
from fmnist.models.networks import create_model

FORMAT = "fmnist.checkpoint.v1"


class CheckpointError(Exception):
    pass


def make(model_name: str, model_config: dict, state_dict: dict, *, metrics: dict, epoch: int,
         train_config: dict, **extra) -> dict:
    return {
        "format": FORMAT,
        "model": model_name,
        "model_config": model_config,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "class_names": list(CLASS_NAMES),
        "normalization": {"mean": MEAN, "std": STD, "input": "float (B,1,28,28) in [0,1], light object on black"},
        "metrics": metrics,
        "epoch": epoch,
        "train_config": train_config,
        **extra,
    }


def save(ckpt: dict, path: str | Path) -> None:
    torch_save(ckpt, path)


def resolve_path(path: str | Path) -> Path:
    """A run directory means its best.pt; a file is itself."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: run directory holds no best.pt or last.pt; "
                              f"train one with `fmnist train` or pass a checkpoint file")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint file or run directory")
    return p


REMEDY = "use another checkpoint (best.pt / last.pt of a finished run) or retrain with `fmnist train`"

# What every command needs to rebuild and label the model; anything else is read with .get().
REQUIRED = {"model": str, "model_config": dict, "state_dict": dict, "class_names": list}


def _refusal(p: Path, e: Exception) -> CheckpointError:
    """Our own words for torch's unpickling errors: torch's text suggests weights_only=False,
    which would run whatever code an untrusted file carries, so none of it is passed on."""
    text = str(e)
    bad_global = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if bad_global:
        return CheckpointError(f"{p}: refused: the file holds pickled Python objects ({bad_global.group(1)}), "
                               f"which could run code when loaded; fmnist checkpoints hold only tensors and "
                               f"plain values, and fmnist loads nothing else; {REMEDY}")
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines() if "WeightsUnpickler" in text else []
    detail = reason[0] if reason and "weights_only" not in reason[0] else type(e).__name__
    return CheckpointError(f"{p}: not a readable checkpoint (truncated, corrupt or not a torch file: {detail}); "
                           f"{REMEDY}")


def class_names_problem(names: list) -> str:
    """'' if `names` labels every output of a model (all of them return NUM_CLASSES logits,
    models.py), else what is wrong: a short list would fail on the first prediction of a
    missing class, and evaluate and export would carry it on unnoticed."""
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        return f"'class_names' holds {type(bad[0]).__name__}, expected str"
    if len(names) != NUM_CLASSES:
        return f"'class_names' has {len(names)} class names for the model's {NUM_CLASSES} outputs"
    return ""


def calibration_problem(cal) -> str:
    """'' if a checkpoint's (or ONNX file's) "calibration" is usable or absent, else what is
    wrong: predictions divide the logits by the temperature (0 gives NaN probabilities) and
    compare the top probability with the threshold (NaN would never call anything unsure)."""
    if cal is None:
        return ""
    if not isinstance(cal, dict):
        return f"'calibration' is {type(cal).__name__}, expected dict"
    t, thr = cal.get("temperature", 1.0), cal.get("threshold", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        return f"calibration temperature {t!r} is not a finite number > 0"
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
        return f"calibration threshold {thr!r} is not a probability in [0, 1]"
    return ""


def check(ckpt: dict, p: Path, check_calibration: bool = True) -> None:
    """The keys and types every loader relies on; a file with the right format key can still lack them."""
    problems = []
    for key, typ in REQUIRED.items():
        if key not in ckpt:
            problems.append(f"no {key!r}")
        elif not isinstance(ckpt[key], typ):
            problems.append(f"{key!r} is {type(ckpt[key]).__name__}, expected {typ.__name__}")
    if not problems:
        bad = [k for k, v in ckpt["state_dict"].items() if not isinstance(v, torch.Tensor)]
        if bad:
            problems.append(f"state_dict entry {bad[0]!r} is not a tensor")
        if names := class_names_problem(ckpt["class_names"]):
            problems.append(names)
    if problems:
        raise CheckpointError(f"{p}: damaged fmnist checkpoint: {'; '.join(problems)}; {REMEDY}")
    if check_calibration and (cal := calibration_problem(ckpt.get("calibration"))):
        # The weights are fine: refitting the calibration on validation repairs the file.
        raise CheckpointError(f"{p}: damaged fmnist checkpoint: {cal}; refit it with `fmnist calibrate {p}`")


def load(path: str | Path, map_location="cpu", check_calibration: bool = True) -> dict:
    """The checkpoint at `path` (a run directory: its best.pt), checked; CheckpointError naming
    the file and what to do otherwise. check_calibration=False: for calibrate.py, which refits it."""
    p = resolve_path(path)
    if p.suffix.lower() == ".onnx":  # torch.load's own words for one are "Unsupported operand 8"
        raise CheckpointError(f"{p}: an ONNX file from `fmnist export`, not a PyTorch checkpoint: fmnist predict "
                              f"and fmnist serve run it with --backend onnx; other commands need the .pt it "
                              f"was exported from")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing or reading a file; the outcome is what counts
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(p, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        # The first sentence: torch follows it with a paragraph ("This is an internal miniz error...")
        msg = str(e).splitlines()[0].split(". ", 1)[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or corrupt: {msg}); {REMEDY}") from None
    except Exception as e:  # unpickling errors of arbitrary files come in many types
        raise CheckpointError(f"{p}: not an fmnist checkpoint ({type(e).__name__}); {REMEDY}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an fmnist checkpoint (expected format {FORMAT!r})")
    check(ckpt, p, check_calibration)
    return ckpt


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def state_dict_mismatch(expected: dict, got: dict) -> str:
    """'' if `got` fits `expected` key for key and shape for shape, else what does not (first few)."""
    def first(items, n=3):
        items = list(items)
        return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")

    parts = []
    if missing := sorted(set(expected) - set(got)):
        parts.append(f"missing {first(missing)}")
    if unexpected := sorted(set(got) - set(expected)):
        parts.append(f"unexpected {first(unexpected)}")
    wrong = sorted(k for k in set(expected) & set(got) if expected[k].shape != got[k].shape)
    if wrong:
        parts.append("wrong shape " + first(f"{k} {_shape(got[k])} in the file, {_shape(expected[k])} in the model"
                                            for k in wrong))
    return "; ".join(parts)


def build_model(ckpt: dict, device="cpu", source: str | Path | None = None) -> torch.nn.Module:
    """The model a loaded checkpoint describes, with its weights; CheckpointError if they do not fit."""
    where = f"{source}: " if source else ""
    name = ckpt["model"]
    try:
        model = create_model(name, ckpt["model_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}cannot rebuild model {name!r} from the checkpoint's model_config ({e}); "
                              f"{REMEDY}") from None
    mismatch = state_dict_mismatch(model.state_dict(), ckpt["state_dict"])
    if mismatch:
        raise CheckpointError(f"{where}weights do not fit model {name!r} as its model_config describes: "
                              f"{mismatch}; {REMEDY}")
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def trained_with_tta(ckpt: dict) -> bool:
    """Whether the recipe evaluates this model with flip TTA (its reported accuracy includes it)."""
    return bool(ckpt.get("train_config", {}).get("tta_flip", False))


def trained_with_shift_tta(ckpt: dict) -> bool:
    """Whether the recipe also averages one-pixel shifts of each view (config.tta_shift)."""
    tc = ckpt.get("train_config", {})
    return bool(tc.get("tta_flip", False) and tc.get("tta_shift", False))


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    ckpt = load(path)
    return build_model(ckpt, device, source=resolve_path(path)), ckpt
