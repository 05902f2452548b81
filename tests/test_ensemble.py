"""`fmnist ensemble`: runs of one recipe from different seeds, averaged into one checkpoint that
predict, evaluate and export use like any other; members that do not fit are refused."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, shared_dir
from fmnist.models import checkpoint
from fmnist.inference.forward import predict_logits
from fmnist.inference.predict import Predictor


@pytest.fixture(scope="session")
def second_seed(tmp_path_factory, tiny_train):
    """tiny_run's recipe again with seed 1 on the same validation split (seed 0's), on half as many
    images (members need not match there, and the test suite has a time budget)."""
    def make(d):
        r = run_cli("train", "--preset", "seed", "--epochs", "2", "--subset", "1000", "--test-subset", "2000",
                    "--val-fraction", "0.02", "--threads", "1", "--seed", "1", "--split-seed", "0", "--quiet",
                    "--out-dir", d)
        assert r.returncode == 0, r.stderr
    (run,) = [p for p in shared_dir(tmp_path_factory, "tiny-train-seed1", make).iterdir() if p.is_dir()]
    return run


def counting(fn, images: list):
    """fn (predict_logits), noting how many images each call sends through the model."""
    def wrapped(model, x, *args, **kwargs):
        images.append(len(x))
        return fn(model, x, *args, **kwargs)
    return wrapped


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_run, second_seed, dataset):
    """`fmnist ensemble` of the two tiny runs, counting the images it sends through the members."""
    import fmnist.evaluation.calibrate
    import fmnist.training.ensemble
    import fmnist.evaluation.evaluate
    from fmnist.cli import main

    out = tmp_path_factory.mktemp("ens") / "ensemble"
    images = []
    with pytest.MonkeyPatch.context() as mp:
        for mod in (fmnist.training.ensemble, fmnist.evaluation.evaluate, fmnist.evaluation.calibrate):
            mp.setattr(mod, "predict_logits", counting(mod.predict_logits, images))
        assert main(["ensemble", str(tiny_run), str(second_seed), "--out", str(out)]) == 0
    return SimpleNamespace(out=out, members=[tiny_run, second_seed], images=images)


def test_the_ensemble_runs_each_split_through_its_members_once(made, dataset):
    """val_acc, the report and the calibration share one pass over the validation split and one
    over the test images the members were measured on (they were two each)."""
    assert sorted(made.images) == [1200, 2000]   # their validation split; the members' 2,000 test images


def test_the_ensemble_is_the_mean_of_its_members_log_probabilities(made, dataset):
    x = dataset.test_images[:500]
    members = [checkpoint.load_model(r / "best.pt")[0] for r in made.members]
    want = torch.stack([F.log_softmax(predict_logits(m, x), 1) for m in members]).mean(0)
    model, ckpt = checkpoint.load_model(made.out)
    assert ckpt["model"] == "ensemble" and ckpt["model_config"]["n"] == 2
    assert torch.allclose(predict_logits(model, x), want, atol=1e-5)
    # and that is what predict serves: softmax of it over the refitted temperature
    p = Predictor(made.out)
    assert p.temperature == ckpt["calibration"]["temperature"] != 1.0
    np.testing.assert_allclose(p.probabilities(x.numpy()), torch.softmax(want / p.temperature, 1).numpy(), atol=1e-5)


def test_the_ensemble_learned_and_reports_like_a_run(made):
    m = json.loads((made.out / "metrics.json").read_text())
    member_acc = [json.loads((r / "metrics.json").read_text())["test_acc"] for r in made.members]
    assert m["test_acc"] > 0.7, m["test_acc"]   # 2 epochs on 2,000 and 1,000 images: chance is 0.1
    assert m["test_acc"] >= min(member_acc) - 0.01, (m["test_acc"], member_acc)
    assert (made.out / "report.md").is_file() and (made.out / "calibration.json").is_file()
    members = json.loads((made.out / "members.json").read_text())
    assert [r["seed"] for r in members] == [0, 1]
    summary = json.loads((made.out / "train_summary.json").read_text())
    assert summary["members"] == 2 and summary["train_seconds"] > 0
    ckpt = checkpoint.load(made.out / "best.pt")
    assert 0.5 < ckpt["metrics"]["val_acc"] <= 1 and ckpt["train_config"]["split_seed"] == 0


def test_predict_takes_the_ensemble(made, dataset, tmp_path, cli):
    from PIL import Image

    Image.fromarray(dataset.test_images[0].numpy()).save(tmp_path / "t.png")
    r = cli("predict", tmp_path / "t.png", "--checkpoint", made.out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["top"][0]["probability"] > 0


def test_export_holds_the_whole_ensemble(made, dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    from fmnist.inference.export import export

    path = export(made.out / "best.pt", tmp_path / "e.onnx")
    x = dataset.test_images[:200].numpy()
    torch_p = Predictor(made.out)
    onnx_p = Predictor(path, backend="onnx")
    assert onnx_p.temperature == torch_p.temperature   # the calibration travels in the file's metadata
    np.testing.assert_allclose(onnx_p.probabilities(x), torch_p.probabilities(x), atol=1e-4)


def test_members_that_do_not_fit_are_refused(tiny_run, second_seed, fast_run, tmp_path, cli):
    for runs, says in (([tiny_run], "at least 2 runs"),
                       ([tiny_run, tiny_run / "best.pt"], "more than once"),
                       ([second_seed, fast_run.run], "architecture")):
        r = cli("ensemble", *runs, "--out", tmp_path / "e")
        assert r.returncode == 1 and says in r.stderr, r.stderr
        assert not (tmp_path / "e" / "best.pt").exists()
    (tmp_path / "f").write_text("not a directory")
    r = cli("ensemble", tiny_run, second_seed, "--out", tmp_path / "f")
    assert r.returncode == 1 and "is a file" in r.stderr, r.stderr


def test_members_on_different_validation_splits_are_refused_for_calibration(tiny_run):
    from fmnist.training.ensemble import EnsembleError, check_members

    a = checkpoint.load(tiny_run / "best.pt")
    b = {**a, "train_config": {**a["train_config"], "seed": 1, "split_seed": -1}}   # seed 1's own split
    with pytest.raises(EnsembleError, match="--split-seed"):
        check_members([(tiny_run / "a.pt", a), (tiny_run / "b.pt", b)])
    check_members([(tiny_run / "a.pt", a), (tiny_run / "b.pt", b)], calibrated=False)   # accuracy only


def test_members_normalised_otherwise_are_refused(tiny_run):
    """The ensemble normalises once for all its members (models.Normalize in each, set from the
    one checkpoint): members trained on differently normalised inputs cannot share it."""
    from fmnist.training.ensemble import EnsembleError, check_members

    a = checkpoint.load(tiny_run / "best.pt")
    b = {**a, "normalization": {**a["normalization"], "mean": 0.3}}
    with pytest.raises(EnsembleError, match=r"its normalisation \(mean 0.3, std 0.353\)"):
        check_members([(tiny_run / "a.pt", a), (tiny_run / "b.pt", b)], calibrated=False)


def test_split_seed_picks_the_validation_split():
    from fmnist.data import split_seed

    assert split_seed({"seed": 3}) == 3                       # saved before split_seed existed
    assert split_seed({"seed": 3, "split_seed": -1}) == 3
    assert split_seed({"seed": 3, "split_seed": 0}) == 0


def test_a_network_distilled_from_the_ensemble_learns(made, tmp_path, cli):
    """--distill: the tiny recipe again, also pulled towards the ensemble's probabilities."""
    r = cli("train", "--preset", "seed", "--epochs", "2", "--subset", "2000", "--test-subset", "1000", "--val-fraction",
            "0.02", "--threads", "1", "--seed", "2", "--distill", made.out, "--quiet", "--out-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["distill"] == str(made.out)
    acc = json.loads((run / "metrics.json").read_text())["test_acc"]
    assert acc > 0.6, acc   # 2 epochs on 2,000 images: chance is 0.1


def test_distill_loss_is_zero_when_student_and_teacher_agree_and_pulls_towards_the_teacher():
    from fmnist.training.train import distill_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 10, generator=g)
    assert distill_loss(teacher, teacher, 2.0).abs() < 1e-6
    student = torch.randn(8, 10, generator=g, requires_grad=True)
    before = distill_loss(student, teacher, 2.0)
    before.backward()
    with torch.no_grad():
        after = distill_loss(student - 0.5 * student.grad, teacher, 2.0)
    assert before > 0 and after < before
