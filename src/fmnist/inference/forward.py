"""Inference on 28x28 uint8 images: the one forward path shared by evaluation, prediction,
serving and calibration. Training imports it; it never imports training."""

from __future__ import annotations

import contextlib

import torch

from fmnist.models.networks import FlipTTA


def bf16_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls/convs run faster than fp32 here: CUDA GPUs with bf16, and CPUs with
    AMX or AVX512-BF16 (measured 2.3x on Sapphire Rapids for `fast`); elsewhere bf16 is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        return bool(cpu and (getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                             or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()))
    return False


def autocast(device: torch.device, amp: str):
    """Mixed precision: bf16 autocast (no loss scaling needed, unlike fp16) where it pays."""
    if amp == "bf16" or (amp == "auto" and bf16_fast(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(x_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(B, 28, 28) uint8 -> (B, 1, 28, 28) float in [0, 1]."""
    x = x_uint8.unsqueeze(1).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def eval_batch_size(device: torch.device) -> int:
    """Images per forward pass when only throughput matters. A GPU wants large batches; a CPU
    wants each layer's activations to stay in cache (a 1024-image batch of `fast`'s first layer
    is 100 MB in fp32): with malloc.keep_freed_memory, the test-set evaluation after training
    took 1.8x less at 128 than at 1024 on the 2-core EPYC (docs/decisions.md)."""
    return 128 if device.type == "cpu" else 1024


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, batch_size: int = 0, tta_flip: bool = False,
                   channels_last: bool = True, amp: str = "off", tta_shift: bool = False) -> torch.Tensor:
    """Logits (N, 10) on the images' device for uint8 images (N, 28, 28); batch_size 0 = the
    device's eval_batch_size. amp='off' (fp32) for reported figures; per-epoch validation uses
    the training precision."""
    model.eval()
    net = FlipTTA(model, shifts=tta_shift) if tta_flip else model   # shifts come with the flip only
    batch_size = batch_size or eval_batch_size(images.device)
    out = []
    for i in range(0, len(images), batch_size):
        x = to_input(images[i:i + batch_size], channels_last)
        with autocast(x.device, amp):
            out.append(net(x).float())
    return torch.cat(out) if out else torch.empty(0, 10)
