"""ONNX export: PyTorch and ONNX Runtime agree; int8 keeps its accuracy."""

import logging
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")  # the optional extra; `make test` installs it

from fmnist.models import checkpoint
from fmnist.inference.export import export  # noqa: E402
from fmnist.inference.onnx_backend import OnnxModel  # noqa: E402
from fmnist.inference.predict import Predictor, default_checkpoint  # noqa: E402
from fmnist.inference.forward import predict_logits  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    fp32 = export(default_checkpoint(), d / "m.onnx")
    int8 = export(default_checkpoint(), d / "m.int8.onnx", int8=True, calib_n=256)
    return fp32, int8


def test_fp32_matches_pytorch_on_test_images(exported, dataset):
    model, _ = checkpoint.load_model(default_checkpoint())
    x = dataset.test_images[:500]  # parity is per image: 500 show it as well as 10,000
    # the shipped model is evaluated with flip TTA, so the exported graph holds it too
    assert checkpoint.load(default_checkpoint())["train_config"]["tta_flip"] and OnnxModel(exported[0]).meta["tta_flip"]
    ref = predict_logits(model, x, tta_flip=True, channels_last=False).numpy()
    got = OnnxModel(exported[0]).logits(x[:, None].numpy().astype(np.float32) / 255)
    diff = np.abs(ref - got).max()
    print(f"max |logit difference| PyTorch vs ONNX Runtime fp32 over 500 test images: {diff:.2e}")
    assert diff < 1e-3
    assert (ref.argmax(1) == got.argmax(1)).all()  # identical top-1 on every test image


def test_int8_accuracy_change_is_bounded(exported, dataset):
    y = dataset.test_labels[:1000].numpy()
    x = dataset.test_images[:1000].numpy()
    acc32 = (OnnxModel(exported[0]).probabilities(x).argmax(1) == y).mean()
    acc8 = (OnnxModel(exported[1]).probabilities(x).argmax(1) == y).mean()
    print(f"accuracy on 1,000 test images: fp32 {acc32:.4f}, int8 {acc8:.4f} ({(acc8 - acc32) * 100:+.2f} points)")
    assert acc32 > 0.92  # the model card says 93.9 % on all 10,000
    assert abs(acc8 - acc32) < 0.01  # the same images: the difference is int8's alone


def test_export_without_tta_is_the_bare_model_with_its_own_figures(fast_run, dataset, tmp_path, cli):
    """--no-tta-flip on a model trained with flip TTA: the graph is the bare model, and the
    metadata holds the bare model's own validation accuracy and calibration. The model's were
    fitted to averaged logits: the ONNX backend applied that temperature and unsure threshold to
    un-averaged ones, and /v1/model reported an accuracy the file did not have."""
    import torch

    from fmnist.evaluation.calibrate import fit, validation_indices

    ck = checkpoint.load(fast_run.run / "best.pt")
    assert checkpoint.trained_with_tta(ck) and ck["calibration"] and "test_acc" not in ck["metrics"]
    src = fast_run.run / "best.pt"
    r = cli("export", src, "--out", tmp_path / "bare.onnx", "--no-tta-flip")
    assert r.returncode == 0, r.stderr
    m = OnnxModel(tmp_path / "bare.onnx")
    assert not m.meta["tta_flip"]
    model, _ = checkpoint.load_model(src)
    x = dataset.test_images[:300]
    ref = predict_logits(model, x, tta_flip=False, channels_last=False).numpy()
    assert np.abs(ref - m.logits(x[:, None].numpy().astype(np.float32) / 255)).max() < 1e-3
    # What the file itself does on the validation split the model's calibration was fitted on.
    idx = validation_indices(ck, dataset.train_labels, src)
    y = dataset.train_labels[idx]
    logits = torch.from_numpy(m.logits(dataset.train_images[idx][:, None].numpy().astype(np.float32) / 255))
    want = fit(logits, y)
    cal = m.meta["calibration"]
    assert cal["temperature"] == pytest.approx(want["temperature"], rel=1e-3) != ck["calibration"]["temperature"]
    assert cal["threshold"] == pytest.approx(want["threshold"], abs=0.01)
    assert cal["fitted_on"] == f"validation split ({len(idx)} images)"
    assert m.meta["metrics"] == {"val_acc": pytest.approx((logits.argmax(1) == y).float().mean().item(), abs=1e-3)}
    assert "evaluated and calibrated with flip TTA and is exported without TTA" in r.stderr, r.stderr


def test_export_traces_without_tracer_warnings(tmp_path):
    """FlipTTA's one-call path for small batches must stay out of the trace (a traced batch-size
    branch would warn, and fix the graph to the trace's batch size)."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(default_checkpoint(), tmp_path / "m.onnx")
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)], \
        [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def test_metadata_in_file(exported):
    m = OnnxModel(exported[1])
    assert m.meta["class_names"][9] == "Ankle boot" and m.meta["quantization"] == "int8-static-qdq"
    assert m.meta["metrics"]["test_acc"] == pytest.approx(checkpoint.load(default_checkpoint())["metrics"]["test_acc"])
    # ... the fp32 model's figure, and the file says so (/v1/model and the page show it)
    assert m.meta["metrics_of"] == "the fp32 model before int8 quantization"
    assert OnnxModel(exported[0]).meta["metrics_of"] == "this model"
    assert m.meta["parameters"] == Predictor(default_checkpoint()).meta["parameters"]  # was None: the page broke
    # the API's description comes from the file's model_config, as from the checkpoint's
    assert Predictor(exported[1], backend="onnx").meta["description"] == Predictor().meta["description"] \
        == "ensemble of 3 fast"


def test_dynamic_batch_axis(exported):
    m = OnnxModel(exported[0])
    for n in (1, 7, 300):
        assert m.logits(np.random.rand(n, 1, 28, 28).astype(np.float32)).shape == (n, 10)


def test_predict_cli_onnx_backend(exported, dataset, tmp_path, cli):
    from PIL import Image

    Image.fromarray(dataset.test_images[0].numpy()).save(tmp_path / "a.png")
    r = cli("predict", tmp_path / "a.png", "--backend", "onnx", "--checkpoint", exported[0], "--json")
    assert r.returncode == 0, r.stderr
    assert '"label": "Ankle boot"' in r.stdout
    p = Predictor(exported[0], backend="onnx").predict([dataset.test_images[0].numpy()])[0]
    assert p.top[0][0] == "Ankle boot"


def test_export_command(tmp_path, cli, dataset):
    out = tmp_path / "sub" / "m.onnx"
    # As some onnxruntime modules do on import: a root handler, which must not print our lines twice.
    root_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root_handler)
    try:
        r = cli("export", default_checkpoint(), "--out", out, "--tta-flip")   # as trained: its own figures
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and f"wrote {out}" in r.stderr and "fp32" in r.stderr  # a note, not a result
    assert r.stderr.count(f"wrote {out}") == 1, r.stderr
    m = OnnxModel(out)
    assert m.meta["tta_flip"] and m.meta["quantization"] == "none"
    assert m.meta["calibration"] == checkpoint.load(default_checkpoint())["calibration"]
    x = dataset.test_images[:200].numpy()
    assert (m.probabilities(x).argmax(1) == dataset.test_labels[:200].numpy()).mean() > 0.85


def test_onnx_backend_needs_onnx_file():
    with pytest.raises(ValueError, match="needs an .onnx file"):
        Predictor(default_checkpoint(), backend="onnx")


def test_server_session_uses_a_fixed_pool_that_does_not_spin(exported):
    """ORT's default (a thread per core, spinning between runs) made it lose to PyTorch in the
    server under load (bench/cpu/serve); `fmnist serve` gives it one thread that sleeps."""
    opts = OnnxModel(exported[0], threads=1).session.get_session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert Predictor(exported[0], backend="onnx", threads=1).inference_threads() == 1


@pytest.mark.parametrize("n", ["0", "-5"])
def test_int8_needs_a_positive_calibration_count(tmp_path, cli, n):
    out = tmp_path / "m.int8.onnx"
    r = cli("export", default_checkpoint(), "--int8", "--calibration-images", n, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--calibration-images" in r.stderr and "must be >= 1" in r.stderr and not out.exists()
    with pytest.raises(ValueError, match="calibration images must be >= 1"):
        export(default_checkpoint(), out, int8=True, calib_n=int(n))
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_without_backend_onnx_says_what_to_pass(exported, tmp_path, cli):
    """torch.load on an ONNX file said 'Unsupported operand 8'; predict and serve (both build a
    Predictor) now name the flag, and the converse names the file it needs."""
    from PIL import Image

    from fmnist.models.checkpoint import CheckpointError

    img = tmp_path / "shirt.png"
    Image.new("L", (40, 40), 255).save(img)
    for argv in (["predict", img, "--checkpoint", exported[0]], ["evaluate", exported[0]]):
        r = cli(*argv)
        assert r.returncode == 1 and "Traceback" not in r.stderr and "operand" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "--backend onnx" in r.stderr and "ONNX" in r.stderr
    with pytest.raises(CheckpointError, match="--backend onnx"):
        Predictor(exported[0])  # what `fmnist serve --checkpoint m.onnx` builds
    r = cli("predict", img, "--checkpoint", default_checkpoint(), "--backend", "onnx")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "needs an .onnx file" in r.stderr and "--backend torch" in r.stderr


@pytest.mark.parametrize("key, value, expect", [
    ("class_names", '["T-shirt/top"]', "1 class names for the model's 10 outputs"),
    ("calibration", '{"temperature": 0.0, "threshold": 0.5}', "temperature 0.0"),
])
def test_damaged_onnx_metadata_is_refused(exported, tmp_path, key, value, expect):
    import onnx

    proto = onnx.load(str(exported[0]))
    next(e for e in proto.metadata_props if e.key == key).value = value
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ValueError, match=rf"^{bad}: damaged metadata: .*{expect}.*fmnist export"):
        Predictor(bad, backend="onnx")


def test_a_whitened_fast_model_exports_and_matches_pytorch(fast_run, dataset, tmp_path):
    """fast's stem holds frozen whitening filters as a buffer: they must reach the graph."""
    ckpt = fast_run.run / "best.pt"
    assert checkpoint.load(ckpt)["state_dict"]["features.0.0.white.weight"].any()
    m = OnnxModel(export(ckpt, tmp_path / "whitened.onnx"))
    model, _ = checkpoint.load_model(ckpt)
    x = dataset.test_images[:300]
    ref = predict_logits(model, x, tta_flip=m.meta["tta_flip"], channels_last=False).numpy()
    assert np.abs(ref - m.logits(x[:, None].numpy().astype(np.float32) / 255)).max() < 1e-3
