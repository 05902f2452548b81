import json

import pytest
import torch

from fmnist.models import checkpoint
from fmnist.training import config
from fmnist.inference.forward import predict_logits
from fmnist.training.train import lr_at


def test_short_run_learns(tiny_run):
    """2 epochs on 4,000 images: the assignment's CNN must be far above chance (10%). It reports
    on the first 2,000 test images (--test-subset), where it gets ~0.745."""
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["test_acc"] > 0.7 and m["n"] == 2000
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
    from fmnist.models.networks import create_model
    from fmnist.training.train import EMA

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


def test_lookahead_pulls_the_weights_halfway_back_every_k_steps():
    from fmnist.training.train import Lookahead

    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    la = Lookahead(model, k=2)
    seen = []
    for step in range(1, 5):
        model.weight.grad = -torch.ones_like(model.weight)   # each step adds 1
        opt.step()
        la.update(step)
        seen.append(model.weight[0, 0].item())
    # 1; 2 -> halfway back to the slow 0: 1; 2; 3 -> halfway back to the slow 1: 2
    assert seen == [1.0, 1.0, 2.0, 2.0] and la.slow[0][0, 0].item() == 2.0


def test_patch_whitening_decorrelates_the_patches_it_is_fitted_on(dataset):
    from fmnist.models.networks import PatchWhiten

    x = dataset.train_images[:300].unsqueeze(1).float() / 255
    w = PatchWhiten()
    w.fit(x, eps=1e-6)
    y = w(x)
    assert torch.equal(y[:, 9:], -y[:, :9])   # +/- pairs, for the ReLU after
    f = y[:, :9].permute(0, 2, 3, 1).reshape(-1, 9).double()
    f -= f.mean(0)
    cov = f.T @ f / len(f)
    assert torch.allclose(cov, torch.eye(9, dtype=cov.dtype), atol=2e-3), cov


def test_whitened_stem_is_fitted_from_the_data_then_frozen(dataset):
    """fit_whitening fills the stem's frozen filters (zeros until then: an unfitted stem would
    feed the net nothing); a training step moves the learned filters and never these."""
    from fmnist.training.distributed import DistInfo
    from fmnist.models.networks import create_model, fit_whitening
    from fmnist.training.train import epoch_generators, make_optimizer, train_one_epoch

    torch.manual_seed(0)
    model = create_model("fast", {"whiten": True})
    stem = model.features[0][0]
    assert not stem.white.weight.any() and "features.0.0.white.weight" in model.state_dict()
    assert fit_whitening(model, dataset.train_images[:2000]) and stem.white.weight.any()
    assert not fit_whitening(create_model("fast"), dataset.train_images[:10])
    white, learned = stem.white.weight.clone(), stem.conv.weight.clone()
    cfg = config.resolve("fast", {"lookahead": 2, "amp": "off"})
    opt = make_optimizer(model, cfg)
    assert not any(p is stem.white.weight for g in opt.param_groups for p in g["params"])
    train_one_epoch(model, opt, None, dataset.train_images[:512], dataset.train_labels[:512], cfg, epoch=1, step=0,
                    total_steps=8, gen=epoch_generators(0, 1, 0, torch.device("cpu")), dist=DistInfo())
    assert torch.equal(stem.white.weight, white) and not torch.equal(stem.conv.weight, learned)
    with pytest.raises(ValueError, match="stem wider than 18"):
        create_model("fast", {"whiten": True, "stem": 16})


def test_flip_tta_and_bf16_inference(dataset):
    from fmnist.inference.predict import default_checkpoint

    from fmnist.inference.forward import bf16_fast

    model, _ = checkpoint.load_model(default_checkpoint())
    x = dataset.test_images[:128]
    plain, mirrored = predict_logits(model, x), predict_logits(model, x.flip(2))  # (N, 28, 28): width is dim 2
    tta = predict_logits(model, x, tta_flip=True)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    # bf16 is emulated, ~15x slower than fp32, on CPUs without AVX512-BF16 or AMX (AVX2 ones):
    # 16 images there (14 s for 128 on one such core), 128 where it runs natively.
    n = 128 if bf16_fast(torch.device("cpu")) else 16
    bf16 = predict_logits(model, x[:n], tta_flip=True, amp="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, tta[:n])  # bf16 ran, logits come back fp32
    agree = (bf16.argmax(1) == tta[:n].argmax(1)).float().mean().item()
    print(f"bf16 vs fp32 (flip TTA): same class for {agree:.1%} of {n} test images")
    assert agree >= 1 - max(0.02, 1 / n)  # at most one image in 16, 2 % of 128


def _train_compiled(tmp_path):
    from fmnist.training.train import train

    cfg = config.resolve("fast", {"compile": True, "epochs": 1, "subset": 2000, "test_subset": 500, "val_fraction": 0.02,
                                  "batch_size": 64, "out_dir": str(tmp_path),
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

def test_fused_optimizer_on_cuda_only():
    from fmnist.training.train import make_optimizer, optimizer_options

    adamw, sgd = config.resolve("fast", {}), config.resolve("fast", {"optimizer": "sgd"})
    assert optimizer_options(adamw, torch.device("cuda")) == {"fused": True}
    assert optimizer_options(adamw, torch.device("cpu")) == {}
    assert optimizer_options(sgd, torch.device("cuda")) == {}  # Adam(W) only: what the presets use
    opt = make_optimizer(torch.nn.Linear(2, 2), adamw, torch.device("cpu"))
    assert not opt.defaults["fused"] and opt.param_groups[0]["weight_decay"] == adamw.weight_decay


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, dataset):
    """--compile --compile-mode X compiles the model with mode X (torch.compile faked: compiling
    for real costs a minute here; what it does on a GPU is measured there)."""
    from fmnist.training.train import train

    asked = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: asked.append(kw) or model)
    cfg = config.resolve("seed", {"subset": 256, "epochs": 1, "threads": 1, "compile": True,
                                  "compile_mode": "reduce-overhead", "out_dir": str(tmp_path)})
    train(cfg)
    assert asked == [{"mode": "reduce-overhead"}]
    with pytest.raises(ValueError, match="--compile-mode"):
        config.resolve("fast", {"compile_mode": "fastest"})


def test_training_step_never_waits_for_the_device():
    """No host sync per step: in an epoch with shifts, flips, erasing, EMA and a fused optimizer
    (as on CUDA), fmnist's code reads a tensor's value twice, at the end of the epoch, however
    many steps it has. On a GPU each such read would stall the host until the queue drains."""
    import sys

    from fmnist.training.distributed import DistInfo
    from fmnist.models.networks import create_model, model_config
    from fmnist.training.train import EMA, epoch_generators, train_one_epoch

    torch.manual_seed(0)
    cfg = config.resolve("fast", {"batch_size": 16, "ema": 0.999, "erase": 0.5, "translate": 2,
                                  "model_config": {"stem": 8, "widths": (8, 8)}})
    model = create_model(cfg.model, model_config(cfg.model, cfg.model_config)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ema = EMA(model, cfg.ema)
    x, y = torch.randint(0, 256, (24 * 16, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (24 * 16,))
    reads = []
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counted(name):
        def read(self, *a, **kw):
            if "fmnist" in sys._getframe(1).f_code.co_filename:  # our code, not torch's internals
                reads.append((name, sys._getframe(1).f_lineno))
            return originals[name](self, *a, **kw)
        return read

    try:
        for n in names:
            setattr(torch.Tensor, n, counted(n))
        for steps in (4, 24):
            reads.clear()
            train_one_epoch(model, opt, ema, x[:steps * 16], y[:steps * 16], cfg, epoch=1, step=0, total_steps=100,
                            gen=epoch_generators(0, 1, 0, torch.device("cpu")), dist=DistInfo())
            assert len(reads) == 2, (steps, reads)
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


def test_training_commands_keep_freed_memory(tmp_path, tiny_run):
    """`fmnist train` tunes glibc's malloc (fmnist.utils.malloc) and its run records that it did."""
    env = json.loads((tiny_run / "environment.json").read_text())
    assert env["malloc_keeps_freed_memory"] is True


def _interrupt_epoch(monkeypatch, n: int):
    """Ctrl-C during epoch n (earlier epochs train as usual)."""
    import fmnist.training.train

    real, calls = fmnist.training.train.train_one_epoch, []

    def epoch(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(fmnist.training.train, "train_one_epoch", epoch)


TINY = ["--preset", "seed", "--subset", "500", "--test-subset", "500", "--val-fraction", "0.02", "--threads", "1", "--quiet"]


def test_stopped_before_the_first_epoch_saved_nothing_and_says_so(tmp_path, monkeypatch, cli, dataset):
    """No last.pt: there is nothing to resume, so the message must not offer --resume, and the
    run directory (only config.json and environment.json) is removed."""
    _interrupt_epoch(monkeypatch, 1)
    r = cli("train", *TINY, "--epochs", "2", "--out-dir", tmp_path / "runs")
    assert r.returncode == 130
    assert "nothing saved" in r.stderr and "--resume" not in r.stderr, r.stderr
    assert list((tmp_path / "runs").iterdir()) == []


def test_stopped_after_an_epoch_offers_resume(tmp_path, monkeypatch, cli, dataset):
    _interrupt_epoch(monkeypatch, 2)
    r = cli("train", *TINY, "--epochs", "2", "--out-dir", tmp_path / "runs")
    (run,) = (tmp_path / "runs").iterdir()
    assert r.returncode == 130 and (run / "last.pt").is_file()
    assert f"1 complete epoch(s) saved in {run}; continue with `fmnist train --resume {run}`" in r.stderr, r.stderr


def test_last_checkpoint_is_due_by_its_own_cost():
    from fmnist.training.train import SAVE_COST_RATIO, last_due

    assert last_due(1, 9, float("inf"), 0.0)                       # the first epoch: nothing to resume before it
    assert last_due(9, 9, 0.0, 5.0)                                # the final epoch, whatever it costs
    assert not last_due(2, 9, SAVE_COST_RATIO * 0.5 - 0.1, 0.5)    # a 0.5 s save, 4.9 s after the last one
    assert last_due(2, 9, SAVE_COST_RATIO * 0.5, 0.5)


def test_a_lagging_last_checkpoint_is_what_a_stopped_run_offers_and_resumes(tmp_path, monkeypatch, cli, dataset):
    """With saves too dear to repeat (a big model on a fast GPU), last.pt holds epoch 1 while
    best.pt and history.csv go on: a run stopped in epoch 3 says 1 epoch is saved, and --resume
    continues from there to the end. best.pt, ahead of last.pt, is replaced only by an epoch
    better than the one it holds: on a GPU the replayed epoch 2 is not bit-identical, and one a
    little worse than the first epoch 2 once overwrote it (beating only last.pt's history)."""
    import fmnist.training.train

    monkeypatch.setattr(fmnist.training.train, "SAVE_COST_RATIO", 1e9)
    _interrupt_epoch(monkeypatch, 3)
    r = cli("train", *TINY, "--epochs", "3", "--out-dir", tmp_path / "runs")
    (run,) = (tmp_path / "runs").iterdir()
    assert r.returncode == 130 and "1 complete epoch(s) saved" in r.stderr, r.stderr
    assert checkpoint.load(run / "last.pt")["epoch"] == 1 and len(history_rows(run)) == 2
    best = checkpoint.load(run / "best.pt")
    assert best["epoch"] == 2   # epoch 2 beat epoch 1, so the replayed epoch 2 beats last.pt's history too
    # As if epoch 2 had scored more the first time than a replay of it does (on a GPU, replays
    # differ in the last bits): the replay beats last.pt's history but not best.pt.
    best["metrics"]["val_acc"] = 1.0
    checkpoint.save(best, run / "best.pt")
    monkeypatch.undo()
    r = cli("train", "--resume", run)
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(run / "last.pt")["epoch"] == 3 and [h["epoch"] for h in history_rows(run)] == ["1", "2", "3"]
    after = checkpoint.load(run / "best.pt")
    assert (after["epoch"], after["metrics"]["val_acc"]) == (2, 1.0)   # neither replayed epoch was better
    assert "above last.pt's best" in r.stderr, r.stderr


def history_rows(run) -> list[dict]:
    import csv

    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_a_run_that_fails_before_saving_leaves_no_directory(tmp_path, monkeypatch, dataset):
    import fmnist.training.train

    def boom(*a, **kw):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(fmnist.training.train, "train_one_epoch", boom)
    cfg = config.resolve("seed", {"subset": 500, "epochs": 1, "threads": 1, "out_dir": str(tmp_path / "runs")})
    with pytest.raises(RuntimeError, match="out of memory"):
        fmnist.training.train.train(cfg)
    assert list((tmp_path / "runs").iterdir()) == []
