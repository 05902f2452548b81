"""Pictures of a run: training curves, confusion-matrix heat map, most confident mistakes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fmnist.utils.atomic import atomic_path
from fmnist.classes import CLASS_NAMES


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: servers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def curves(history_csv: Path, path: Path) -> None:
    plt = _plt()
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    ep = [int(r["epoch"]) for r in rows]
    col = lambda k: [float(r[k]) for r in rows]  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, col("train_loss"), "o-", label="train")
    a1.plot(ep, col("val_loss"), "o-", label="validation")
    a1.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    a2.plot(ep, col("train_acc"), "o-", label="train")
    a2.plot(ep, col("val_acc"), "o-", label="validation")
    a2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    _save(fig, path)


def confusion_matrix(cm: np.ndarray, path: Path, title: str = "test set") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({title}; colour = row fraction)")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def mistakes(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, path: Path, n: int = 24) -> None:
    """Grid of the test images the model got wrong with the highest confidence. One image of
    all the tiles in one axes: 0.2 s where an axes per tile took 0.7 s, at every evaluation."""
    plt = _plt()
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    order = wrong[np.argsort(-probs[wrong, pred[wrong]])][:n]
    cols, size, gap_x, gap_y = 8, images.shape[-1], 8, 14   # gaps in pixels; gap_y holds each title
    rows = max(1, int(np.ceil(len(order) / cols)))
    mosaic = np.full((rows * (size + gap_y), cols * (size + gap_x)), np.nan)
    width = cols * 1.5
    fig, ax = plt.subplots(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + 0.4))
    for k, i in enumerate(order):
        y, x = (k // cols) * (size + gap_y) + gap_y, (k % cols) * (size + gap_x) + gap_x // 2
        mosaic[y:y + size, x:x + size] = images[i]
        ax.text(x + size / 2, y - 1.5, f"{CLASS_NAMES[pred[i]]} {probs[i, pred[i]]:.0%}\ntrue: {CLASS_NAMES[labels[i]]}",
                ha="center", va="bottom", fontsize=7, color="firebrick")
    cmap = plt.get_cmap("gray").with_extremes(bad="white")   # NaN: the white space between tiles
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    ax.set_title("Most confident mistakes (predicted, confidence / true class)", fontsize=10)
    _save(fig, path)


def photo_pipeline(photos: list, seen: list, preds: list, truths: list, path: Path) -> None:
    """Rows of: the photo as given -> the 28x28 image the model saw -> the top-3 prediction."""
    import io

    from PIL import Image

    plt = _plt()
    n = len(photos)
    fig, axes = plt.subplots(n, 3, figsize=(8.5, 2.3 * n), gridspec_kw={"width_ratios": [1.3, 1, 1.6]})
    for r in range(n):
        a, b, c = axes[r]
        a.imshow(Image.open(io.BytesIO(photos[r])).convert("RGB"))
        a.set_title("photo (JPEG)" if r == 0 else "", fontsize=9)
        b.imshow(seen[r], cmap="gray", vmin=0, vmax=255)
        b.set_title("preprocessed 28x28" if r == 0 else "", fontsize=9)
        for ax in (a, b):
            ax.set_xticks([])
            ax.set_yticks([])
        names = [t[0] for t in preds[r]][::-1]
        probs = [t[1] for t in preds[r]][::-1]
        colours = ["seagreen" if nm == truths[r] else "grey" for nm in names]
        c.barh(names, probs, color=colours)
        c.set_xlim(0, 1)
        c.set_title(f"prediction (true: {truths[r]})", fontsize=9)
        c.tick_params(labelsize=8)
    fig.tight_layout()
    _save(fig, path)
