"""Outlier exposure: photos of no class of ours (the `outliers` photo set) train towards "unsure"."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import photo_dir
from fmnist.photos import realphotos
from fmnist.training.config import TrainConfig
from fmnist.training.train import BALANCE_CAP, OUTLIER, balanced_repeats, photo_loss, real_training_images



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
    photo_dir("real"), photo_dir("outliers")
    photos = realphotos.read_manifest("outliers")
    assert {p.label for p in photos} == {realphotos.NONE}
    assert {p.split for p in photos} == {"train", "heldout"}
    n_dev = len(realphotos.select(realphotos.read_manifest("real", verify=False), "dev"))
    n_train = sum(p.split == "train" for p in photos)
    x, y = real_training_images("real,outliers")
    assert x.shape == (n_dev + n_train, 28, 28)
    assert (y[:n_dev] >= 0).all() and (y[n_dev:] == OUTLIER).all()
    with pytest.raises(ValueError, match="no dev- or train-split photos of a class"):
        real_training_images("outliers")   # outliers alone teach nothing to classify


def test_balanced_repeats_show_each_class_about_equally_often_and_cap_the_rarest():
    # 40 coats, 10 sandals, 20 sneakers, 1 ankle boot, 5 outliers ("none")
    y = torch.tensor([4] * 40 + [5] * 10 + [7] * 20 + [9] + [OUTLIER] * 5)
    reps = balanced_repeats(y, 20)
    shown = {c: int(reps[y == c].sum()) for c in (4, 5, 7, 9)}
    mean = (40 + 10 + 20 + 1) / 4                                   # the target count per class
    for c, n in ((4, 40), (5, 10), (7, 20)):                         # 355 each (20 * 17.75), up to
        assert abs(shown[c] - 20 * mean) <= n / 2                     # each photo's rounding
    assert shown[9] == 20 * BALANCE_CAP                             # one photo, capped at 4x
    assert (reps[y == OUTLIER] == 20).all()
    assert reps.min() >= 1
    # the real photos' share of an epoch stays about the same: only the cap removes some
    assert abs(int(reps[y >= 0].sum()) - 20 * 71) <= 20 * mean
