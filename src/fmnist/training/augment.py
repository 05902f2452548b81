"""Batch augmentation as tensor ops: no per-sample Python, runs on whatever device holds x.

All functions take x (B, C, H, W) float and a torch.Generator, so a run is reproducible; the
trainer seeds that generator from (seed, epoch, rank), so a resumed run replays the stream with
no generator state saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmnist.training.config import AugmentConfig


def _rand(n, g, device):
    return torch.rand(n, generator=g, device=g.device).to(device)


def translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to `pad` pixels each way: zero-pad, then crop at a per-image offset."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))                                   # (B, C, H+2p, W+2p)
    dy = (torch.rand(B, generator=g, device=g.device) * (2 * pad + 1)).long().clamp_(max=2 * pad).to(x.device)
    dx = (torch.rand(B, generator=g, device=g.device) * (2 * pad + 1)).long().clamp_(max=2 * pad).to(x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))              # (B, H)
    cols = (dx[:, None] + torch.arange(W, device=x.device))              # (B, W)
    xp = xp.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    mask = _rand(x.shape[0], g, x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def erase(x: torch.Tensor, p: float, g: torch.Generator, scale=(0.02, 0.25)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017): with probability p, zero one rectangle per image
    covering `scale` of its area with aspect ratio in [1/3, 3]."""
    B, C, H, W = x.shape
    dev = x.device
    area = (scale[0] + (scale[1] - scale[0]) * _rand(B, g, dev)) * H * W
    log_r = (torch.rand(B, generator=g, device=g.device).to(dev) * 2 - 1) * torch.log(torch.tensor(3.0))
    ratio = torch.exp(log_r)
    h = torch.sqrt(area * ratio).clamp(1, H).long()
    w = torch.sqrt(area / ratio).clamp(1, W).long()
    y0 = (_rand(B, g, dev) * (H - h + 1)).long()
    x0 = (_rand(B, g, dev) * (W - w + 1)).long()
    apply = _rand(B, g, dev) < p
    r = torch.arange(H, device=dev)[None, :]
    c = torch.arange(W, device=dev)[None, :]
    rm = (r >= y0[:, None]) & (r < (y0 + h)[:, None])                    # (B, H)
    cm = (c >= x0[:, None]) & (c < (x0 + w)[:, None])                    # (B, W)
    mask = (rm[:, :, None] & cm[:, None, :] & apply[:, None, None])[:, None]  # (B, 1, H, W)
    return x.masked_fill(mask, 0.0)


# ---------------------------------------------------------------------------- photo artefacts
#
# What a real photo looks like after robust.py's conversion, imitated on 28x28 dataset images
# (x in [0, 1], item light on exactly-0 background): a slanted or tilted camera (affine), the
# item cut at the frame (zoom past the edge), light falling unevenly across it and its folds,
# prints on the fabric, a soft focus, sensor noise and 8-bit steps, a segmentation mask a
# pixel too wide or too narrow, and the floor that a white item on a white ground is given. Each is applied to a
# random subset of the images; `photo` is the fraction of the batch that gets the treatment.


def _u(B, g, dev, lo, hi):
    return lo + (hi - lo) * _rand(B, g, dev)


def _affine(x, g, p):
    """Rotation +-12 deg, scale 0.8-1.25 (zoom in = item cut at the frame), shear, small shift."""
    B, dev = x.shape[0], x.device
    on = (_rand(B, g, dev) < p).float()
    ang = _u(B, g, dev, -0.21, 0.21) * on
    sc = torch.exp(_u(B, g, dev, -0.22, 0.22) * on)
    asp = torch.exp(_u(B, g, dev, -0.12, 0.12) * on)     # squash: oblique view of a flat item
    sh = _u(B, g, dev, -0.15, 0.15) * on
    tx, ty = _u(B, g, dev, -0.08, 0.08) * on, _u(B, g, dev, -0.08, 0.08) * on
    cos, sin = torch.cos(ang), torch.sin(ang)
    a = torch.stack([torch.stack([cos * asp / sc, (-sin + sh) / sc, tx], 1),
                     torch.stack([sin / sc, cos / asp / sc, ty], 1)], 1)           # (B, 2, 3)
    grid = F.affine_grid(a.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _smooth_field(B, g, dev, lo, hi, H, W, cells=3):
    """Per-image multiplicative field varying smoothly across the image (uneven light)."""
    f = _u(B * cells * cells, g, dev, lo, hi).view(B, 1, cells, cells)
    return F.interpolate(f, size=(H, W), mode="bicubic", align_corners=True).clamp(lo, hi)


def _folds(x, g, p):
    """Up to two soft lines of shade or highlight across the item (folds, creases, seams)."""
    B, _, H, W = x.shape
    dev = x.device
    yy, xx = torch.meshgrid(torch.arange(H, device=dev, dtype=x.dtype), torch.arange(W, device=dev, dtype=x.dtype),
                            indexing="ij")
    out = x
    for _ in range(2):
        on = (_rand(B, g, dev) < p).to(x.dtype)
        th = _u(B, g, dev, 0, 3.1416)
        rho = _u(B, g, dev, 6, 22)
        width = _u(B, g, dev, 0.6, 1.8)
        amp = _u(B, g, dev, -0.5, 0.35) * on                 # negative = darker crease
        d = (xx[None] * torch.cos(th)[:, None, None] + yy[None] * torch.sin(th)[:, None, None]
             - (rho * (torch.cos(th).abs() + torch.sin(th).abs()))[:, None, None])
        # clamped so far-away pixels get exactly 0, not denormals (100x slower arithmetic on CPUs)
        line = torch.exp(-((d / width[:, None, None]) ** 2).clamp_max(20.0))[:, None]  # (B, 1, H, W)
        line = line * (line > 1e-6)
        out = out * (1 + amp[:, None, None, None] * line)
    return out


def _blur(x, g, p):
    """Gaussian blur sigma 0.5-1.0 on a random subset (focus, motion, the resampling chain)."""
    B, C, H, W = x.shape
    dev = x.device
    k = torch.arange(-2, 3, device=dev, dtype=x.dtype)
    sig = _u(B, g, dev, 0.5, 1.0)
    w = torch.exp(-(k[None] / sig[:, None]) ** 2 / 2)
    w = w / w.sum(1, keepdim=True)                                               # (B, 5)
    xb = x.reshape(1, B * C, H, W)
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0)), w.repeat_interleave(C, 0)[:, None, None, :], groups=B * C)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2)), w.repeat_interleave(C, 0)[:, None, :, None], groups=B * C)
    on = (_rand(B, g, dev) < p)[:, None, None, None]
    return torch.where(on, xb.view(B, C, H, W), x)


def _texture(x, g, p):
    """Prints, checks and knit: a random blotchy pattern (7x7 or 14x14 cells, upsampled) multiplied
    into the item, so the model leans on the silhouette rather than on the dataset's smooth fills."""
    B, _, H, W = x.shape
    dev = x.device
    out = x
    for cells in (7, 14):
        on = (_rand(B, g, dev) < p / 2).to(x.dtype)[:, None, None, None]
        amp = _u(B, g, dev, 0.2, 0.6)[:, None, None, None]
        f = _u(B * cells * cells, g, dev, -1, 1).view(B, 1, cells, cells)
        f = F.interpolate(f, size=(H, W), mode="bilinear", align_corners=False)
        out = out * (1 + on * amp * f)
    return out.clamp(0, 1)


def _mask_edge(x, g, p):
    """The segmentation mask a pixel too tight (edge eaten) or too loose (a rim of background)."""
    B = x.shape[0]
    dev = x.device
    support = (x > 0.02).to(x.dtype)
    grow = F.max_pool2d(support, 3, 1, 1)
    shrink = -F.max_pool2d(-support, 3, 1, 1)
    r = _rand(B, g, dev)[:, None, None, None]
    rim = (grow - support) * _u(B, g, dev, 0.03, 0.25)[:, None, None, None]      # leftover ground
    loose = (r < p / 2).to(x.dtype)
    tight = ((r >= p / 2) & (r < p)).to(x.dtype)
    return x * (1 - tight * (support - shrink)) + loose * rim


def refit(x: torch.Tensor, thr: float = 0.05) -> torch.Tensor:
    """Scale and centre each item so its longest side spans the frame, as robust.py's crop does
    (an item the camera tilted or zoomed out still arrives at full size). Empty images pass."""
    B, _, H, W = x.shape
    on = x[:, 0] > thr                                                   # (B, H, W)
    rows, cols = on.any(2), on.any(1)                                    # (B, H), (B, W)
    ar_h, ar_w = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    big = torch.tensor(10_000, device=x.device)
    r0 = torch.where(rows, ar_h, big).amin(1).float()
    r1 = torch.where(rows, ar_h, -big).amax(1).float() + 1
    c0 = torch.where(cols, ar_w, big).amin(1).float()
    c1 = torch.where(cols, ar_w, -big).amax(1).float() + 1
    empty = ~rows.any(1)
    # box in normalised coordinates (-1..1, align_corners=False)
    cy, cx = (r0 + r1) / H - 1, (c0 + c1) / W - 1
    m = torch.maximum((r1 - r0) / H, (c1 - c0) / W)
    m, cx, cy = torch.where(empty, 1.0, m), torch.where(empty, 0.0, cx), torch.where(empty, 0.0, cy)
    z = torch.zeros_like(m)
    a = torch.stack([torch.stack([m, z, cx], 1), torch.stack([z, m, cy], 1)], 1)
    grid = F.affine_grid(a.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * (out > 1e-4)


SHOES = (5, 7, 9)   # Sandal, Sneaker, Ankle boot: photographed as pairs, the dataset shows one


def pairs(x: torch.Tensor, y: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """With probability p, a shoe image becomes a pair: the shoe and its mirror image (a left and
    a right) or a copy, side by side or one behind the other, the pair turned by 0 or ~90 deg
    (toes up, as shoes on a floor are shot from above), then refitted to the frame."""
    B, _, H, W = x.shape
    dev = x.device
    shoe = torch.zeros(B, dtype=torch.bool, device=dev)
    for c in SHOES:
        shoe |= y == c
    on = shoe & (_rand(B, g, dev) < p)
    if not on.any():
        return x
    idx = on.nonzero().squeeze(1)
    xs = x[idx]
    n = len(idx)
    mirror = (_rand(n, g, dev) < 0.5)[:, None, None, None]
    partner = torch.where(mirror, xs.flip(3), xs)
    up = _rand(n, g, dev) < 0.5
    th = torch.where(up, torch.sign(_rand(n, g, dev) - 0.5) * 1.5708, torch.zeros(n, device=dev))
    th = th + _u(n, g, dev, -0.25, 0.25)
    gap = _u(n, g, dev, 0.2, 0.6)                   # offset across the shoe, in half-heights
    slide = _u(n, g, dev, -0.3, 0.3)                # offset along it (one shoe a bit ahead)
    s = 0.55
    cos, sin = torch.cos(th), torch.sin(th)
    out = torch.zeros_like(xs)
    for k, img in ((-1, xs), (1, partner)):
        ox, oy = k * slide * 0.5, k * gap           # centre of this shoe in the pair's frame
        cx, cy = cos * ox - sin * oy, sin * ox + cos * oy
        # output u -> source (1/s) R(-th) (u - c)
        a = torch.stack([torch.stack([cos / s, sin / s, -(cos * cx + sin * cy) / s], 1),
                         torch.stack([-sin / s, cos / s, -(-sin * cx + cos * cy) / s], 1)], 1)
        grid = F.affine_grid(a.to(x.dtype), list(xs.shape), align_corners=False)
        out = torch.maximum(out, F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=False))
    x = x.clone()
    x[idx] = refit(out * (out > 1e-4))
    return x


def photo_artefacts(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """x (B, 1, 28, 28) float in [0, 1] -> the same items as they come out of a real photo.
    A fraction p of the batch gets the treatment (each artefact at its own odds); the rest stays
    as the dataset made it, so the 28x28 test accuracy keeps its clean examples."""
    if p <= 0:
        return x
    sel = (_rand(x.shape[0], g, x.device) < p).nonzero().squeeze(1)
    if not len(sel):
        return x
    x = x.clone()
    x[sel] = _photo(x[sel], g)
    return x


def _photo(x: torch.Tensor, g: torch.Generator, p: float = 0.6) -> torch.Tensor:
    B, _, H, W = x.shape
    dev = x.device
    x = refit(_affine(x, g, p))
    support = (x > 0.02).to(x.dtype)
    # Light: uneven across the item, overall gain and gamma (exposure, grey items on grey ground).
    on = (_rand(B, g, dev) < p)[:, None, None, None]
    field = _smooth_field(B, g, dev, 0.6, 1.25, H, W)
    gain = _u(B, g, dev, 0.7, 1.2)[:, None, None, None]
    gamma = torch.exp(_u(B, g, dev, -0.35, 0.35))[:, None, None, None]
    lit = (x.clamp_min(0) ** gamma) * field * gain
    x = torch.where(on, lit, x)
    x = _folds(x, g, p * 0.6)
    x = _texture(x, g, p * 0.6)
    # A white item on a white ground keeps only robust.py's floor plus its texture.
    white = (_rand(B, g, dev) < p * 0.08)[:, None, None, None]
    x = torch.where(white, support * (40 / 255) + 0.3 * x * (1 - x), x)
    x = _mask_edge(x, g, p * 0.5)
    x = _blur(x, g, p * 0.3)
    # Sensor noise and 8-bit quantisation, on the item only (robust.py zeroes the ground).
    noise = torch.randn(x.shape, generator=g, device=g.device).to(dev) * _u(B, g, dev, 0, 0.04)[:, None, None, None]
    on = (_rand(B, g, dev) < p)[:, None, None, None]
    x = torch.where(on, (x + noise * (x > 0.02)).clamp(0, 1), x)
    return torch.round(x.clamp(0, 1) * 255) / 255   # also flushes tiny values to exactly 0


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator, y: torch.Tensor | None = None) -> torch.Tensor:
    if cfg.pairs and y is not None:
        x = pairs(x, y, cfg.pairs, g)
    if cfg.photo:
        x = photo_artefacts(x, cfg.photo, g)
    if cfg.translate:
        x = translate(x, cfg.translate, g)
    if cfg.flip:
        x = flip(x, g)
    if cfg.erase:
        x = erase(x, cfg.erase, g)
    return x
