import json
import os
import subprocess
import sys

FMNIST = [sys.executable, "-m", "fmnist"]


def run(*args, **kw):
    return subprocess.run([*FMNIST, *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("data", "train", "evaluate"):
        assert cmd in r.stdout


def test_data_command(dataset):
    r = run("data")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "Ankle boot" in r.stdout and "60000" in r.stdout


def test_train_then_evaluate_end_to_end(tmp_path, dataset):
    r = run("train", "--model", "seed", "--epochs", "1", "--subset", "4000", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "epoch   1/1" in r.stdout and "macro avg" in r.stdout
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "best.pt").is_file()
    out = tmp_path / "eval"
    r = run("evaluate", str(run_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_acc"] > 0.6 and len(m["confusion_matrix"]) == 10


def test_bad_inputs_give_one_line_errors(tmp_path):
    r = run("evaluate", str(tmp_path / "missing.pt"))
    assert r.returncode == 1 and "no such checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = run("train", "--epochs", "0")
    assert r.returncode == 1 and "--epochs must be >= 1" in r.stderr
    r = run("train", "--model", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr



def test_named_data_dir_is_used_or_refused(tmp_path):
    # an empty --data-dir is an error naming the missing files, not a quiet switch to another copy
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c")}
    env.pop("FMNIST_DATA", None)
    r = run("data", "--data-dir", str(tmp_path), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "train-images-idx3-ubyte.gz" in r.stderr and "t10k-labels-idx1-ubyte.gz" in r.stderr
    assert "verified" not in r.stdout
    r = run("train", "--epochs", "1", "--out-dir", str(tmp_path / "runs"), env={**env, "FMNIST_DATA": str(tmp_path / "x")})
    assert r.returncode == 1 and "$FMNIST_DATA" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "runs").exists()  # nothing downloaded, no run started
