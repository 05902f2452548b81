"""Dev-photo accuracy of a model under GrabCut settings of the robust conversion (robust.SEG and
the number of GrabCut iterations), to judge output-changing speed-ups of the conversion.

    PYTHONPATH=src python scripts/grabcut_dev_check.py CHECKPOINT [--split dev]

Use a model NOT trained on the split's photos (e.g. one trained with --real-photos
photos/train only): the shipped model trained on photos/real's dev split, so any change in
conversion lowers its dev accuracy whether or not the change is worse. Prints accuracy overall
and per kind for each setting; the held-out split is for reporting, never for choosing.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from fmnist import realphotos, robust
from fmnist.classes import CLASS_NAMES
from fmnist.predict import Predictor
from fmnist.preprocess import load_rgb

SETTINGS = ((2, 64), (1, 64), (3, 64), (2, 48))   # (iterations, SEG); (2, 64) is the default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--real", default="photos/real", help="folder with manifest.csv (default: photos/real)")
    ap.add_argument("--split", default="dev", help="dev or heldout (default: dev)")
    args = ap.parse_args()
    predictor = Predictor(args.checkpoint)
    photos = realphotos.select(realphotos.read_manifests(args.real), args.split)
    y = np.array([CLASS_NAMES.index(p.label) for p in photos])
    kinds = np.array([p.kind for p in photos])
    rgbs = [np.asarray(load_rgb(p.path, work=robust.WORK)) for p in photos]
    grabcut, seg = robust.grabcut, robust.SEG
    try:
        for iters, size in SETTINGS:
            robust.grabcut, robust.SEG = functools.partial(grabcut, iters=iters), size
            right = predictor.probabilities(np.stack([robust.convert(a).image for a in rgbs])).argmax(1) == y
            per_kind = ", ".join(f"{k} {right[kinds == k].mean():.1%}" for k in sorted(set(kinds)))
            print(f"GrabCut {iters} iteration(s) at {size} px: {right.mean():.1%} of {len(y)} ({per_kind})")
    finally:
        robust.grabcut, robust.SEG = grabcut, seg


if __name__ == "__main__":
    main()
