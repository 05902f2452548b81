"""Inference with ONNX Runtime on an exported .onnx file (the optional `fmnist[onnx]` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fmnist.inference.export import INSTALL_HINT


class OnnxModel:
    def __init__(self, path: str | Path | None, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f"--backend onnx needs onnxruntime, which is not installed. {INSTALL_HINT}") from None
        if path is None:
            raise ValueError("--backend onnx needs an .onnx file from `fmnist export` (--checkpoint FILE.onnx); "
                             "the shipped model runs with the default --backend torch")
        if not str(path).endswith(".onnx"):
            raise ValueError(f"--backend onnx needs an .onnx file from `fmnist export`, got {path}: run a PyTorch "
                             f"checkpoint or run directory with the default --backend torch, or export it first "
                             f"with `fmnist export {path}`")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file; create one with `fmnist export CHECKPOINT`")
        opts = ort.SessionOptions()
        if threads:
            # By default ORT takes a thread per core and keeps them spinning after each run:
            # CPU that a server's conversion threads and event loop need.
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for corrupt files
            raise ValueError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = {"model": props.get("model", path.stem), "class_names": json.loads(props.get("class_names", "null")),
                     "metrics": {k: float(props[k]) for k in ("test_acc", "val_acc") if props.get(k)},
                     "quantization": props.get("quantization"), "tta_flip": props.get("tta_flip") == "true",
                     # a quantized file carries the figures of the fp32 model it was made from (export.py)
                     "metrics_of": ("this model" if props.get("quantization") in (None, "none")
                                    else "the fp32 model before int8 quantization"),
                     "tta_shift": props.get("tta_shift") == "true",
                     "checkpoint": str(path),
                     "calibration": json.loads(props.get("calibration", "null")),
                     # files exported before fmnist wrote the count have none
                     "parameters": int(props["parameters"]) if props.get("parameters", "").isdigit() else None}
        try:   # the architecture's config, for describing the model; files without it have none
            self.model_config = json.loads(props.get("model_config", "null"))
        except json.JSONDecodeError:
            self.model_config = None
        self.input = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x: float32 (N, 1, 28, 28) in [0, 1]."""
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def probabilities(self, images: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, 10) probabilities of softmax(logits / temperature)."""
        z = self.logits(images[:, None].astype(np.float32) / 255.0) / temperature
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
