"""Crash safety and scale-out on CPU: kill -9 mid-epoch then resume == uninterrupted;
2-process gloo DDP == 1 process with the same global batch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmnist.models import checkpoint

def train_cmd(args, out, *extra):
    return [sys.executable, "-m", "fmnist", "train", *args, "--out-dir", str(out), *extra]


def only_run(d: Path) -> Path:
    (run,) = [p for p in d.iterdir() if p.is_dir()]
    return run


def history(run: Path) -> list[dict]:
    import csv

    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, fast_run, cli):
    """The shared fast-style run (conftest.FAST_RUN_ARGS: augmentation stream, one-cycle, EMA,
    BatchNorm) again in a process of its own, killed during epoch 2 and resumed here, must end
    bit-identical to it."""
    reference = fast_run.run
    ref = checkpoint.load(reference / "last.pt")
    crash_out = tmp_path / "crash"
    proc = subprocess.Popen(train_cmd(fast_run.args, crash_out))
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until epoch 1 is on disk, then kill during epoch 2
        runs = list(crash_out.glob("*/history.csv"))
        if runs and len(runs[0].read_text().splitlines()) == 2:
            break
        time.sleep(0.05)
    time.sleep(0.3)  # an epoch takes 0.5-2 s (1,000 images), by machine
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(crash_out)
    assert checkpoint.load(run / "last.pt")["epoch"] == 1, "the kill should land during epoch 2"
    # checkpoint.load above read last.pt whole: the kill left the previous complete file, not half a new one.

    # Epoch 1 came from the killed process, epoch 2 from this one: the same result as the reference
    # says nothing a process carries over (imports, torch settings, earlier tests) changes the numbers.
    r = cli("train", "--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    got = checkpoint.load(run / "last.pt")
    assert got["epoch"] == 2 and got["step"] == ref["step"] == fast_run.steps
    for part in ("state_dict", "ema"):  # weights, BatchNorm statistics, and the EMA copy of both
        for k in ref[part]:
            assert torch.equal(ref[part][k], got[part][k]), (part, k)
    # fast's Lookahead: its slow weights went on from last.pt (the stem's whitening is in state_dict).
    assert len(ref["lookahead"]) == len(got["lookahead"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(ref["lookahead"], got["lookahead"]))
    assert ref["state_dict"]["features.0.0.white.weight"].any()
    # The one-cycle schedule went on where it stopped: every epoch's lr, loss and accuracy as uninterrupted.
    same = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")
    assert [[h[k] for k in same] for h in history(run)] == [[h[k] for k in same] for h in history(reference)]

    # --resume --epochs N would re-lay a one-cycle schedule under the steps already taken: refused.
    r = cli("train", "--resume", run, "--epochs", "4")
    assert r.returncode == 1 and "onecycle" in r.stderr and "leave out --epochs" in r.stderr, r.stderr
    assert checkpoint.load(run / "last.pt")["step"] == fast_run.steps


def test_resume_with_more_epochs_extends_a_constant_lr_run(tmp_path, tiny_run, dataset):
    """A constant learning rate does not depend on the run's length, so --epochs may extend it."""
    from fmnist.training.config import TrainConfig
    from fmnist.training.train import train

    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = checkpoint.load(run / "last.pt")
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(resume=str(run), epochs=3))  # the run's own --threads 1 ...
    finally:
        torch.set_num_threads(threads)  # ... not for the rest of this test process
    after = checkpoint.load(run / "last.pt")
    assert before["epoch"] == 2 and after["epoch"] == 3 and after["step"] == before["step"] * 3 // 2
    assert {h["lr"] for h in history(run)} == {"0.001"}
    with pytest.raises(ValueError, match="not shorten"):
        train(TrainConfig(resume=str(run), epochs=1))


def test_resume_rejects_changed_settings_and_missing_state(tmp_path, cli):
    r = cli("train", "--resume", tmp_path, "--lr", "0.1", "--arch", "wide")
    assert r.returncode == 1 and "drop --arch, --lr" in r.stderr
    r = cli("train", "--resume", tmp_path, "--preset", "seed")
    assert r.returncode == 1 and "drop --preset" in r.stderr
    r = cli("train", "--resume", tmp_path)
    assert r.returncode == 1 and "no last.pt to resume from" in r.stderr


def test_truncated_last_checkpoint_gets_clear_error_on_resume(tmp_path, tiny_run, cli):
    run = tmp_path / "run"
    run.mkdir()
    data = (tiny_run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    r = cli("train", "--resume", run)
    assert r.returncode == 1 and "truncated or corrupt" in r.stderr


def test_ddp_two_processes_match_one(tmp_path, fast_run):
    """Same global batch (64), BatchNorm and EMA: the same optimizer steps, and accuracy within noise.
    (The fast model covers the whole DDP path; the seed model's case added nothing but 30 s.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "fmnist", "train", *fast_run.args, "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    multi, reference = only_run(tmp_path), fast_run.run
    s1 = json.loads((reference / "train_summary.json").read_text())
    s2 = json.loads((multi / "train_summary.json").read_text())
    assert s1["steps"] == s2["steps"] == fast_run.steps
    assert json.loads((multi / "environment.json").read_text())["world_size"] == 2
    a1 = json.loads((reference / "metrics.json").read_text())["test_acc"]
    a2 = json.loads((multi / "metrics.json").read_text())["test_acc"]
    print(f"1 process {a1:.4f}, 2 processes {a2:.4f} test accuracy after {s1['steps']} steps")
    assert a1 > 0.6 and a2 > 0.6 and abs(a1 - a2) < 0.05   # 2 epochs on 1,000 images: chance is 0.1
    assert len(list(tmp_path.iterdir())) == 1  # rank 0 alone writes


def test_a_run_saved_before_lookahead_existed_resumes_without_it(tmp_path, tiny_run):
    """Its last.pt has no Lookahead state and its config no `lookahead`: today's default (5)
    must not be read into it."""
    from fmnist.training.config import TrainConfig
    from fmnist.training.train import _resume_config

    run = shutil.copytree(tiny_run, tmp_path / "run")
    ckpt = checkpoint.load(run / "last.pt")
    del ckpt["train_config"]["lookahead"]
    checkpoint.save(ckpt, run / "last.pt")
    cfg, _, _ = _resume_config(TrainConfig(resume=str(run)))
    assert cfg.lookahead == 0 and TrainConfig().lookahead == 5
