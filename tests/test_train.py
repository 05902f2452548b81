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


def test_cosine_schedule_warms_up_from_zero_then_anneals_to_zero():
    cfg = config.resolve("fast", {"schedule": "cosine"})  # warm-up: the first 20 % of steps
    lrs = [lr_at(s, 100, cfg) for s in range(101)]
    assert lrs[0] == 0 and lrs[20] == pytest.approx(cfg.lr)
    assert all(a < b for a, b in zip(lrs[:20], lrs[1:21]))   # rising through the warm-up
    assert all(a > b for a, b in zip(lrs[20:], lrs[21:]))    # then falling all the way
    assert lrs[60] == pytest.approx(cfg.lr / 2)              # half way through the decay
    assert lrs[100] == pytest.approx(0, abs=1e-12)


def test_ema_averages_weights_after_a_warm_up_and_copies_buffers():
    from fmnist.models import create_model
    from fmnist.train import EMA

    torch.manual_seed(0)
    model = create_model("fast")  # BatchNorm: running statistics are buffers
    ema = EMA(model, decay=0.9)
    start = [p.clone() for p in ema.model.parameters()]
    assert not any(p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.rand(8, 1, 28, 28))  # moves the BatchNorm statistics
    ema.update(model, step=1)
    d = 2 / 11  # warm-up: min(0.9, (1 + step) / (10 + step)); early weights are not worth keeping
    for e, s0, p in zip(ema.model.parameters(), start, model.parameters()):
        assert torch.allclose(e, d * s0 + (1 - d) * p)
    for be, b in zip(ema.model.buffers(), model.buffers()):
        assert torch.equal(be, b)
    before = [p.clone() for p in ema.model.parameters()]
    ema.update(model, step=10_000)  # long after the warm-up the decay itself applies
    for e, s0, p in zip(ema.model.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * s0 + 0.1 * p)


def test_flip_tta_and_bf16_inference(dataset):
    from fmnist.predict import default_checkpoint

    model, _ = checkpoint.load_model(default_checkpoint())
    x = dataset.test_images[:512]
    plain, mirrored = predict_logits(model, x), predict_logits(model, x.flip(2))  # (N, 28, 28): width is dim 2
    tta = predict_logits(model, x, tta_flip=True)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    bf16 = predict_logits(model, x, tta_flip=True, amp="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, tta)  # bf16 ran, logits come back fp32
    agree = (bf16.argmax(1) == tta.argmax(1)).float().mean().item()
    print(f"bf16 vs fp32 (flip TTA): same class for {agree:.1%} of 512 test images")
    assert agree > 0.98


def _train_compiled(tmp_path):
    from fmnist.train import train

    cfg = config.resolve("fast", {"compile": True, "epochs": 1, "subset": 2000, "batch_size": 64, "out_dir": str(tmp_path),
                                  "tta_flip": False})
    run = train(cfg)
    raw = torch.load(run / "best.pt", weights_only=True)
    assert not [k for k in raw["state_dict"] if k.startswith("_orig_mod.")]  # the plain model's weights
    assert raw["metrics"]["val_acc"] > 0.5  # it learned (chance: 0.10)


def test_compile_trains_and_saves_the_plain_model(tmp_path, dataset, monkeypatch):
    """--compile through TorchDynamo with the eager backend: the graph capture and the training
    loop around a compiled model, without inductor's ~20 s C++ build (the slow test below)."""
    calls = []
    real = torch.compile

    def eager_compile(model, **kw):
        calls.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_compile)
    _train_compiled(tmp_path)
    assert len(calls) == 1


@pytest.mark.slow
def test_compile_with_inductor(tmp_path, dataset):
    _train_compiled(tmp_path)
