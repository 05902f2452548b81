"""Batch augmentation as tensor ops: no per-sample Python, runs on whatever device holds x.

All functions take x (B, C, H, W) float and a torch.Generator, so a run is reproducible
and its augmentation stream can be checkpointed and resumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import AugmentConfig


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


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    if cfg.translate:
        x = translate(x, cfg.translate, g)
    if cfg.flip:
        x = flip(x, g)
    if cfg.erase:
        x = erase(x, cfg.erase, g)
    return x
