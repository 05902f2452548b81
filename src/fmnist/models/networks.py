"""Model registry. Every model takes float images in [0, 1] shaped (B, 1, 28, 28),
normalises inside, and returns logits (B, 10). Softmax belongs to the loss and the UI.

A model is rebuilt from (name, config dict) alone, which is what checkpoints store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmnist.classes import MEAN, NUM_CLASSES, STD


class Normalize(nn.Module):
    def __init__(self, mean: float = MEAN, std: float = STD):
        super().__init__()
        # Buffers, so they travel with .to(device) and into exported graphs.
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def set_normalization(model: nn.Module, mean: float, std: float) -> None:
    """Every Normalize in `model` (an ensemble's members too) to this mean and std."""
    for m in model.modules():
        if isinstance(m, Normalize):
            m.mean.fill_(mean)
            m.std.fill_(std)


# ---------------------------------------------------------------------------- seed

@dataclass
class SeedConfig:
    leak: float = 0.1  # LeakyReLU(alpha=0.1), as in the assignment
    dropout: tuple[float, float, float, float] = (0.25, 0.25, 0.4, 0.3)
    hidden: int = 128


class SeedNet(nn.Module):
    """The assignment's Keras CNN, layer for layer (356,234 parameters, as model.summary() says).

    Keras MaxPooling2D(padding='same') pads bottom/right; with kernel = stride = 2 that is
    exactly ceil_mode=True: 28 -> 14 -> 7 -> 4.
    """

    def __init__(self, cfg: SeedConfig = SeedConfig()):
        super().__init__()
        d1, d2, d3, d4 = cfg.dropout
        act = lambda: nn.LeakyReLU(cfg.leak)  # noqa: E731
        pool = lambda: nn.MaxPool2d(2, ceil_mode=True)  # noqa: E731
        self.norm = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), act(), pool(), nn.Dropout(d1),     # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), act(), pool(), nn.Dropout(d2),    # (B, 64, 7, 7)
            nn.Conv2d(64, 128, 3, padding=1), act(), pool(), nn.Dropout(d3),   # (B, 128, 4, 4)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 4 * 4, cfg.hidden), act(), nn.Dropout(d4),
            nn.Linear(cfg.hidden, NUM_CLASSES),
        )
        # Keras defaults: glorot_uniform kernels, zero biases.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        return self.features(self.norm(x))

    def forward_head(self, f):
        return self.head(f)

    def forward_penultimate(self, x):
        """(B, 1, 28, 28) -> (B, hidden): the activations the last Linear reads (feature-space
        scores such as Mahalanobis distance or k-NN use them)."""
        return self.head[:-1](self.forward_features(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- fast

@dataclass
class FastConfig:
    # Width and number of residual 3x3 convs per stage. The stem runs at 28x28 with a single
    # input channel and pools at once: on a CPU a conv costs cin*cout*pixels, and 28x28 has
    # 4x the pixels of 14x14, so the wide convs live at 14x14 and below (measured in bench).
    stem: int = 32
    widths: tuple[int, ...] = (64, 128)
    res: tuple[int, ...] = (1, 1)
    dropout: float = 0.0
    # 2 = space-to-depth stem: each 2x2 patch becomes 4 channels and the stem conv runs at 14x14,
    # so no 28x28 map (whose BatchNorm, ReLU and pooling are memory-bound on a CPU) exists.
    stem_patch: int = 1
    # False: no pooling after the stem, so the first stage runs at 28x28 (28 -> 14 -> 7 -> 4 over
    # three stages, as ResNet-9 does on CIFAR). Costly on a CPU, cheap on a GPU.
    stem_pool: bool = True
    # True: 18 of the stem's filters are frozen patch-whitening filters fitted to the training
    # images before the first step (PatchWhiten); the rest are learned as usual.
    whiten: bool = False


class PatchWhiten(nn.Module):
    """A frozen 3x3 convolution whose 18 filters are the +/- eigenvectors of the covariance of
    3x3 patches of the (normalised) training images, each scaled to unit variance: the first
    layer of airbench (Jordan 2024, after Coates & Ng 2012). From the first step, the layers
    above see decorrelated edges and blobs instead of waiting for a random stem to learn them.
    The filters are a buffer: no optimizer or weight decay touches them, checkpoints carry them.
    The +/- pairs let the ReLU that follows pass both signs of each component."""

    PATCH = 3
    OUT = 2 * PATCH * PATCH

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.zeros(self.OUT, 1, self.PATCH, self.PATCH))

    def forward(self, x):
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.PATCH // 2)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, eps: float = 1e-2) -> None:
        """x: (N, 1, H, W) float images as the layer will see them (normalised)."""
        k = self.PATCH
        patches = F.unfold(x.float(), k, padding=k // 2).transpose(1, 2).reshape(-1, k * k).double()
        patches -= patches.mean(0)
        eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigvec / torch.sqrt(eigval.clamp(min=0) + eps)).T.float()   # (k*k, k*k), a filter per row
        self.weight.copy_(torch.cat([filters, -filters]).reshape(self.OUT, 1, k, k))


class WhitenedStemConv(nn.Module):
    """The stem convolution of FastNet(whiten=True): PatchWhiten's 18 frozen channels beside
    `cout - 18` learned ones, concatenated: the conv of the stem's ConvBN."""

    def __init__(self, cout: int):
        super().__init__()
        if cout <= PatchWhiten.OUT:
            raise ValueError(f"FastConfig: whiten needs a stem wider than {PatchWhiten.OUT}, got {cout}")
        self.white = PatchWhiten()
        self.conv = nn.Conv2d(1, cout - PatchWhiten.OUT, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([self.white(x), self.conv(x)], 1)


class ConvBN(nn.Sequential):
    """3x3 conv, BatchNorm, ReLU; `conv` replaces the conv (the whitened stem's)."""

    def __init__(self, cin, cout, conv: nn.Module | None = None):
        super().__init__(conv or nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = ConvBN(c, c)

    def forward(self, x):
        return x + self.f(x)


class FastNet(nn.Module):
    """A small BatchNorm ResNet-style net tuned for time-to-accuracy on CPUs.

    (B,1,28,28) -> stem conv, pool (14) -> per stage: conv to the stage width, residual
    convs, pool (7, 4) -> global max pool -> linear.
    """

    def __init__(self, cfg: FastConfig = FastConfig()):
        super().__init__()
        if len(cfg.widths) != len(cfg.res):
            raise ValueError(f"FastConfig: widths {cfg.widths} and res {cfg.res} must have the same length")
        if cfg.stem_patch not in (1, 2):
            raise ValueError(f"FastConfig: stem_patch must be 1 (conv + pool) or 2 (space-to-depth), got {cfg.stem_patch}")
        if cfg.whiten and cfg.stem_patch != 1:
            raise ValueError("FastConfig: whiten works on the 3x3 stem conv (stem_patch 1)")
        self.norm = Normalize()
        stem = ConvBN(1, cfg.stem, WhitenedStemConv(cfg.stem) if cfg.whiten else None)
        if cfg.stem_patch == 2:
            layers: list[nn.Module] = [nn.PixelUnshuffle(2), ConvBN(4, cfg.stem)]  # (B, stem, 14, 14)
        elif cfg.stem_pool:
            layers = [stem, nn.MaxPool2d(2)]                                        # (B, stem, 14, 14)
        else:
            layers = [stem]                                                         # (B, stem, 28, 28)
        cin = cfg.stem
        for w, r in zip(cfg.widths, cfg.res):
            layers += [ConvBN(cin, w), *(Residual(w) for _ in range(r)), nn.MaxPool2d(2, ceil_mode=True)]
            cin = w                                                               # 14 -> 7 -> 4
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward_features(self, x):
        return self.features(self.norm(x))

    def forward_head(self, f):
        # Global max pool: measured better than average pooling for these small maps.
        return self.fc(self.drop(F.adaptive_max_pool2d(f, 1).flatten(1)))

    def forward_penultimate(self, x):
        """(B, 1, 28, 28) -> (B, C): the globally max-pooled features the last Linear reads."""
        return F.adaptive_max_pool2d(self.forward_features(x), 1).flatten(1)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- test-time augmentation

SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1))   # (dx, dy) of shift TTA's extra views


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(N, C, H, W) moved by (dx, dy) pixels (at most 1), the uncovered edge filled with 0: the
    dataset's background, also after normalisation inside the model, which sees raw [0, 1]."""
    return torch.roll(F.pad(x, (1, 1, 1, 1)), shifts=(dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]


class FlipTTA(nn.Module):
    """A model averaged over each image and its mirror (clothes are left/right symmetric enough),
    and with `shifts` also over both moved one pixel left, right, up and down (10 views, 5x the
    compute: the multi-crop TTA of the fastest CIFAR-10 recipes). Used for evaluation, serving and
    inside exported ONNX graphs alike, so all of them compute the same function."""

    def __init__(self, model: nn.Module, shifts: bool = False):
        super().__init__()
        self.model = model
        self.shifts = shifts

    # Up to this many images, the image and its mirror go through the model as one batch: a lone
    # request's two calls cost about twice one call of two images (per-call overhead), while from
    # ~6 images on one batch of 2N was no faster, and at 16 slower, on the 2-core EPYC. Exported
    # graphs keep the two calls (a traced branch would be fixed at the trace's batch size).
    JOINT_BELOW = 3

    def forward(self, x):
        if self.shifts:
            views = [x, *(shifted(x, dx, dy) for dx, dy in SHIFTS)]
            return sum(self._flip_mean(v) for v in views) / len(views)
        return self._flip_mean(x)

    def _flip_mean(self, x):
        # (the tracer first: reading the batch size while tracing would warn and fix it in the graph)
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() and x.shape[0] < self.JOINT_BELOW:
            a, b = self.model(torch.cat([x, x.flip(3)])).split(len(x))
        else:
            a, b = self.model(x), self.model(x.flip(3))
        if torch.is_autocast_enabled(x.device.type):  # bf16 halves: average in fp32
            a, b = a.float(), b.float()
        return (a + b) / 2


# ---------------------------------------------------------------------------- ensemble

@dataclass
class EnsembleConfig:
    member: str = "fast"          # the members' architecture (a name in REGISTRY)
    member_config: dict = field(default_factory=dict)
    n: int = 3


class Ensemble(nn.Module):
    """Models of one architecture trained from different seeds (`fmnist ensemble`). The output is
    the mean of the members' log-softmax, a normalised geometric mean of their probabilities: a
    logit vector like any model's, so temperature scaling, flip TTA and ONNX export apply as they
    are. Averaging seeds removes much of what one seed's luck adds or takes on real photos."""

    def __init__(self, cfg: EnsembleConfig = EnsembleConfig()):
        super().__init__()
        if cfg.member not in REGISTRY:
            raise ValueError(f"ensemble member {cfg.member!r}: choose from {', '.join(REGISTRY)}")
        if cfg.n < 1:
            raise ValueError(f"an ensemble needs at least 1 member, got n={cfg.n}")
        self.members = nn.ModuleList(create_model(cfg.member, cfg.member_config) for _ in range(cfg.n))

    def forward(self, x):
        return torch.stack([F.log_softmax(m(x).float(), 1) for m in self.members]).mean(0)

    def forward_penultimate(self, x):
        """(B, n * member width): each member's penultimate features, L2-normalised so that
        every member weighs the same, side by side (members' feature bases differ: averaging
        them would mix unrelated units)."""
        return torch.cat([F.normalize(m.forward_penultimate(x).float(), dim=1) for m in self.members], 1)


# ---------------------------------------------------------------------------- registry

@dataclass
class ModelSpec:
    cls: Callable[..., nn.Module]
    config: type
    defaults: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {
    "seed": ModelSpec(SeedNet, SeedConfig),
    "fast": ModelSpec(FastNet, FastConfig),
    "wide": ModelSpec(FastNet, FastConfig, {"stem": 64, "widths": (128, 256), "res": (1, 1), "dropout": 0.1}),
    # wrn: a wide ResNet for GPUs (best-gpu): three stages at 28, 14 and 7 pixels, two residual
    # convs each, 17M parameters; 22x wide's FLOPs per image, too slow for a CPU.
    "wrn": ModelSpec(FastNet, FastConfig, {"stem": 96, "widths": (192, 384, 768), "res": (2, 2, 2),
                                           "dropout": 0.2, "stem_pool": False}),
}
# Not in REGISTRY (what `fmnist train --arch` and `fmnist bench` offer): an ensemble is made from
# trained models by `fmnist ensemble`, never trained as one; checkpoints name it like any model.
ENSEMBLE = "ensemble"
_SPECS = {**REGISTRY, ENSEMBLE: ModelSpec(Ensemble, EnsembleConfig)}


def _coerce(cfg_cls, d: dict):
    """Config dicts come back from JSON/checkpoints with lists where tuples were."""
    known = set(cfg_cls.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cfg_cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def model_config(name: str, overrides: dict | None = None) -> dict:
    if name not in _SPECS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(REGISTRY)}")
    spec = _SPECS[name]
    cfg = _coerce(spec.config, {**spec.defaults, **(overrides or {})})
    return asdict(cfg)


def create_model(name: str, config: dict | None = None) -> nn.Module:
    """Build a registered model; `config` is a full or partial config dict."""
    cfg = model_config(name, config)
    spec = _SPECS[name]
    return spec.cls(_coerce(spec.config, cfg))


def fit_whitening(model: nn.Module, images: torch.Tensor, n: int = 5000) -> bool:
    """Fit every PatchWhiten in `model` (unwrapped) to the first `n` of `images` ((N, 28, 28)
    uint8, the training split), normalised as the model normalises them. -> whether it had any."""
    layers = [m for m in model.modules() if isinstance(m, PatchWhiten)]
    if layers:
        x = images[:n].to(layers[0].weight.device).unsqueeze(1).float().div(255)
        x = model.norm(x) if isinstance(getattr(model, "norm", None), Normalize) else x
        for m in layers:
            m.fit(x)
    return bool(layers)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
