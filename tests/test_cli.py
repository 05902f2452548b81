"""The fmnist command. Most cases run `cli.main` in this process (the `cli` fixture); those that
need a process of their own (the entry point, a real server, a closed pipe) start one."""

import json
import os
import subprocess
import sys

import pytest

FMNIST = [sys.executable, "-m", "fmnist"]


def run(*args, timeout=300, **kw):
    return subprocess.run([*FMNIST, *args], capture_output=True, text=True, timeout=timeout, **kw)


def test_help_lists_subcommands():
    r = run("--help")  # also: `python -m fmnist` starts
    assert r.returncode == 0
    for cmd in ("data", "train", "evaluate"):
        assert cmd in r.stdout


def test_data_command(dataset, cli):
    r = cli("data")
    assert r.returncode == 0, r.stderr
    assert "verified" in r.stdout and "Ankle boot" in r.stdout and "60000" in r.stdout


def test_train_then_evaluate_end_to_end(tiny_train, tmp_path, cli):
    """`fmnist train` (the shared run, conftest.tiny_train), then `fmnist evaluate` on its directory."""
    assert "epoch   2/2" in tiny_train.stderr and "macro avg" in tiny_train.stdout  # progress on stderr, report on stdout
    assert tiny_train.stdout.startswith("test accuracy ") and tiny_train.stdout.splitlines()[-1].startswith("report: ")
    out = tmp_path / "eval"
    r = cli("evaluate", tiny_train.run, "--out", out)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_acc"] > 0.6 and len(m["confusion_matrix"]) == 10 and f"report: {out}" in r.stdout
    # the run reported on its --test-subset (the first 2,000 test images); evaluate on all of them
    assert "(2000 images" in tiny_train.stdout and m["n"] == 10000


def test_bad_inputs_give_one_line_errors(tmp_path, cli):
    r = cli("evaluate", tmp_path / "missing.pt")
    assert r.returncode == 1 and "no such checkpoint" in r.stderr
    r = cli("train", "--epochs", "0")
    assert r.returncode == 1 and "--epochs must be >= 1" in r.stderr
    r = cli("train", "--preset", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_named_data_dir_is_used_or_refused(tmp_path, cli, monkeypatch):
    # an empty --data-dir is an error naming the missing files, not a quiet switch to another copy
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    monkeypatch.delenv("FMNIST_DATA", raising=False)
    r = cli("data", "--data-dir", tmp_path)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert "train-images-idx3-ubyte.gz" in r.stderr and "t10k-labels-idx1-ubyte.gz" in r.stderr
    assert "verified" not in r.stdout
    monkeypatch.setenv("FMNIST_DATA", str(tmp_path / "x"))
    r = cli("train", "--epochs", "1", "--out-dir", tmp_path / "runs")
    assert r.returncode == 1 and "$FMNIST_DATA" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "runs").exists()  # nothing downloaded, no run started


# ---------------------------------------------------------------------------- bad paths and ports

DEFAULT_PT = os.path.join(os.path.dirname(__file__), "..", "src", "fmnist", "assets", "default.pt")


def _one_line_error(r, *words, code=1):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and all(w in errors[0] for w in words), r.stderr


def test_train_out_dir_that_is_a_file(tmp_path, cli):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(cli("train", "--epochs", "1", "--out-dir", f), "--out-dir", str(f), "not a directory")
    _one_line_error(cli("train", "--epochs", "1", "--out-dir", f / "sub"), "--out-dir", "not a directory")
    assert f.read_text() == "x"


def test_evaluate_out_that_is_a_file(tmp_path, cli):
    f = tmp_path / "file"
    f.write_text("x")
    _one_line_error(cli("evaluate", DEFAULT_PT, "--out", f), "--out", str(f), "not a directory")


def test_export_out_that_is_a_directory(tmp_path, cli):
    _one_line_error(cli("export", DEFAULT_PT, "--out", tmp_path), "--out", str(tmp_path), "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_serve_port_out_of_range(cli):
    for port in ("99999", "-1"):
        _one_line_error(cli("serve", "--port", port), "--port", "0..65535", code=2)
    _one_line_error(cli("serve", "--max-batch", "0"), "--max-batch", "must be >= 1", code=2)


def test_serve_log_level_is_a_choice(cli):
    """Before: --log-level banana reached uvicorn's config as a KeyError traceback."""
    _one_line_error(cli("serve", "--log-level", "banana"), "--log-level", "banana", "warning", code=2)
    from fmnist import cli as cli_module

    assert cli_module.build_parser().parse_args(["serve", "--log-level", "WARNING"]).log_level == "warning"


def test_serve_max_header_kb_reaches_the_server():
    from fmnist import cli
    from fmnist.serving import app as serve

    args = cli.build_parser().parse_args(["serve", "--max-header-kb", "16"])
    assert serve._config(args).max_head_bytes == 16 << 10


def test_serve_port_in_use():
    """Before: 'serving ... on http://...' first, then uvicorn's multi-line ERROR, exit 3."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--port", str(port), timeout=60)
    _one_line_error(r, f"127.0.0.1:{port}", "Address already in use", "--port")
    assert "serving" not in r.stderr, r.stderr


def test_serve_host_that_cannot_be_bound():
    r = run("serve", "--host", "999.1.1.1", "--port", "0", timeout=60)
    _one_line_error(r, "999.1.1.1", "--host")
    assert "serving" not in r.stderr, r.stderr


def test_closed_stdout_pipe_exits_quietly(dataset):
    """`fmnist data | head -1`: the reader leaves early; no traceback, no 'Exception ignored'."""
    p = subprocess.Popen([*FMNIST, "data"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141, err  # 128 + SIGPIPE, what a shell reports for `cat big | head -1`
    assert err == ""


# ---------------------------------------------------------------------------- train flags

def _train_cfg(monkeypatch, cli, *argv):
    """(result, the TrainConfig `fmnist train ARGV` would train with): training itself stubbed out."""
    import fmnist.training.train

    seen = []
    monkeypatch.setattr(fmnist.training.train, "train", lambda cfg: seen.append(cfg))
    r = cli("train", *argv)
    return r, (seen[0] if seen else None)


def test_train_flags_are_the_config_fields():
    """One source of truth: every train flag sets a TrainConfig field of the same name, every
    field that declares help has a flag, and every flag's help states its default."""
    from dataclasses import fields

    from fmnist import cli
    from fmnist.training import config

    ap = cli.build_parser()
    train_p = ap._subparsers._group_actions[0].choices["train"]
    dests = {a.dest: a for a in train_p._actions if a.dest != "help"}
    names = {f.name for f in fields(config.TrainConfig)} | set(config.AUGMENT_KEYS)
    assert set(dests) - names == {"preset_deprecated", "quiet"}
    flagged = {f.name for f in [*fields(config.TrainConfig), *fields(config.AugmentConfig)] if "help" in f.metadata}
    assert flagged <= set(dests) and "augment" not in dests
    for a in dests.values():
        if a.help != "==SUPPRESS==":
            assert "default" in a.help.lower() or "fast" in a.help, a.option_strings


# A bad value must be refused before anything is trained or written. The safe flags come first
# (the bad one after them wins), so that a regression trains 500 images for one epoch, not a run.
SAFE = ["--subset", "500", "--test-subset", "500", "--val-fraction", "0.02", "--epochs", "1", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("argv, words, code", [
    (["--threads", "-2"], ["--threads", ">= 0", "-2"], 1),
    (["--device", "banana"], ["--device", "banana", "cuda:N"], 1),
    (["--preset", "fast", "--device", "banana"], ["--device", "banana", "cuda:N"], 1),
    (["--device", "cuda:abc"], ["--device", "cuda:abc", "cuda:N"], 1),
    (["--real-photos", "/nonexistent"], ["/nonexistent", "manifest.csv"], 1),
    (["--translate", "-2"], ["--translate", ">= 0", "-2"], 1),
    (["--lr", "inf"], ["--lr", "finite", "inf"], 1),
    (["--lr", "nan"], ["--lr", "nan"], 1),
    (["--erase", "-1"], ["--erase", "[0, 1]", "-1"], 1),
    (["--photo", "5"], ["--photo", "[0, 1]", "5"], 1),
    (["--pairs", "-1"], ["--pairs", "[0, 1]", "-1"], 1),
    (["--weight-decay", "-1"], ["--weight-decay", ">= 0", "-1"], 1),
    (["--outlier-weight", "-1"], ["--outlier-weight", ">= 0", "-1"], 1),
    (["--val-fraction", "0"], ["--val-fraction", "(0, 1)", "0"], 1),
    (["--val-fraction", "0.00001"], ["--val-fraction", "no validation images"], 1),
    (["--arch", "banana"], ["unknown model", "banana"], 1),
    (["--arch", "ensemble"], ["fmnist ensemble", "not trained as one"], 1),
    (["--distill-weight", "1.5"], ["--distill-weight", "[0, 1]", "1.5"], 1),
    (["--distill-temperature", "0"], ["--distill-temperature", "> 0", "0"], 1),
    (["--distill", "/nonexistent"], ["/nonexistent", "no such checkpoint"], 1),
])
def test_bad_train_flags_are_refused_before_a_run_starts(tmp_path, cli, argv, words, code):
    runs = tmp_path / "runs"
    _one_line_error(cli("train", *SAFE, "--out-dir", runs, *argv), *words, code=code)
    assert not runs.exists() or list(runs.iterdir()) == []  # no run directory left behind


def test_preset_and_arch_flags(monkeypatch, cli):
    r, cfg = _train_cfg(monkeypatch, cli, "--preset", "seed", "--epochs", "3", "--arch", "fast", "--no-flip")
    assert r.returncode == 0 and (cfg.preset, cfg.model, cfg.epochs, cfg.batch_size, cfg.augment.flip) == ("seed", "fast", 3, 64, False)


def test_model_flag_is_a_deprecated_preset_alias(monkeypatch, cli):
    r, cfg = _train_cfg(monkeypatch, cli, "--model", "seed")
    assert r.returncode == 0 and cfg.preset == "seed" and cfg.model == "seed"
    assert "warning: --model is deprecated" in r.stderr
    r, cfg = _train_cfg(monkeypatch, cli, "--model", "seed", "--preset", "fast")
    assert r.returncode == 1 and cfg is None and "disagree" in r.stderr


def test_a_command_names_the_extra_it_needs(monkeypatch):
    """Without the serve extra, fmnist serve says which pip extra to install (and starts nothing)."""
    import importlib.util

    from fmnist import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(ImportError, match=r"fmnist serve needs the optional extra: pip install 'fmnist\[serve\]' "
                                          r"\(fastapi not installed\)"):
        cli.cmd_serve(None)
    with pytest.raises(ImportError, match=r"fmnist\[serve\]"):
        cli.need_extra("serve", "fmnist bench serve", *cli.SERVE_MODULES, "httpx")
