"""Check that robust.convert gives bit-identical results to another revision's robust.py.

    PYTHONPATH=src python scripts/check_conversion_identical.py [--ref main] [--options all]

Every jpg/png under photos/ is decoded once (preprocess.load_rgb, as the server does), then
converted by the reference revision's robust.py (loaded from git as a separate module) and by
the working tree's; the 28x28 image, box, negated, item_found and note must all match.
--options all also runs every RobustOptions ablation switch, one at a time. Exit status 1 on
any mismatch. A speed-up that is meant to keep outputs identical is checked with this.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from fmnist.photos import robust
from fmnist.photos.preprocess import load_rgb

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("real", "train", "nonclothing", "outliers")

# One switch off (or changed) at a time, as `fmnist bench photos --ablation` does.
ABLATIONS = [dict(grabcut=False), dict(main_component=False), dict(zero_background=False),
             dict(polarity=False), dict(rect_prior=False), dict(seed_k=2.0),
             dict(downscale="thumb"), dict(downscale="nearest"), dict(sharpen=0.0),
             dict(normalize=True)]


def load_reference(rev: str):
    """robust.py as of `rev`, imported inside the fmnist package so its relative imports work."""
    src = subprocess.run(["git", "show", f"{rev}:src/fmnist/robust.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("fmnist._robust_ref", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "fmnist"
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    exec(compile(src, f"{rev}:robust.py", "exec"), mod.__dict__)
    return mod


def photos() -> list[Path]:
    return sorted(p for f in FOLDERS for p in (ROOT / "photos" / f).rglob("*")
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def same(a, b) -> bool:
    return (np.array_equal(a.image, b.image) and a.box == b.box and a.negated == b.negated
            and a.item_found == b.item_found and a.note == b.note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="main", help="git revision to compare against (default: main)")
    ap.add_argument("--options", choices=("default", "all"), default="default",
                    help="default options only, or every ablation switch too (default: default)")
    args = ap.parse_args()
    ref = load_reference(args.ref)
    variants = [{}] + (ABLATIONS if args.options == "all" else [])
    files = photos()
    bad = 0
    for p in files:
        rgb = np.asarray(load_rgb(p, work=robust.WORK))
        for kw in variants:
            old = ref.convert(rgb, ref.RobustOptions(**kw))
            new = robust.convert(rgb, robust.RobustOptions(**kw))
            if not same(old, new):
                bad += 1
                diff = int(np.abs(old.image.astype(int) - new.image).max())
                print(f"MISMATCH {p.relative_to(ROOT)} {kw or 'default'}: max pixel diff {diff}, "
                      f"box {old.box} vs {new.box}, item_found {old.item_found} vs {new.item_found}")
    fields = [f.name for f in dataclasses.fields(robust.RobustOptions)]
    print(f"{len(files)} photos x {len(variants)} option sets ({', '.join(fields)}): {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
