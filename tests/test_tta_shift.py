"""--tta-shift: each image and its mirror also moved one pixel left, right, up and down (10 views),
in the final test report, the calibration, predict and export alike."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from fmnist.models import checkpoint
from fmnist.training import config
from fmnist.inference.forward import predict_logits
from fmnist.models.networks import FlipTTA, SHIFTS, shifted
from fmnist.inference.predict import Predictor


def moved(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(N, C, H, W) moved by one pixel, by slicing: the edge the image left is 0."""
    out = torch.zeros_like(x)
    h, w = x.shape[2:]
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, :, dst_y, dst_x] = x[:, :, src_y, src_x]
    return out


def ten_views(model, x: torch.Tensor) -> torch.Tensor:
    views = [x, *(moved(x, dx, dy) for dx, dy in SHIFTS)]
    return torch.stack([model(v) for v in views] + [model(v.flip(3)) for v in views]).mean(0)


@pytest.fixture(scope="module")
def shift_ckpt(tiny_run, tmp_path_factory):
    """The tiny run's model, recorded as trained with flip and shift TTA (nothing else changes)."""
    ckpt = checkpoint.load(tiny_run / "best.pt")
    ckpt["train_config"] = {**ckpt["train_config"], "tta_flip": True, "tta_shift": True}
    path = tmp_path_factory.mktemp("shift") / "best.pt"
    checkpoint.save(ckpt, path)
    return path


def test_shifted_moves_by_one_pixel_and_fills_with_background():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).reshape(2, 1, 5, 6) + 1
    for dx, dy in SHIFTS:
        assert torch.equal(shifted(x, dx, dy), moved(x, dx, dy))


@torch.no_grad()
def test_flip_tta_with_shifts_is_the_mean_of_ten_views(tiny_run, dataset):
    model, _ = checkpoint.load_model(tiny_run / "best.pt")
    x = dataset.test_images[:64, None].float() / 255
    want = ten_views(model, x)
    assert torch.allclose(FlipTTA(model, shifts=True)(x), want, atol=1e-5)
    assert torch.allclose(FlipTTA(model, shifts=True)(x[:1]), want[:1], atol=1e-5)  # a lone image's joint call
    assert not torch.allclose(FlipTTA(model)(x), want, atol=1e-3)                   # and it is not the flip alone


def test_a_model_trained_with_shift_tta_is_served_and_evaluated_with_it(shift_ckpt, dataset, tmp_path):
    from fmnist.evaluation.evaluate import evaluate_checkpoint

    model, ckpt = checkpoint.load_model(shift_ckpt)
    assert checkpoint.trained_with_shift_tta(ckpt)
    x = dataset.test_images[:200]
    with torch.no_grad():
        want = ten_views(model, x[:, None].float() / 255)
    p = Predictor(shift_ckpt)
    np.testing.assert_allclose(p.probabilities(x.numpy()), torch.softmax(want / p.temperature, 1).numpy(), atol=1e-5)
    small = dataclasses.replace(dataset, test_images=x, test_labels=dataset.test_labels[:200])
    m = evaluate_checkpoint(shift_ckpt, device="cpu", dataset=small, out_dir=tmp_path)
    assert m["tta_flip"] and m["tta_shift"]
    assert m["test_acc"] == pytest.approx((want.argmax(1) == small.test_labels).float().mean().item())
    # --no-tta-flip drops both
    bare = evaluate_checkpoint(shift_ckpt, device="cpu", dataset=small, out_dir=tmp_path, tta_flip=False)
    assert not bare["tta_shift"]


def test_export_puts_the_shifts_in_the_graph(shift_ckpt, dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    from fmnist.inference.export import export
    from fmnist.inference.onnx_backend import OnnxModel

    out = export(shift_ckpt, tmp_path / "m.onnx")
    onnx_model = OnnxModel(out)
    assert onnx_model.meta["tta_flip"] and onnx_model.meta["tta_shift"]
    model, _ = checkpoint.load_model(shift_ckpt)
    x = dataset.test_images[:100]
    want = predict_logits(model, x, tta_flip=True, tta_shift=True)
    got = onnx_model.probabilities(x.numpy(), 1.0)
    np.testing.assert_allclose(got, torch.softmax(want, 1).numpy(), atol=1e-4)


def test_tta_shift_needs_the_flip():
    with pytest.raises(ValueError, match="--tta-shift .* needs --tta-flip"):
        config.validate(config.TrainConfig(tta_flip=False, tta_shift=True))


def test_a_run_trained_with_tta_shift_reports_its_final_test_figure_with_it(tmp_path, dataset, monkeypatch):
    """The last epoch's test figure (what `fmnist bench accuracy` reports as final) uses the 10
    views, and the run is calibrated with them. The real images, 300 of the test set (a full
    pass of 10 views at 1 thread would cost more than the training)."""
    import fmnist.training.train
    from fmnist.bench.runner import read_history
    from fmnist.training.train import train

    small = dataclasses.replace(dataset, test_images=dataset.test_images[:300], test_labels=dataset.test_labels[:300])
    monkeypatch.setattr(fmnist.training.train.data, "load", lambda *a, **k: small)
    cfg = config.resolve("fast", {"epochs": 1, "subset": 600, "batch_size": 64, "threads": 1,
                                  "tta_shift": True, "report_test": True, "out_dir": str(tmp_path)})
    run = train(cfg)
    model, ckpt = checkpoint.load_model(run / "last.pt")
    assert checkpoint.trained_with_shift_tta(ckpt)
    (row,) = read_history(run / "history.csv")
    # fast has no EMA: last.pt's weights are the ones evaluated
    logits = predict_logits(model, small.test_images, tta_flip=True, tta_shift=True)
    want = (logits.argmax(1) == small.test_labels).float().mean().item()
    assert float(row["test_acc"]) == pytest.approx(want, abs=1e-4)
    assert float(row["test_acc"]) > 0.5   # it learned (chance: 0.10)
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["temperature"] > 0
