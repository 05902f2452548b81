"""Dev-photo accuracy of models under GrabCut settings of the robust conversion (robust.SEG and
the number of GrabCut iterations), to judge output-changing speed-ups of the conversion.

    PYTHONPATH=src python scripts/grabcut_dev_check.py CHECKPOINT [CHECKPOINT ...] [--split dev] \
        [--out bench/cpu-photos/grabcut_dev_check.json]

Use models NOT trained on the split's photos (e.g. trained with --real-photos
photos/train,photos/outliers): the shipped model trained on photos/real's dev split, so any
change in conversion lowers its dev accuracy whether or not the change is worse. Give several
seeds: two models of one recipe differ by up to 8 points on the 162 dev photos, while the same
model under two conversions is a paired comparison on the same photos, far less noisy, and a
setting is only worth adopting if it holds for every seed. Prints accuracy overall and per kind
for each setting and model; with --out, appends the sitting to that JSON record. The held-out
split is for reporting, never for choosing.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from fmnist.photos import realphotos
from fmnist.photos import robust
from fmnist.classes import CLASS_NAMES
from fmnist.inference.predict import Predictor
from fmnist.photos.preprocess import load_rgb

SETTINGS = ((2, 64), (1, 64), (3, 64), (2, 48))   # (iterations, SEG)


def run_info(checkpoint: str) -> dict:
    """What trained this model, from the run folder `fmnist train` wrote beside it."""
    run = Path(checkpoint).resolve().parent
    info = {"checkpoint": str(checkpoint)}
    for name, keys in (("environment.json", ("git_commit", "time")), ("config.json", ("preset", "seed", "real_photos"))):
        f = run / name
        if f.exists():
            d = json.loads(f.read_text())
            info.update({k: d.get(k) for k in keys if k in d})
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    ap.add_argument("--real", default="photos/real", help="folder with manifest.csv (default: photos/real)")
    ap.add_argument("--split", default="dev", help="dev or heldout (default: dev)")
    ap.add_argument("--out", default=None, help="append the sitting to this JSON record")
    args = ap.parse_args()
    photos = realphotos.select(realphotos.read_manifests(args.real), args.split)
    y = np.array([CLASS_NAMES.index(p.label) for p in photos])
    kinds = np.array([p.kind for p in photos])
    rgbs = [np.asarray(load_rgb(p.path, work=robust.WORK)) for p in photos]
    grabcut, seg = robust.grabcut, robust.SEG
    images = {}
    try:
        for iters, size in SETTINGS:
            robust.grabcut, robust.SEG = functools.partial(grabcut, iters=iters), size
            images[iters, size] = np.stack([robust.convert(a).image for a in rgbs])
    finally:
        robust.grabcut, robust.SEG = grabcut, seg
    models = []
    for ckpt in args.checkpoints:
        predictor, rows = Predictor(ckpt), []
        print(ckpt)
        for (iters, size), x in images.items():
            right = predictor.probabilities(x).argmax(1) == y
            per_kind = {k: float(right[kinds == k].mean()) for k in sorted(set(kinds))}
            rows.append({"iterations": iters, "seg_px": size, "right": int(right.sum()), "n": len(y),
                         "accuracy": float(right.mean()), "per_kind": per_kind})
            print(f"  GrabCut {iters} iteration(s) at {size} px: {right.mean():.1%} of {len(y)} ("
                  + ", ".join(f"{k} {v:.1%}" for k, v in per_kind.items()) + ")")
        models.append({**run_info(ckpt), "settings": rows})
    if args.out:
        from fmnist.utils.atomic import append_sitting
        from fmnist.utils.runinfo import environment

        n = append_sitting(args.out, {"environment": environment("cpu"), "split": args.split,
                                      "photos": len(y), "models": models})
        print(f"appended sitting {n} to {args.out}")


if __name__ == "__main__":
    main()
