"""The not-clothing scores rank far-off inputs below familiar ones, and the measures behind the
detector table compute what they say."""

import numpy as np
import pytest
import torch

from fmnist.inference import notclothing as nc
from fmnist.models.networks import create_model


def test_auroc_and_acceptance_at_kept():
    assert nc.auroc(np.array([3, 4, 5.]), np.array([0, 1, 2.])) == 1.0
    assert nc.auroc(np.array([1.]), np.array([1.])) == 0.5
    pos = np.arange(100.)
    assert nc.threshold_keeping(pos, 0.95) == 4.0   # keeps at least 95 % (here 96 of 100)
    assert nc.accepted_at_kept(pos, np.array([0, 4, 5, 50.])) == 0.75


def test_feature_scores_put_points_far_from_the_classes_below_those_near_them():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 5, (10, 16))
    labels = np.repeat(np.arange(10), 50)
    fit = [means[labels] + rng.normal(0, 1, (500, 16))]
    near = [means[np.arange(20) % 10] + rng.normal(0, 1, (20, 16))]
    far = [rng.normal(0, 1, (20, 16)) * 0.1 + 30]        # far from every class mean
    for score in (nc.Mahalanobis(fit, labels), nc.KNN(fit)):
        assert nc.auroc(score(near), score(far)) > 0.95


@pytest.mark.parametrize("name", ["seed", "fast"])
def test_outputs_give_each_members_logits_and_features(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    logits, feats = nc.outputs(model, images)
    assert len(logits) == 1 and logits[0].shape == (4, 10) and feats[0].ndim == 2
    assert np.allclose(nc.energy(logits), torch.logsumexp(torch.from_numpy(logits[0]), 1).numpy())


def test_a_photo_with_no_item_is_never_accepted_as_clothing():
    """-inf is 'no item found': unsure whatever the threshold, also when over 5 % of the clothing
    photos have it (the threshold keeping 95 % of them is then -inf itself)."""
    pos = np.array([-np.inf] * 10 + list(np.linspace(0, 1, 90)))
    neg = np.array([-np.inf, -np.inf, 0.5, 2.0])
    assert nc.accepted_at_kept(pos, neg, 0.95) == 0.5
    assert nc.accepted_at_kept(np.linspace(0, 1, 100), neg, 0.95) == 0.5
