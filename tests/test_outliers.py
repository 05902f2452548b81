"""Outlier exposure: photos of no class of ours (photos/outliers) train towards "unsure"."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmnist import realphotos
from fmnist.config import TrainConfig
from fmnist.train import OUTLIER, photo_loss, real_training_images

OUTLIERS = Path(__file__).resolve().parent.parent / "photos" / "outliers"


def test_outlier_rows_are_pulled_to_uniform_and_class_rows_keep_cross_entropy():
    cfg = TrainConfig(label_smoothing=0.1, outlier_weight=0.5)
    logits = torch.tensor([[3.0, 0.0, -1.0, 0, 0, 0, 0, 0, 0, 0],   # a T-shirt
                           [0.0] * 10])                            # an outlier, already uniform
    y = torch.tensor([0, OUTLIER])
    ce = F.cross_entropy(logits[:1], y[:1], label_smoothing=0.1)
    assert torch.isclose(photo_loss(logits, y, cfg), (ce + 0.5 * math.log(10)) / 2)
    # a confident outlier costs more than a uniform one, and its gradient lowers the top logit
    sure = torch.tensor([[8.0] + [0.0] * 9], requires_grad=True)
    loss = photo_loss(sure, torch.tensor([OUTLIER]), cfg)
    assert loss > 0.5 * math.log(10)
    loss.backward()
    assert sure.grad[0, 0] > 0 and (sure.grad[0, 1:] < 0).all()


def test_outlier_folder_trains_its_train_split_as_outliers_and_never_its_heldout_hats():
    photos = realphotos.read_manifest(OUTLIERS)
    assert {p.label for p in photos} == {realphotos.NONE}
    assert {p.split for p in photos} == {"train", "heldout"}
    real = OUTLIERS.parent / "real"
    n_dev = len(realphotos.select(realphotos.read_manifest(real, verify=False), "dev"))
    n_train = sum(p.split == "train" for p in photos)
    x, y = real_training_images(f"{real},{OUTLIERS}")
    assert x.shape == (n_dev + n_train, 28, 28)
    assert (y[:n_dev] >= 0).all() and (y[n_dev:] == OUTLIER).all()
    with pytest.raises(ValueError, match="no dev- or train-split photos of a class"):
        real_training_images(str(OUTLIERS))   # outliers alone teach nothing to classify
