"""Render Fashion-MNIST images as product photos: the round-trip check for preprocess.py.

A dataset image (light garment on black, 28x28) becomes what a shop would show: dark-on-
light on an off-white background, enlarged, placed off-centre on a larger canvas, JPEG.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def render_product_photo(img28: np.ndarray, rng: np.random.Generator, quality: int = 85) -> bytes:
    """(28, 28) uint8 -> JPEG bytes of a photo-like rendering (RGB, ~170-600 px)."""
    scale = int(rng.integers(6, 16))                     # 168 .. 420 px object
    bg = int(rng.integers(225, 256))                     # white to light grey backdrop
    tint = rng.uniform(0.97, 1.0, size=3)                # slightly warm/cool light
    obj = Image.fromarray(img28).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    a = np.asarray(obj, dtype=np.float64) / 255.0
    size = 28 * scale
    mx, my = (rng.uniform(0.1, 0.6, size=2) * size).astype(int)  # canvas margins
    H, W = size + 2 * my, size + 2 * mx
    canvas = np.full((H, W), 1.0)
    oy, ox = int(rng.integers(0, 2 * my + 1)), int(rng.integers(0, 2 * mx + 1))  # off-centre
    canvas[oy:oy + size, ox:ox + size] = 1.0 - a        # negate: dark garment on light
    rgb = canvas[..., None] * bg * tint[None, None, :]
    rgb += rng.normal(0, 1.5, rgb.shape)                 # sensor noise
    photo = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
