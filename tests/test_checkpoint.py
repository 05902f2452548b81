"""Checkpoints that are damaged or hostile: each gets a one-line CheckpointError naming the
file and what to do, in the library and in every command that loads one."""

import pathlib
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fmnist.models import checkpoint
from fmnist.models.checkpoint import CheckpointError
from fmnist.models.networks import create_model, model_config



def _edit(d: dict, changes: dict) -> dict:
    """d with each changed key set, or deleted where the change is None."""
    for k, v in changes.items():
        if v is None:
            del d[k]
        else:
            d[k] = v
    return d


def _ckpt(**changes) -> dict:
    """A real, untrained `seed` checkpoint (what `fmnist train` writes), with some keys changed."""
    torch.manual_seed(0)
    model = create_model("seed", {})
    ck = checkpoint.make("seed", model_config("seed"), model.state_dict(), metrics={}, epoch=1, train_config={})
    return _edit(ck, changes)


def _save(tmp_path, name="bad.pt", **changes):
    p = tmp_path / name
    torch.save(_ckpt(**changes), p)
    return p


def _state(**changes):
    return _edit(dict(_ckpt()["state_dict"]), changes)


def test_good_checkpoint_builds(tmp_path):
    model, ck = checkpoint.load_model(_save(tmp_path, "good.pt"))
    assert ck["model"] == "seed" and model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _first_conv_key():
    return next(k for k, v in _ckpt()["state_dict"].items() if v.ndim == 4)


@pytest.mark.parametrize("changes, expect", [
    ({"model_config": None}, "no 'model_config'"),
    ({"state_dict": None}, "no 'state_dict'"),
    ({"class_names": None}, "no 'class_names'"),
    ({"model": 3}, "'model' is int, expected str"),
    ({"model": "resnet9000"}, "unknown model 'resnet9000'"),
    ({"model_config": {"bogus": 1}}, "bogus"),
])
def test_damaged_structure_is_a_clear_error(tmp_path, changes, expect):
    p = _save(tmp_path, **changes)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and expect in msg and "\n" not in msg
    assert "fmnist train" in msg  # what to do


def test_wrong_shapes_name_the_tensor_and_both_shapes(tmp_path):
    key = _first_conv_key()
    p = _save(tmp_path, state_dict=_state(**{key: torch.zeros(3, 3, 3, 3)}))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and key in msg and "(3, 3, 3, 3)" in msg and "\n" not in msg


def test_missing_and_unexpected_tensors(tmp_path):
    key = _first_conv_key()
    p = _save(tmp_path, state_dict=_state(**{key: None, "extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=rf"missing {key}.*unexpected extra\.weight"):
        checkpoint.load_model(p)


def test_non_tensor_in_state_dict(tmp_path):
    p = _save(tmp_path, state_dict=_state(**{_first_conv_key(): [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a tensor"):
        checkpoint.load_model(p)


def test_pickled_code_is_refused_without_suggesting_weights_only_false(tmp_path):
    p = _save(tmp_path, metrics={"note": pathlib.PurePosixPath("x")})  # a global torch will not unpickle
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "pathlib.PurePosixPath" in msg and "\n" not in msg
    assert "weights_only" not in msg and "False" not in msg and "\x1b" not in msg


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    p = tmp_path / "noise.pt"
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(p)
    msg = str(e.value)
    assert "not a readable checkpoint" in msg and "weights_only" not in msg and "\n" not in msg


@pytest.mark.parametrize("argv", [
    ["predict", "{tmp}/shirt.png", "--checkpoint", "{p}"],
    ["evaluate", "{p}"],
    ["serve", "--checkpoint", "{p}", "--port", "0"],
    ["export", "{p}", "--out", "{tmp}/x.onnx"],
])
def test_commands_give_one_line_errors(tmp_path, argv, cli):
    p = _save(tmp_path, model_config=None)
    Image.new("L", (40, 40), 255).save(tmp_path / "shirt.png")
    argv = [a.format(p=p, tmp=tmp_path) for a in argv]
    if argv[0] == "serve":  # in a process of its own: a regression would start serving, not return
        r = subprocess.run([sys.executable, "-m", "fmnist", *argv], capture_output=True, text=True, timeout=120)
    else:
        r = cli(*argv)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "model_config" in r.stderr and str(p) in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("names, expect", [
    (["T-shirt/top"] * 9, "9 class names for the model's 10 outputs"),
    (["T-shirt/top"] * 11, "11 class names for the model's 10 outputs"),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "'class_names' holds int, expected str"),
])
def test_class_names_must_name_every_output(tmp_path, names, expect):
    """A short list gave an IndexError in predict, and evaluate and export took it silently."""
    p = _save(tmp_path, class_names=names)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and expect in msg and "\n" not in msg and "fmnist train" in msg


@pytest.mark.parametrize("calibration, expect", [
    ({"temperature": 0.0, "threshold": 0.5}, "temperature 0.0"),
    ({"temperature": -1.5, "threshold": 0.5}, "temperature -1.5"),
    ({"temperature": float("nan"), "threshold": 0.5}, "temperature nan"),
    ({"temperature": float("inf"), "threshold": 0.5}, "temperature inf"),
    ({"temperature": "1", "threshold": 0.5}, "temperature '1'"),
    ({"temperature": 1.2, "threshold": float("nan")}, "threshold nan"),
    ({"temperature": 1.2, "threshold": 2.0}, "threshold 2.0"),
])
def test_a_damaged_calibration_is_refused_with_its_repair(tmp_path, calibration, expect):
    """Temperature 0 printed 'nan%' for every prediction, exit 0."""
    p = _save(tmp_path, calibration=calibration)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and expect in msg and "\n" not in msg
    assert f"fmnist calibrate {p}" in msg  # what repairs it
    assert checkpoint.load(p, check_calibration=False)["model"] == "seed"  # what calibrate.py reads it with


def test_fmnist_calibrate_repairs_a_damaged_calibration(tmp_path, cli, dataset):
    # a run of 1,200 validation and 500 test images: calibrate fits on the checkpoint's own split
    # and reports on its own test images, so the repair need not wait for 16,000 images
    p = _save(tmp_path, calibration={"temperature": 0.0, "threshold": 0.5},
              train_config={"val_fraction": 0.02, "test_subset": 500})
    r = cli("calibrate", p)
    assert r.returncode == 0, r.stderr
    cal = checkpoint.load(p)["calibration"]
    assert cal["temperature"] > 0 and cal["fitted_on"] == "validation split (1200 images)"


def test_a_truncated_file_is_one_short_line(tmp_path):
    good = _save(tmp_path, "good.pt").read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(good[:len(good) // 2])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and "truncated or corrupt" in msg and "\n" not in msg
    assert "miniz" not in msg and "high likelihood" not in msg and len(msg) < len(str(p)) + 250, msg


@pytest.mark.parametrize("argv", [
    ["predict", "{tmp}/shirt.png", "--checkpoint", "{p}"],
    ["evaluate", "{p}"],
    ["export", "{p}", "--out", "{tmp}/x.onnx"],
])
@pytest.mark.parametrize("changes, words", [
    ({"class_names": ["T-shirt/top"] * 9}, ["class_names", "9 class names"]),
    ({"calibration": {"temperature": 0.0, "threshold": 0.5}}, ["temperature 0.0", "fmnist calibrate"]),
])
def test_commands_refuse_damaged_class_names_and_calibration(tmp_path, argv, changes, words, cli):
    p = _save(tmp_path, **changes)
    Image.new("L", (40, 40), 255).save(tmp_path / "shirt.png")
    r = cli(*[a.format(p=p, tmp=tmp_path) for a in argv])
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nan%" not in r.stdout, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words), r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_a_model_is_normalised_as_its_checkpoint_says(tmp_path, caplog, tiny_run, dataset):
    """A checkpoint from a version of fmnist with other normalisation constants: the model sees
    its inputs as it did in training (they were once normalised with today's constants, unsaid)."""
    from fmnist.classes import MEAN, STD

    ck = checkpoint.load(tiny_run / "best.pt")
    model = checkpoint.build_model(ck)
    ck["normalization"] = {**ck["normalization"], "mean": 0.5, "std": 0.25}
    torch.save(ck, tmp_path / "other.pt")
    with caplog.at_level("WARNING", logger="fmnist.models.checkpoint"):
        other, _ = checkpoint.load_model(tmp_path / "other.pt")
    assert "normalised with mean 0.5 and std 0.25" in caplog.text and f"uses {MEAN:g} and {STD:g}" in caplog.text
    x = dataset.test_images[:64].unsqueeze(1).float() / 255
    # What today's model must see to normalise x as the checkpoint's constants do: ((x - .5) / .25) * STD + MEAN.
    with torch.no_grad():
        assert torch.allclose(other(x), model((x - 0.5) / 0.25 * STD + MEAN), atol=1e-5)
        assert not torch.allclose(other(x), model(x), atol=1e-2)


@pytest.mark.parametrize("norm, expect", [
    ({"mean": 0.3, "std": 0.0}, "normalization std 0.0 is not > 0"),
    ({"mean": float("nan"), "std": 0.35}, "normalization mean nan"),
    ({"mean": "0.3", "std": 0.35}, "normalization mean '0.3'"),
    ([0.3, 0.35], "'normalization' is list"),
])
def test_a_damaged_normalization_is_refused(tmp_path, norm, expect):
    p = _save(tmp_path, normalization=norm)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(p)
    assert str(e.value).startswith(f"{p}: damaged") and expect in str(e.value)


def test_resume_refuses_a_run_normalised_otherwise(tmp_path, tiny_run, cli):
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    ck = checkpoint.load(run / "last.pt")
    ck["normalization"]["std"] = 0.3
    torch.save(ck, run / "last.pt")
    r = cli("train", "--resume", run)
    assert r.returncode == 1 and "normalised with mean 0.286 and std 0.3" in r.stderr, r.stderr
    assert "finish it with the version of fmnist that started it" in r.stderr
