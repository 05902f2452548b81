"""Photo -> 28x28 for people's own photos: find the item, then make it look like the dataset.

The paper's conversion (preprocess.convert_paper) assumes a Zalando product shot: a clean,
uniform background, so "everything unlike the corners" is the item. Real photos break that
(badges, text, shadows, a bed sheet, vignetting), so this pipeline segments first:

  1. decode reduced (JPEG draft mode) to a working image of at most WORK px: a 1-MP photo costs
     a 1/4-scale decode, and nothing later works at full resolution
  2. background model from the whole border (not 4 corners): its k colours (k-means in Lab)
     and how much the border itself varies
  3. seed mask = pixels unlike every border colour; GrabCut (OpenCV) refines it on a SEG-px
     copy, with the border as sure background and the inner rectangle as probable item, so
     uneven or textured backgrounds still split
  4. morphological open/close, then keep the main connected component (large and central,
     holes filled) plus large pieces inside its box: text, badges and shadows do not define
     it; the mask's edges are refined at the working size
  5. intensity relative to the local background, polarity chosen so the item is light on
     black as in the dataset; background outside the mask exactly 0; an item that hardly
     differs from its ground (white on white) keeps a visible floor instead of vanishing
  6. antialiased (area) downscale straight to 28, a light Gaussian sharpening, centring; the
     paper's route (area to the Zalando thumbnail scale, then subsampling) is an ablation
     switch, and measured worse on real photos

Each step can be switched off (RobustOptions) for the ablation in `fmnist bench photos`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fmnist.classes import IMAGE_SIZE

WORK = 256     # longest side of the working image; the item ends up <= 73 px, so 256 leaves ~3.5x
SEG = 64       # longest side for GrabCut: its max-flow cost grows faster than its pixels; at 64 px
               # (2.3x the 28 px output) the slowest real photos still convert within ~15 ms.
               # SEG 48 lost 2-7 points of dev accuracy for each of three `photo` models not
               # trained on the dev photos (docs/decisions.md).
GRABCUT_ITERS = 1  # GrabCut's set-up and each iteration cost about the same (~0.6 ms here). One
                   # iteration instead of two gained 0.6-1.8 points of dev accuracy for each of
                   # those three models (paired: same model, same photos; they trained on photos
                   # converted with two), so the second bought nothing for ~17% of a conversion.
THUMB = 73     # Zalando's thumbnails were 51x73; the paper subsampled those to 28
BORDER = 0.04  # border strip (fraction of the short side) that models the background
MIN_ITEM = 0.01   # main component under 1% of the photo: no clear item
MIN_CONTRAST = 8.0  # median |item - background| in gray levels under this: no clear item
NORM_TO = 220.0     # with normalize: the item's 95th percentile lands here (the dataset's items are bright)
WHITE_FLOOR = 40.0  # gray level given to item pixels that are no darker than the background

cv2.setNumThreads(1)  # one image is small; the server parallelises across requests instead


@dataclass
class RobustOptions:
    """Switches for the ablation; all on is the default pipeline."""
    grabcut: bool = True          # refine the seed mask with GrabCut (off: threshold only)
    main_component: bool = True   # keep the main component (off: every foreground pixel)
    zero_background: bool = True  # set outside-mask pixels to 0 (off: keep what is there)
    polarity: bool = True         # item light on black whichever is darker (off: negate if bg light)
    rect_prior: bool = True       # GrabCut also starts from the inner rectangle as probable item
    seed_k: float = 1.0           # seed threshold, in multiples of the border's own colour spread
    downscale: str = "area"       # area: straight to 28; thumb: area to THUMB, then the paper's
                                  # subsampling; nearest: the subsampling alone (no antialiasing)
    sharpen: float = 0.5          # unsharp-mask amount (the paper: 1.0)
    normalize: bool = False       # stretch the item so its 95th percentile is NORM_TO


@dataclass
class Conversion:
    image: np.ndarray             # (28, 28) uint8, light item on exactly-0 background
    box: tuple[int, int, int, int]  # item box (left, top, right, bottom) in the working image
    negated: bool                 # item was darker than its background
    item_found: bool              # a clear item was segmented
    note: str                     # why not, when item_found is False


def _border_pixels(a: np.ndarray, frac: float = BORDER) -> np.ndarray:
    h, w = a.shape[:2]
    b = max(1, int(round(frac * min(h, w))))
    return np.concatenate([a[:b].reshape(-1, *a.shape[2:]), a[-b:].reshape(-1, *a.shape[2:]),
                           a[b:-b, :b].reshape(-1, *a.shape[2:]), a[b:-b, -b:].reshape(-1, *a.shape[2:])])


def _resize_longest(a: np.ndarray, size: int, interp=cv2.INTER_AREA) -> np.ndarray:
    h, w = a.shape[:2]
    s = size / max(h, w)
    if s >= 1:
        return a
    return cv2.resize(a, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def border_model(lab: np.ndarray, k: int = 4) -> np.ndarray:
    """(k, 3) Lab colours of the border: a floor below and a wall above, a bed sheet and its
    shadow, are each background."""
    border = _border_pixels(lab).astype(np.float32)
    k = min(k, len(border))   # a tiny image has fewer border pixels than colours asked for
    crit = (cv2.TERM_CRITERIA_MAX_ITER + cv2.TERM_CRITERIA_EPS, 10, 1.0)
    cv2.setRNGSeed(0)   # k-means++ seeding: the same photo always gives the same mask
    _, _, centres = cv2.kmeans(border, k, None, crit, 1, cv2.KMEANS_PP_CENTERS)
    return centres


def border_distance(lab: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(..., 3) Lab, (k, 3) float32 colours -> (...) float32 distance to the nearest colour.
    One colour at a time on contiguous colour planes, in place: the same float32 sums as a
    broadcast (..., k, 3) difference without its temporaries, and one sqrt after the min
    (sqrt is monotonic, so the nearest colour and every bit of the result are unchanged)."""
    planes = np.ascontiguousarray(np.moveaxis(lab, -1, 0), dtype=np.float32)   # (3, ...)
    best, acc, tmp = None, np.empty_like(planes[0]), np.empty_like(planes[0])
    for c in centres.astype(np.float32):
        np.subtract(planes[0], c[0], out=acc)
        np.multiply(acc, acc, out=acc)
        for i in (1, 2):
            np.subtract(planes[i], c[i], out=tmp)
            np.multiply(tmp, tmp, out=tmp)
            acc += tmp
        best = acc.copy() if best is None else np.minimum(best, acc, out=best)
    return np.sqrt(best, out=best)


def seed_mask(lab: np.ndarray, seed_k: float = 2.0) -> tuple[np.ndarray, np.ndarray, float]:
    """(h, w, 3) float32 Lab -> (border colours, seed foreground mask, threshold): pixels unlike
    every border colour by more than the border itself varies."""
    centres = border_model(lab)
    d = border_distance(lab, centres)
    spread = float(np.percentile(_border_pixels(d), 90))
    # Far beyond what the border itself varies by, and at least a visible step (Lab units ~ 1 JND).
    thr = max(seed_k * spread, 10.0)
    return centres, d > thr, thr


def grabcut(rgb: np.ndarray, seed: np.ndarray, iters: int = GRABCUT_ITERS, rect_prior: bool = False) -> np.ndarray:
    """Refine `seed` with GrabCut; border = sure background. Falls back to the seed on failure."""
    h, w = seed.shape
    gc = np.where(seed, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    b = max(1, int(round(BORDER * min(h, w))))
    gc[:b], gc[-b:], gc[:, :b], gc[:, -b:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
    if rect_prior:
        i = max(1, int(round(0.08 * min(h, w))))
        inner = np.zeros_like(seed)
        inner[i:h - i, i:w - i] = True
        gc[inner] = cv2.GC_PR_FGD
    elif seed.mean() < 0.05:
        # Little stands out (white on white, or an item that fills the frame and shares the
        # border's colours): let GrabCut look for an item in the middle, as its rectangle mode does.
        gc[h // 6: h - h // 6, w // 6: w - w // 6] = cv2.GC_PR_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), gc, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return seed
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Background = what the outside reaches; everything else (holes included) is the item."""
    h, w = m.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = m
    ff = pad.copy()
    cv2.floodFill(ff, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)
    return (ff != 2)[1:-1, 1:-1]


def main_component(m: np.ndarray) -> np.ndarray:
    """The largest-and-most-central component, holes filled, plus big pieces inside its box
    (a garment split by a belt or a fold). Small specks, text and badges elsewhere drop out."""
    n, lab, stats, cents = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 1:
        return m
    h, w = m.shape
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    off = np.hypot((cents[1:, 0] - w / 2) / w, (cents[1:, 1] - h / 2) / h)   # 0 centre .. ~0.7 corner
    best = int(np.argmax(area * (1.0 - off) ** 2)) + 1
    x, y, bw, bh = stats[best, :4]
    keep = [best]
    for i in range(1, n):
        if i == best or stats[i, cv2.CC_STAT_AREA] < 0.05 * area[best - 1]:
            continue
        cx, cy = cents[i]
        if x <= cx <= x + bw and y <= cy <= y + bh:
            keep.append(i)
    return _fill_holes(np.isin(lab, keep))


def clean(m: np.ndarray) -> np.ndarray:
    """Open (drop specks and thin lines such as text strokes), then close (bridge small gaps)."""
    k = max(3, (min(m.shape) // 64) | 1)
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    m = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_OPEN, ker)
    return cv2.morphologyEx(m, cv2.MORPH_CLOSE, ker).astype(bool)


def item_mask(rgb_small: np.ndarray, opt: RobustOptions) -> tuple[np.ndarray, np.ndarray, float]:
    """-> (item mask at the small size, border colours, seed threshold)."""
    lab = cv2.cvtColor(rgb_small, cv2.COLOR_RGB2LAB).astype(np.float32)
    centres, seed, thr = seed_mask(lab, seed_k=opt.seed_k)
    seed = clean(seed)
    m = grabcut(rgb_small, seed, rect_prior=opt.rect_prior) if opt.grabcut else seed
    if m.sum() < 0.25 * seed.sum():
        # GrabCut gave the item away to a background of the same colours (a brown bag on a
        # brown floor): the seed, which only says "unlike every border colour", is the better guess.
        m = seed
    m = clean(m)
    return (main_component(m) if opt.main_component else m), centres, thr


def refine_edges(mask: np.ndarray, rgb: np.ndarray, centres: np.ndarray, thr: float, band: int) -> np.ndarray:
    """The mask comes up from SEG px with blocky edges; within `band` px of them, a pixel is item
    if it is unlike every border colour (at the working size), else it keeps the coarse call."""
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    m8 = mask.astype(np.uint8)
    inner, outer = cv2.erode(m8, ker) > 0, cv2.dilate(m8, ker) > 0
    edge = outer & ~inner
    # Only the band's pixels need a colour distance: convert and measure those alone, as one
    # (1, n, 3) row (RGB -> Lab is per pixel, so each value is what the whole image's gives).
    idx = np.flatnonzero(edge)       # flat indices + take: several times faster than rgb[edge]
    lab = cv2.cvtColor(rgb.reshape(-1, 3).take(idx, axis=0)[None], cv2.COLOR_RGB2LAB)[0]
    d = border_distance(lab, centres)
    out = inner.copy()
    out[edge] = (d > thr) | (mask[edge] & (d > 0.5 * thr))
    return out


def to_28(v: np.ndarray, downscale: str = "area", sharpen: float = 1.0) -> np.ndarray:
    """(h, w) float item crop, 0 = background -> (28, 28) float, longest side 28, centred.
    downscale: area, thumb or nearest (RobustOptions)."""
    h, w = v.shape
    s = IMAGE_SIZE / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    if downscale == "area":
        v = cv2.resize(v, (nw, nh), interpolation=cv2.INTER_AREA)
    else:
        if downscale == "thumb":
            v = _resize_longest(v, THUMB, cv2.INTER_AREA)
        v = cv2.resize(v, (nw, nh), interpolation=cv2.INTER_NEAREST)   # the paper's subsampling
    if sharpen:
        # The paper's sharpening: Gaussian unsharp mask, sigma 1.0.
        blur = cv2.GaussianBlur(v, (0, 0), 1.0, borderType=cv2.BORDER_CONSTANT)
        v = v + sharpen * (v - blur)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    y0, x0 = (IMAGE_SIZE - nh) // 2, (IMAGE_SIZE - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = v
    return out


def _middle(x: np.ndarray) -> np.ndarray:
    """The middle value(s) of non-empty x, twice when x.size is odd: np.median(x) is their mean,
    and for a monotonic f, np.median(f(x)) is np.median(f(middle)), bit for bit (the same
    elements land in the middle), without applying f to every element or partitioning again."""
    k = [(x.size - 1) // 2, x.size // 2]
    return np.partition(x, k)[k]


def _relative(gray: np.ndarray, bg: float, negated: bool) -> np.ndarray:
    """Intensity relative to the background, item light: 0 at the background level."""
    if negated:      # dark item on light ground: the dataset's case (background white -> 0)
        return (bg - gray) * 255.0 / max(bg, 1.0)
    return (gray - bg) * 255.0 / max(255.0 - bg, 1.0)     # light item on dark ground


def segment(rgb: np.ndarray, opt: RobustOptions | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB -> (the working copy, longest side <= WORK; its item mask), steps 1-4."""
    opt = opt or RobustOptions()
    rgb = _resize_longest(np.ascontiguousarray(rgb), WORK)
    h, w = rgb.shape[:2]
    small = _resize_longest(rgb, SEG)
    m_small, centres, thr = item_mask(small, opt)
    mask = cv2.resize(m_small.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    if mask.any():
        mask = refine_edges(mask, rgb, centres, thr, band=int(np.ceil(max(h, w) / SEG)) + 1)
    return rgb, mask


def convert(rgb: np.ndarray, opt: RobustOptions | None = None) -> Conversion:
    """(H, W, 3) uint8 RGB, longest side ~WORK -> Conversion."""
    opt = opt or RobustOptions()
    rgb, mask = segment(rgb, opt)

    item_found, note = True, ""
    frac = float(mask.mean())
    if frac < MIN_ITEM:
        item_found, note = False, "no clear item: nothing stands out from the background"
        mask = np.ones_like(mask) if frac == 0 else mask
    elif frac > 0.97:
        item_found, note = False, "no clear item: no background found around it"

    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))   # 8x cheaper than nonzero
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    # Background level near the item (uneven light: the far border may be brighter or darker).
    ring = ~mask & (cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0)
    bg_px = gray[ring] if ring.sum() >= 20 else _border_pixels(gray)
    bg = float(np.median(bg_px))
    mid = _middle(gray[mask])
    delta = float(np.median(mid)) - bg
    if opt.polarity:
        negated = delta < 0
    else:
        negated = float(np.median(_border_pixels(gray))) > 127.5
    # Only the item's box reaches the output: work on that crop from here on.
    l, t, r, b = box
    v, mask = _relative(gray[t:b, l:r], bg, negated), mask[t:b, l:r]
    if abs(delta) < MIN_CONTRAST and item_found:
        item_found, note = False, "no clear item: it hardly differs from the background"
    if opt.zero_background:
        # Outside the mask is exactly 0, as in the dataset. Inside, the ground showing through
        # (between sandal straps, in a bag's handle) stays dark as the dataset has it; only an
        # item that hardly differs from its ground at all (a white shirt on a white sheet) is
        # lifted to a floor, so its silhouette survives.
        faint = float(np.median(_relative(mid, bg, negated))) < WHITE_FLOOR   # = median(v[mask])
        v = np.where(mask, np.maximum(v, WHITE_FLOOR) if faint else v, 0.0)
    if opt.normalize and mask.any():
        top = float(np.percentile(v[mask], 95))
        v = v * min(NORM_TO / max(top, 1.0), 3.0)
    out = to_28(np.clip(v, 0, 255).astype(np.float32), opt.downscale, opt.sharpen)
    return Conversion(np.clip(out + 0.5, 0, 255).astype(np.uint8), box, negated, item_found, note)
