"""`fmnist export`: ONNX with a dynamic batch axis, normalisation inside the graph, metadata
(class names, model, accuracy) in the file; optional static int8 quantization calibrated on
training images, for CPU inference with ONNX Runtime."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from fmnist.models import checkpoint
from fmnist.utils.atomic import atomic_path
from fmnist.models.networks import FlipTTA, count_parameters

log = logging.getLogger(__name__)

OPSET = 17
INSTALL_HINT = "ONNX export needs the optional extra: pip install 'fmnist[onnx]' (onnx and onnxruntime)"


def require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is not installed. {INSTALL_HINT}") from None


def metadata(ckpt: dict, quantized: str, tta_flip: bool, tta_shift: bool = False) -> dict[str, str]:
    from fmnist import __version__

    m = ckpt.get("metrics", {})
    return {
        "fmnist_format": "fmnist.onnx.v1",
        "fmnist_version": __version__,
        "model": ckpt["model"],
        "model_config": json.dumps(ckpt["model_config"]),
        "class_names": json.dumps(ckpt["class_names"]),
        "input": "images: float32 (N, 1, 28, 28) in [0, 1], light object on black; normalised inside the graph",
        "normalization": json.dumps(dict(zip(("mean", "std"), checkpoint.normalization(ckpt)))),  # in the graph
        "output": "logits: float32 (N, 10)",
        "test_acc": "" if m.get("test_acc") is None else f"{m['test_acc']:.6f}",
        "val_acc": "" if m.get("val_acc") is None else f"{m['val_acc']:.6f}",
        "epoch": str(ckpt.get("epoch", "")),
        # int8: test_acc, val_acc and the calibration are the fp32 model's (measuring the int8 file on
        # 16,000 images would multiply the export's time; `fmnist bench onnx` measures both)
        "quantization": quantized,
        # the views the graph averages, which test_acc, val_acc and the calibration were measured with
        "tta_flip": "true" if tta_flip else "false",
        "tta_shift": "true" if tta_shift else "false",
        # temperature and unsure threshold fitted on validation (calibrate.py); logits stay raw
        "calibration": json.dumps(ckpt.get("calibration")),
    }


def _set_metadata(model_proto, meta: dict[str, str]) -> None:
    del model_proto.metadata_props[:]
    for k, v in meta.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = k, v


def export_fp32(model: torch.nn.Module, path: Path) -> None:
    """Trace to ONNX. The TorchScript-based exporter: it needs neither onnxscript nor a
    network, and this conv net has no dynamic control flow for it to miss."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = torch.rand(2, 1, 28, 28)
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET)
        # atomic_path renames tmp -> path when this block ends


class _Calibration:
    """Feeds training images to ONNX Runtime's static quantizer."""

    def __init__(self, images: np.ndarray, batch: int = 64):
        self.batches = [images[i:i + batch] for i in range(0, len(images), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        b = self.batches[self.i]
        self.i += 1
        return {"images": (b[:, None].astype(np.float32) / 255.0)}


def calibration_images(n: int = 1024, seed: int = 0) -> np.ndarray:
    """A seeded random sample of *training* images (the test set stays unseen); not balanced by
    class, which at 1,024 images leaves each class about a tenth."""
    from fmnist import data

    ds = data.load()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train_images), generator=g)[:n]
    return ds.train_images[idx].numpy()


def quantize_int8(fp32_path: Path, out_path: Path, calib: np.ndarray) -> None:
    require("onnx")
    ort_q = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_path(out_path.with_suffix(".pre.onnx")) as pre, atomic_path(out_path) as tmp:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        # QDQ format, per-channel int8 weights, uint8 activations: ONNX Runtime's recommended
        # CPU setting; calibration by min/max over the sample.
        ort_q.quantize_static(str(pre), str(tmp), _Calibration(calib), quant_format=ort_q.QuantFormat.QDQ,
                              per_channel=True, activation_type=ort_q.QuantType.QUInt8,
                              weight_type=ort_q.QuantType.QInt8)
    out_path.with_suffix(".pre.onnx").unlink(missing_ok=True)


def views_figures(ckpt: dict, model: torch.nn.Module, tta_flip: bool, shift: bool, source,
                  dataset=None) -> tuple[dict, dict | None]:
    """(metrics, calibration) of `model` evaluated with views other than the checkpoint's: its
    recorded accuracy and calibration were measured on the averaged logits of its own views, and
    a temperature and unsure threshold fitted to those are wrong for another view's logits. The
    calibration is refitted on the validation split as `fmnist calibrate` fits it; val_acc and
    test_acc (on the test images the checkpoint's figure was measured on) are measured anew.
    Only what the checkpoint records is redone (in fp32, an int8 file's figures are its model's)."""
    from fmnist import data
    from fmnist.evaluation.calibrate import fit, validation_indices
    from fmnist.inference.forward import predict_logits

    old, tc = ckpt.get("metrics") or {}, ckpt.get("train_config") or {}
    ds = dataset or data.load(tc.get("data_dir"))

    def logits(images):
        return predict_logits(model, images, tta_flip=tta_flip, tta_shift=shift, amp="off")

    metrics, cal = {}, None
    if ckpt.get("calibration") is not None or old.get("val_acc") is not None:
        idx = validation_indices(ckpt, ds.train_labels, source)
        v_logits, v_labels = logits(ds.train_images[idx]), ds.train_labels[idx]
        metrics["val_acc"] = (v_logits.argmax(1) == v_labels).float().mean().item()
        if ckpt.get("calibration") is not None:
            cal = fit(v_logits, v_labels)
    if old.get("test_acc") is not None:
        test = ds.first_test(tc.get("test_subset"))   # as evaluate_run measured it
        metrics["test_acc"] = (logits(test.test_images).argmax(1) == test.test_labels).float().mean().item()
    return metrics, cal


def _views(flip: bool, shift: bool) -> str:
    return "with flip and shift TTA" if shift else "with flip TTA" if flip else "without TTA"


def export(ckpt_path, out: str | Path | None = None, int8: bool = False, calib_n: int = 1024,
           tta_flip: bool | None = None, dataset=None) -> Path:
    """tta_flip: put the mirror average (models.FlipTTA) in the graph; None = as the model was
    trained and evaluated, so ONNX Runtime gives the same predictions as PyTorch and the accuracy
    in the metadata describes the file (at 2x the compute). With other views than the model's
    own, the metadata's accuracy and calibration are measured for them (views_figures, on
    `dataset` or the one the model trained on)."""
    if int8 and calib_n < 1:  # onnxruntime's own words for 0 are "No data is collected."
        raise ValueError(f"int8 calibration images must be >= 1, got {calib_n} (default: 1024)")
    onnx = require("onnx")
    ckpt = checkpoint.load(ckpt_path)
    src = checkpoint.resolve_path(ckpt_path)
    model = checkpoint.build_model(ckpt, source=src)
    own_views = (checkpoint.trained_with_tta(ckpt), checkpoint.trained_with_shift_tta(ckpt))
    if tta_flip is None:
        tta_flip = own_views[0]
    shift = bool(tta_flip and own_views[1])
    if (tta_flip, shift) != own_views:
        log.info(f"{src} was evaluated and calibrated {_views(*own_views)} and is exported "
                 f"{_views(tta_flip, shift)}: its accuracy and calibration are measured anew for that")
        metrics, cal = views_figures(ckpt, model, tta_flip, shift, src, dataset)
        ckpt = {**ckpt, "metrics": metrics, "calibration": cal}
    if tta_flip:
        model = FlipTTA(model, shifts=shift)
    out = Path(out) if out else src.with_suffix(".int8.onnx" if int8 else ".onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    fp32 = out if not int8 else out.with_name(out.stem.replace(".int8", "") + ".fp32-tmp.onnx")
    export_fp32(model, fp32)
    if int8:
        quantize_int8(fp32, out, calibration_images(calib_n))
        fp32.unlink(missing_ok=True)
    proto = onnx.load(str(out))
    meta = metadata(ckpt, "int8-static-qdq" if int8 else "none", tta_flip, shift)
    meta["parameters"] = str(count_parameters(model))  # /v1/model and the page show it
    _set_metadata(proto, meta)
    onnx.checker.check_model(proto)
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    log.info(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {'int8' if int8 else 'fp32'}, opset {OPSET}"
             f"{', flip' + (' and shift' if shift else '') + ' TTA in the graph' if tta_flip else ''})")
    return out
