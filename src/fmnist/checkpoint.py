"""Self-describing checkpoints: weights plus everything needed to rebuild and trust them.

A checkpoint is a plain dict of tensors and primitives, so it loads with
torch.load(weights_only=True) (no pickled code runs). Keys:
  format, model, model_config, state_dict, class_names, normalization, metrics, epoch,
  train_config; resumable ones (last.pt) add optimizer, step, ema, rng, history.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from .atomic import torch_save
from .classes import CLASS_NAMES, MEAN, STD
from .models import create_model

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


def load(path: str | Path, map_location="cpu") -> dict:
    p = resolve_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or corrupt: {msg}); "
                              f"use another checkpoint (best.pt / last.pt of a finished run) or retrain") from None
    except Exception as e:  # unpickling errors of arbitrary files come in many types
        raise CheckpointError(f"{p}: not an fmnist checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an fmnist checkpoint (expected format {FORMAT!r})")
    return ckpt


def build_model(ckpt: dict, device="cpu") -> torch.nn.Module:
    model = create_model(ckpt["model"], ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()


def trained_with_tta(ckpt: dict) -> bool:
    """Whether the recipe evaluates this model with flip TTA (its reported accuracy includes it)."""
    return bool(ckpt.get("train_config", {}).get("tta_flip", False))


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    ckpt = load(path)
    return build_model(ckpt, device), ckpt
