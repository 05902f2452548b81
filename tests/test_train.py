import json

import pytest
import torch

from fmnist import checkpoint, config
from fmnist.inference import predict_logits
from fmnist.train import lr_at


def test_short_run_learns(tiny_run):
    """2 epochs on 4,000 images: the assignment's CNN must be far above chance (10%)."""
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["test_acc"] > 0.75
    hist = (tiny_run / "history.csv").read_text().splitlines()
    assert len(hist) == 3 and hist[0].startswith("epoch,train_loss")


def test_run_directory_is_complete(tiny_run):
    for name in ("config.json", "environment.json", "history.csv", "best.pt", "last.pt", "metrics.json",
                 "report.md", "curves.png", "confusion_matrix.png", "mistakes.png", "train_summary.json"):
        assert (tiny_run / name).is_file(), name
    env = json.loads((tiny_run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["threads"] >= 1
    report = (tiny_run / "report.md").read_text()
    assert "Ankle boot" in report and "macro avg" in report and "weighted avg" in report
    assert not list(tiny_run.glob("*.tmp")) and not list(tiny_run.glob(".*.tmp"))


def test_checkpoint_round_trip_identical_logits(tiny_run, dataset):
    raw = torch.load(tiny_run / "best.pt", weights_only=True)  # plain data: no pickled code
    assert raw["model"] == "seed" and raw["class_names"][9] == "Ankle boot"
    assert raw["normalization"]["mean"] == pytest.approx(0.2860)
    model, _ = checkpoint.load_model(tiny_run / "best.pt")
    again, _ = checkpoint.load_model(tiny_run)  # a run directory means its best.pt
    x = dataset.test_images[:64]
    assert torch.equal(predict_logits(model, x), predict_logits(again, x))


def test_truncated_checkpoint_gets_clear_error(tiny_run, tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes((tiny_run / "best.pt").read_bytes()[:5000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(bad)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(junk)


def test_onecycle_schedule_shape():
    cfg = config.resolve("fast", {})
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    peak = max(lrs)
    assert peak == pytest.approx(cfg.lr) and lrs[0] < peak / 5 and lrs[-1] < peak / 20


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown config keys"):
        config.from_dict({"epochz": 3})
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        config.resolve("seed", {"epochs": 0})
    with pytest.raises(ValueError, match="unknown preset"):
        config.resolve("slow", {})


def test_seed_preset_is_the_assignment():
    cfg = config.resolve("seed", {})
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.schedule) == \
        ("seed", 20, 64, 1e-3, "adam", "constant")
    assert (cfg.augment.translate, cfg.augment.flip, cfg.augment.erase, cfg.label_smoothing) == (0, False, 0.0, 0.0)


def test_defaults_are_the_fast_preset():
    assert config.resolve("fast", {}) == config.TrainConfig()
