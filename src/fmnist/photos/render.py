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


BADGE_COLOURS = ((220, 30, 30), (250, 200, 0), (0, 120, 220), (20, 20, 20))


def render_listing(photo: bytes, rng: np.random.Generator, quality: int = 85) -> bytes:
    """A product photo (JPEG bytes) as a shop listing shows it: a brand line above, a price
    badge in a top corner, a dark banner of text below, all on the photo's own backdrop and
    none over the item. What the robust conversion must see past: the trim box of the paper
    recipe stretches to take them in."""
    from PIL import ImageDraw, ImageFont

    im = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = im.size
    bg = tuple(int(v) for v in np.asarray(im)[:4, :4].reshape(-1, 3).mean(0))
    m = max(24, int(h * rng.uniform(0.12, 0.2)))           # room above and below the photo
    out = Image.new("RGB", (w, h + 2 * m), bg)
    out.paste(im, (0, m))
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, m // 3))
    r = int(m * rng.uniform(0.35, 0.5))                     # badge radius
    right = rng.random() < 0.7                              # badge in the right corner, brand on the left
    cx = w - r - 6 if right else r + 6
    d.text((int(w * (0.04 if right else 0.55)), m // 4), str(rng.choice(["BRAND", "NEW IN", "SALE", "Collection"])),
           fill=(0, 0, 0), font=font)
    colour = BADGE_COLOURS[int(rng.integers(len(BADGE_COLOURS)))]
    d.ellipse((cx - r, m // 2 - r + 4, cx + r, m // 2 + r + 4), fill=colour)
    d.text((cx - r * 0.7, m // 2 - r * 0.3 + 4), f"-{int(rng.integers(1, 8)) * 10}%", fill=(255, 255, 255), font=font)
    top = h + m + m // 4
    d.rectangle((0, top, w, h + 2 * m), fill=(20, 20, 20))
    d.text((int(w * 0.04), top + 2), str(rng.choice(["FREE SHIPPING", "ONLY TODAY", "2 FOR 1"])), fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
