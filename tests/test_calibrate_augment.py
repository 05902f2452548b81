"""Photo augmentation, shoe pairs, temperature scaling and the unsure verdict."""

import json

import numpy as np
import pytest
import torch

from fmnist.training import augment
from fmnist.evaluation import calibrate
from fmnist.inference.predict import Predictor


def test_fit_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(z / 2): the fitted T must come out near 2."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g) * 4
    y = torch.multinomial(torch.softmax(z / 2.0, 1), 1, generator=g).squeeze(1)
    assert calibrate.fit_temperature(z, y) == pytest.approx(2.0, rel=0.05)


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_not():
    rng = np.random.default_rng(0)
    n = 20000
    conf = rng.uniform(0.5, 1.0, n)
    right = rng.uniform(size=n) < conf
    labels = np.zeros(n, int)
    probs = np.zeros((n, 10))
    probs[:, 0] = conf
    probs[:, 1] = 1 - conf
    labels[~right] = 1
    assert calibrate.ece(probs, labels) < 0.02
    assert calibrate.ece(probs, np.ones(n, int)) > 0.5     # always wrong, confident


def test_threshold_sits_where_predictions_stop_being_mostly_wrong():
    """Below 0.4 the model is right 20% of the time, above it 95%: the threshold lands near 0.4."""
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, 5000)
    right = rng.uniform(size=5000) < np.where(conf < 0.4, 0.2, 0.95)
    t = calibrate.choose_threshold(conf, right)
    assert 0.3 < t < 0.5


def test_photo_artefacts_keep_range_ground_and_shape(dataset):
    x = dataset.train_images[:256].float()[:, None] / 255
    g = torch.Generator().manual_seed(0)
    y = augment.photo_artefacts(x, 1.0, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)
    empty = torch.zeros(4, 1, 28, 28)
    assert augment.photo_artefacts(empty, 1.0, g).abs().max() == 0    # nothing from nothing


def test_refit_makes_the_item_span_the_frame():
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 10:18, 5:13] = 1.0                   # a small off-centre square
    out = augment.refit(x)
    rows = torch.nonzero(out[0, 0].amax(1) > 0.5).squeeze(1)
    assert rows.max() - rows.min() >= 24          # now (nearly) full height
    assert torch.equal(out[1], x[1])              # empty image untouched


def test_pairs_only_touch_shoes(dataset):
    x = dataset.train_images[:512].float()[:, None] / 255
    y = dataset.train_labels[:512]
    out = augment.pairs(x, y, 1.0, torch.Generator().manual_seed(0))
    shoe = torch.isin(y, torch.tensor(augment.SHOES))
    assert torch.equal(out[~shoe], x[~shoe])
    assert (out[shoe] - x[shoe]).abs().amax(dim=(1, 2, 3)).min() > 0


def test_photo_trained_run_learns_and_is_calibrated(fast_run):
    """The shared short `fast` run has photo artefacts and pairs on: it learns, and best.pt
    carries a temperature and threshold fitted on validation that the Predictor then uses."""
    assert json.loads((fast_run.run / "metrics.json").read_text())["test_acc"] > 0.6   # chance is 0.10
    cal = json.loads((fast_run.run / "calibration.json").read_text())
    assert cal["temperature"] > 0 and 0 < cal["threshold"] < 1
    p = Predictor(fast_run.run)
    assert p.temperature == pytest.approx(cal["temperature"]) and p.threshold == pytest.approx(cal["threshold"])


def test_blank_image_is_unsure_with_a_reason():
    from PIL import Image

    from fmnist.inference.predict import PHOTO_TIP

    p = Predictor()
    r = p.predict([Image.new("RGB", (300, 200), (240, 240, 240))])[0]
    assert r.unsure and "no clear item" in r.reason and r.reason.endswith(PHOTO_TIP)   # and what to do
    assert r.to_dict()["verdict"] == "unsure"
    # A 28x28 dataset-style image was not photographed: no advice about photos when it is unsure.
    p.threshold = 1.01   # every answer under it
    r = p.predict([np.zeros((28, 28), np.uint8)])[0]
    assert r.unsure and r.reason.startswith("low confidence") and PHOTO_TIP not in r.reason


def test_shipped_model_is_calibrated():
    p = Predictor()
    cal = p.meta["calibration"]
    assert cal and cal["test_ece_after"] < cal["test_ece_before"]
