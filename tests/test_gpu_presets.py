"""The GPU recipes (`gpu`, `best-gpu`) on CPU at tiny sizes: no GPU is needed to run their code
paths, only to measure them. The choice of the gpu preset on CUDA is tested through the
function that makes it, and through `fmnist train` with the device faked."""

import json

import pytest
import torch

from fmnist.training import config
from fmnist.training.train import train

# wrn at full width costs 11.7 GFLOP per training image, minutes on 2 cores: the same network
# family (three stages, the first at 28x28, two residual convs each) at a tiny width.
TINY_WRN = {"stem": 8, "widths": (16, 32, 64)}
# The same for wide. Its bf16 autocast runs natively only on CPUs with AVX512-BF16 or AMX; on
# others (AVX2 machines included) it is emulated, and the full-width network took 400 s here.
TINY_WIDE = {"stem": 8, "widths": (16, 32)}


@pytest.mark.parametrize("device, preset", [("cuda", "gpu"), ("cuda:1", "gpu"), ("cpu", "fast"), ("mps", "fast")])
def test_default_preset_by_device(device, preset):
    assert config.default_preset(device) == preset


def test_train_picks_gpu_preset_on_cuda_unless_told(monkeypatch):
    """`fmnist train` with no --preset on a machine whose device resolves to CUDA (faked: the
    training itself is stubbed out) trains the gpu recipe; --preset still wins."""
    import fmnist.training.train
    from fmnist import cli

    seen = []
    monkeypatch.setattr(fmnist.training.train, "train", lambda cfg: seen.append(cfg))
    # CUDA faked where the device is read, not by replacing runinfo.pick_device: a module first
    # imported during this test (cli imports evaluate lazily) would keep a replaced function for
    # good, and every later test in the worker would then evaluate "on CUDA".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.main(["train"]) == 0 and (seen[-1].preset, seen[-1].batch_size) == ("gpu", 1024)
    assert cli.main(["train", "--preset", "fast"]) == 0 and seen[-1].preset == "fast"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["train"]) == 0 and seen[-1] == config.TrainConfig()


def _val_acc(run_dir):
    return json.loads((run_dir / "train_summary.json").read_text())["best_val_acc"]


def test_gpu_preset_runs_and_learns_on_cpu(tmp_path, dataset):
    """The gpu recipe (wide network at a tiny width, bf16 autocast as on CUDA, AdamW) at batch 64
    on 1,024 images."""
    cfg = config.resolve("gpu", {"subset": 1024, "test_subset": 500, "val_fraction": 0.02, "epochs": 2, "batch_size": 64,
                                 "threads": 1, "amp": "bf16",
                                 "model_config": TINY_WIDE, "out_dir": str(tmp_path)})
    run = train(cfg)
    assert json.loads((run / "config.json").read_text())["model"] == "wide"
    assert _val_acc(run) > 0.5  # 10 classes: chance is 0.1


def test_best_gpu_preset_runs_and_learns_on_cpu(tmp_path, dataset):
    """best-gpu's recipe (28x28 first stage, EMA, erasing, shifts of 2) at a tiny width."""
    cfg = config.resolve("best-gpu", {"subset": 1024, "test_subset": 500, "val_fraction": 0.02, "epochs": 2,
                                      "batch_size": 64, "threads": 1, "model_config": TINY_WRN, "out_dir": str(tmp_path)})
    assert (cfg.model, cfg.ema, cfg.augment.erase) == ("wrn", 0.999, 0.5)
    run = train(cfg)
    saved = json.loads((run / "config.json").read_text())["model_config"]
    assert saved["stem_pool"] is False and saved["res"] == [2, 2, 2]
    assert _val_acc(run) > 0.4
