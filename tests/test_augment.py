"""Batch augmentation (augment.py): each op does what its docstring says, on whole batches,
reproducibly from its generator. (Photo artefacts and shoe pairs: test_calibrate_augment.py.)"""

import torch

from fmnist.training import augment
from fmnist.training.config import AugmentConfig


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dots(n: int = 64) -> torch.Tensor:
    """(n, 1, 28, 28): one bright pixel each, at (10, 12), so any shift is easy to read off."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, 0, 10, 12] = 1.0
    return x


def test_translate_shifts_each_image_by_at_most_pad():
    out = augment.translate(dots(), 2, gen())
    assert out.shape == (64, 1, 28, 28)
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 28 - 10, pos % 28 - 12
    assert out.flatten(1).sum(1).eq(1).all()  # moved, not blurred or lost
    assert dy.abs().max() <= 2 and dx.abs().max() <= 2
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 10  # per-image offsets, not one for the batch


def test_flip_mirrors_about_half_the_batch_exactly():
    x = torch.rand(400, 1, 28, 28)
    out = augment.flip(x, gen())
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (mirrored ^ kept).all() and 140 < mirrored.sum() < 260


def test_erase_zeroes_one_rectangle_per_chosen_image():
    x = torch.ones(200, 1, 28, 28)
    assert torch.equal(augment.erase(x, 0.0, gen()), x)
    out = augment.erase(x, 1.0, gen())
    for img in out[:, 0]:
        rows, cols = (img == 0).any(1).nonzero(), (img == 0).any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert (img == 0).sum() == h * w  # one solid rectangle
        assert 0.02 * 784 * 0.5 <= h * w <= 0.25 * 784 * 1.5  # about the `scale` of the area


def test_augment_is_reproducible_from_its_generator_and_identity_when_off():
    x = torch.rand(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    cfg = AugmentConfig(translate=1, flip=True, erase=0.5, photo=0.5, pairs=0.5)
    a, b = augment.augment(x, cfg, gen(3), y), augment.augment(x, cfg, gen(3), y)
    assert torch.equal(a, b) and not torch.equal(a, augment.augment(x, cfg, gen(4), y))
    off = AugmentConfig(translate=0, flip=False, erase=0.0, photo=0.0, pairs=0.0)
    assert torch.equal(augment.augment(x, off, gen(), y), x)
