"""README picture: real held-out photos through the robust conversion and the shipped model,
right and wrong alike (the first photo of each class and kind in the manifest's order).

    python scripts/photo_figure.py [--out docs/images/real-photos.png]
"""

import argparse
from pathlib import Path

import numpy as np

from fmnist.photos import realphotos
from fmnist.evaluation.plots import _plt, _save
from fmnist.inference.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "real-photos.png",
                    help="where to write the PNG (default: docs/images/real-photos.png)")
    ap.add_argument("--photos", default="real",
                    help="a photo set by name (fmnist photos fetch real) or a folder with a manifest.csv (default: real)")
    args = ap.parse_args()
    held = realphotos.select(realphotos.read_manifest(args.photos), "heldout")
    pick, seen = [], set()
    for p in held:   # one per (class, kind), in manifest order: no choosing by outcome
        if (p.label, p.kind) not in seen:
            seen.add((p.label, p.kind))
            pick.append(p)
    pick = pick[:16]
    preds = Predictor().predict([p.path for p in pick], top_k=1)
    plt = _plt()
    from PIL import Image

    cols = 4
    rows = int(np.ceil(len(pick) / cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.55, rows * 1.95),
                             gridspec_kw={"width_ratios": [1.4, 1] * cols})
    for ax in axes.flat:
        ax.axis("off")
    for i, (p, r) in enumerate(zip(pick, preds)):
        a, b = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        im = Image.open(p.path).convert("RGB")
        im.thumbnail((300, 300))
        a.imshow(im)
        b.imshow(r.image, cmap="gray", vmin=0, vmax=255)
        ok = r.top[0][0] == p.label
        verdict = " (unsure)" if r.unsure else ""
        a.set_title(f"{p.label}, {p.kind}", fontsize=7)
        b.set_title(f"{r.top[0][0]} {r.top[0][1]:.0%}{verdict}", fontsize=7, color="seagreen" if ok else "firebrick")
    right = sum(r.top[0][0] == p.label for p, r in zip(pick, preds))
    fig.suptitle(f"Held-out real photos -> robust conversion -> shipped model: {right} of {len(pick)} right "
                 f"(one photo per class and kind, in manifest order)", fontsize=9)
    fig.tight_layout()
    _save(fig, args.out)
    print(f"wrote {args.out}: {right}/{len(pick)} right")


if __name__ == "__main__":
    main()
