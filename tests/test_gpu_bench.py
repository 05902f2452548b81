"""scripts/gpu_bench.py, the one-call GPU benchmark, run here on CPU at
tiny sizes (--smoke): what it writes, and that results_tables.py renders it. (`--help` and the
script's start as a program: tests/test_scripts.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def gpu_bench(tmp_path, *args):
    """`scripts/gpu_bench.py --smoke ARGS` through its main() in this process (torch and the
    package are imported already), its log captured; torch's thread count restored after."""
    import contextlib
    import io
    import runpy

    import torch

    main = runpy.run_path(str(ROOT / "scripts" / "gpu_bench.py"))["main"]
    err, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(["--smoke", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), *args])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err.getvalue()
    return json.loads((tmp_path / "gpu_bench.json").read_text()), err.getvalue()


def test_gpu_bench_shortens_best_gpu_to_its_budget_and_writes_json(tmp_path, dataset):
    report, log = gpu_bench(tmp_path, "--parts", "probe,best-gpu", "--budget", "1")
    assert "running best-gpu@1" in log  # 2 smoke epochs do not fit 1 s: a 1-epoch schedule, said so
    assert set(report["probe"]) == {"fast", "gpu", "best-gpu"} and report["probe"]["best-gpu"]["model"] == "wrn"
    run = report["final"]["best-gpu@1"]   # a plain `fmnist train` run: no test pass after each epoch
    assert run["epochs"] == 1 and 0 <= run["final_test_acc"] <= 1 and len(run["val_curve"]) == 1
    assert run["wall_seed_epochs"] == run["wall_seconds"] / report["reference"]["seconds"]
    assert "seconds_after" in report["reference"] and "accuracy" not in report or not report["accuracy"]
    assert report["environment"]["device"] == "cpu" and report["sittings"][0]["smoke"] is True
    md = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_tables.py"), str(tmp_path / "gpu_bench.json")],
                        capture_output=True, text=True, check=True).stdout
    assert "| `best-gpu@1` | 0 | 1 |" in md


@pytest.mark.slow
def test_whole_gpu_bench_in_smoke_mode(tmp_path, dataset):
    """Every part (torch.compile for real, ~1 minute here); a second call adds to the same file."""
    report, _ = gpu_bench(tmp_path)
    assert set(report["accuracy"]) == {"fast", "gpu", "gpu --compile --compile-mode reduce-overhead"}
    assert set(report["final"]) == {"best-gpu"} and not report.get("failed")
    assert report["accuracy"]["gpu"]["summary"]["n"] == 3 and "skipped" in report["syncs"]  # CUDA only
    report, _ = gpu_bench(tmp_path, "--parts", "fast")
    assert len(report["sittings"]) == 2 and "best-gpu" in report["final"]
