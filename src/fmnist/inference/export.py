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
from fmnist.classes import MEAN, STD
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
        "normalization": json.dumps({"mean": MEAN, "std": STD}),
        "output": "logits: float32 (N, 10)",
        "test_acc": "" if m.get("test_acc") is None else f"{m['test_acc']:.6f}",
        "val_acc": "" if m.get("val_acc") is None else f"{m['val_acc']:.6f}",
        "epoch": str(ckpt.get("epoch", "")),
        "quantization": quantized,
        # test_acc/val_acc were measured with flip TTA when the model was trained with it
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


def export(ckpt_path, out: str | Path | None = None, int8: bool = False, calib_n: int = 1024,
           tta_flip: bool | None = None) -> Path:
    """tta_flip: put the mirror average (models.FlipTTA) in the graph; None = as the model was
    trained and evaluated, so ONNX Runtime gives the same predictions as PyTorch and the accuracy
    in the metadata describes the file (at 2x the compute)."""
    if int8 and calib_n < 1:  # onnxruntime's own words for 0 are "No data is collected."
        raise ValueError(f"int8 calibration images must be >= 1, got {calib_n} (default: 1024)")
    onnx = require("onnx")
    ckpt = checkpoint.load(ckpt_path)
    model = checkpoint.build_model(ckpt, source=checkpoint.resolve_path(ckpt_path))
    if tta_flip is None:
        tta_flip = checkpoint.trained_with_tta(ckpt)
    shift = bool(tta_flip and checkpoint.trained_with_shift_tta(ckpt))
    if tta_flip:
        model = FlipTTA(model, shifts=shift)
    src = checkpoint.resolve_path(ckpt_path)
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
