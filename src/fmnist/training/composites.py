"""Real training photos re-photographed on other people's grounds (`--real-composites`).

A model trained on a few hundred homes can learn the bed sheets and floors as much as the items.
A composite takes a training photo's item (its robust mask), puts it on the ground of another
contributor's training photo, and converts the result as predict does: the same garment comes out
of the conversion the way it would on that other sheet, rug or parquet, with the conversion's own
failures there (a patterned ground that bleeds into the item, a garment of the ground's colour).

The ground is the widest strip of the other photo beside its item's box, mirrored out to the
frame (BORDER_REFLECT keeps the texture's scale; stretching a strip would not). The item is pasted
at 55-85 % of the frame's short side, near the centre, with a softened mask edge. Everything is
drawn from one seeded generator, once per run: the composites are fixed training photos that the
usual augmentation then varies.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from fmnist.photos import robust

log = logging.getLogger(__name__)

MIN_STRIP = 0.2      # a ground strip narrower than this share of the photo's short side is no ground
SCALE = (0.55, 0.85)  # the pasted item's longest side, as a share of the ground's short side
FEATHER = 1.5         # Gaussian sigma (px at the working size) that softens the pasted mask's edge
MIN_IOU = 0.6         # a composite whose conversion finds less of the pasted item than this is dropped:
                      # a shape the conversion made up is not the label's garment, and training on it
                      # would teach the model to name any scrap (non-clothing photos included)
DONOR_ITEM = (0.05, 0.8)  # a ground comes only from a photo whose item mask covers this share: outside
                          # it the mask likely missed the item, and the "ground" would hold part of it


def ground_strip(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The widest strip of `rgb` outside the item's box (left, right, above or below), or None
    when every strip is under MIN_STRIP of the short side (an item that fills the photo)."""
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return None
    t, b, l, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    strips = [rgb[:, :l], rgb[:, r:], rgb[:t], rgb[b:]]
    widths = [l, w - r, t, h - b]
    i = int(np.argmax(widths))
    return strips[i] if widths[i] >= MIN_STRIP * min(h, w) else None


def fill_frame(strip: np.ndarray, h: int, w: int) -> np.ndarray:
    """`strip` mirrored out to (h, w): the ground's texture at its own scale."""
    sh, sw = strip.shape[:2]
    reps_y, reps_x = -(-h // sh), -(-w // sw)
    tile = strip
    # mirrored copies side by side, so the seams continue the texture instead of jumping
    row = np.concatenate([tile if k % 2 == 0 else tile[:, ::-1] for k in range(reps_x)], axis=1)
    full = np.concatenate([row if k % 2 == 0 else row[::-1] for k in range(reps_y)], axis=0)
    return np.ascontiguousarray(full[:h, :w])


def paste(item: np.ndarray, mask: np.ndarray, ground: np.ndarray,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The item's box (pixels and mask) pasted onto `ground` at a random scale and near-central
    place -> (the composite, where the item is)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    t, b, l, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop, m = item[t:b, l:r], mask[t:b, l:r].astype(np.float32)
    gh, gw = ground.shape[:2]
    s = rng.uniform(*SCALE) * min(gh, gw) / max(b - t, r - l)
    nh, nw = max(1, min(gh - 2, round((b - t) * s))), max(1, min(gw - 2, round((r - l) * s)))
    crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA)
    m = cv2.GaussianBlur(cv2.resize(m, (nw, nh), interpolation=cv2.INTER_LINEAR), (0, 0), FEATHER)[..., None]
    y0 = int(np.clip((gh - nh) / 2 + rng.uniform(-0.1, 0.1) * gh, 0, gh - nh))
    x0 = int(np.clip((gw - nw) / 2 + rng.uniform(-0.1, 0.1) * gw, 0, gw - nw))
    out = ground.astype(np.float32)
    region = out[y0:y0 + nh, x0:x0 + nw]
    out[y0:y0 + nh, x0:x0 + nw] = m * crop.astype(np.float32) + (1 - m) * region
    where = np.zeros((gh, gw), bool)
    where[y0:y0 + nh, x0:x0 + nw] = m[..., 0] > 0.5
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), where


def make(photos: list[np.ndarray], owners: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` composites of each photo (RGB arrays; `owners` their contributors) -> ((n * P, 28, 28)
    uint8 conversions, (n * P,) index of the photo each was made from), block by block. A photo
    whose item was not found, and a composite whose conversion lost the item (MIN_IOU), are
    skipped, so blocks may be shorter."""
    rng = np.random.default_rng(seed)
    seg = [robust.segment(p) for p in photos]
    grounds = [ground_strip(rgb, m) if DONOR_ITEM[0] <= m.mean() <= DONOR_ITEM[1] else None for rgb, m in seg]
    with_ground = np.array([g is not None for g in grounds])
    owners_a = np.array(owners)
    images, source = [], []
    for _ in range(n):
        for i, (rgb, m) in enumerate(seg):
            if m.mean() < robust.MIN_ITEM or m.mean() > 0.97:
                continue
            choices = np.flatnonzero(with_ground & (owners_a != owners[i]))
            if not len(choices):
                continue
            g = grounds[int(rng.choice(choices))]
            h, w = rgb.shape[:2]
            ground = fill_frame(g, h, w)
            comp, where = paste(rgb, m, ground, rng)
            found = robust.segment(comp)[1]
            if (found & where).sum() < MIN_IOU * (found | where).sum():
                continue
            conv = robust.convert(comp)
            if conv.item_found:
                images.append(conv.image)
                source.append(i)
    log.info("%d composites of %d photos kept (%d grounds; %d tries)", len(images), len(photos),
             int(with_ground.sum()), n * len(photos))
    return (np.stack(images) if images else np.zeros((0, 28, 28), np.uint8)), np.array(source, dtype=np.int64)
