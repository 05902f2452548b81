"""Predict on people's own images, from Python or the CLI.

    from fmnist.inference.predict import Predictor
    p = Predictor()                       # the model shipped inside the package
    p.predict(["shoe.jpg", pil_image, array])[0].top[0]   # ('Sneaker', 0.97)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fmnist.models import checkpoint
from fmnist.classes import CLASS_NAMES
from fmnist.photos.preprocess import (PreprocessError, Preprocessed, dataset_image, is_file_object, open_image,
                                      preprocess)
from fmnist.inference.forward import predict_logits
from fmnist.models.networks import ENSEMBLE


# Said with every unsure verdict on a photo: on the held-out real photos, items alone on a plain
# ground are right far more often than casual shots (docs/results.md), and pairs of
# shoes shot from above are among the hardest (the dataset shows one shoe, from the side).
PHOTO_TIP = "a photo of the item alone on a plain background (one shoe, from the side) works best"


def default_checkpoint() -> Path:
    """The small pretrained model shipped in the package (see assets/MODEL_CARD.md)."""
    return Path(str(resources.files("fmnist") / "assets" / "default.pt"))


@dataclass
class Prediction:
    source: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    probabilities: list[float] | None = None
    image: np.ndarray | None = None          # the 28x28 uint8 image the model saw
    error: str | None = None
    unsure: bool = False                     # no clear item, or confidence under the validation threshold
    reason: str | None = None                # why unsure, in words

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.error:
            return {"source": self.source, "error": self.error}
        return {"source": self.source, "label": self.top[0][0], "probability": self.top[0][1],
                "verdict": "unsure" if self.unsure else "sure", "reason": self.reason,
                "top": [{"label": c, "probability": p} for c, p in self.top]}


def describe(model: str | None, config: dict | None) -> str | None:
    """What the API and the page call a model: an ensemble by its members ("ensemble of 3 fast")."""
    if model == ENSEMBLE and config:
        return f"ensemble of {config.get('n')} {config.get('member')}"
    return model


class Predictor:
    """A loaded model plus the preprocessing pipeline. backend: 'torch' or 'onnx'; threads: ONNX
    Runtime's intra-op threads (0: its default; torch's are process-wide, torch.set_num_threads)."""

    def __init__(self, checkpoint_path: str | Path | None = None, device: str = "cpu", backend: str = "torch",
                 pipeline: str = "robust", robust_options=None, threads: int = 0):
        self.backend = backend
        self.pipeline = pipeline
        ckpt: dict = {}
        self.robust_options = robust_options  # robust.RobustOptions; None = every step on
        if backend == "onnx":
            from fmnist.inference.onnx_backend import OnnxModel
            self.model = OnnxModel(checkpoint_path, threads=threads)
            self.meta = self.model.meta
            self.tta_flip = self.tta_shift = False   # in the graph where it was exported with them
        elif backend == "torch":
            path = checkpoint_path or default_checkpoint()
            self.model, ckpt = checkpoint.load_model(path, device)
            # channels-last: oneDNN's native layout for these convs, ~2x faster for small batches (bench).
            self.model = self.model.to(memory_format=torch.channels_last)
            self.meta = {"model": ckpt["model"], "class_names": ckpt["class_names"],
                         "metrics": ckpt.get("metrics", {}), "checkpoint": str(checkpoint.resolve_path(path)),
                         "parameters": sum(p.numel() for p in self.model.parameters())}
            self.tta_flip = checkpoint.trained_with_tta(ckpt)
            self.tta_shift = checkpoint.trained_with_shift_tta(ckpt)
        else:
            raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'onnx'")
        self.meta["description"] = describe(self.meta.get("model"), ckpt.get("model_config") if backend == "torch"
                                            else self.model.model_config)
        self.device = torch.device(device)
        self.class_names = list(self.meta.get("class_names") or CLASS_NAMES)
        # Temperature and unsure threshold fitted on validation (calibrate.py); a model that was
        # never calibrated keeps its raw softmax and is called unsure only for a missing item.
        cal = (ckpt.get("calibration") if backend == "torch" else self.meta.get("calibration")) or {}
        if backend == "onnx":  # checkpoint.load checked a .pt's; an ONNX file's metadata is checked here
            problem = checkpoint.class_names_problem(self.class_names) or checkpoint.calibration_problem(cal)
            if problem:
                raise ValueError(f"{checkpoint_path}: damaged metadata: {problem}; export the checkpoint again "
                                 f"with `fmnist export`")
        self.temperature = float(cal.get("temperature", 1.0))
        self.threshold = float(cal.get("threshold", 0.0))
        self.meta["calibration"] = cal or None

    def inference_threads(self) -> int:
        """Threads one forward pass may use (ONNX Runtime: 0 = its default, a thread per core)."""
        if self.backend == "onnx":
            return self.model.session.get_session_options().intra_op_num_threads
        return torch.get_num_threads()

    # -- core: 28x28 uint8 batch -> probabilities
    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, 10) float probabilities."""
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        if self.backend == "onnx":
            return self.model.probabilities(images, self.temperature)
        # The training code's own inference path (fp32, channels-last, flip and shift TTA as trained), so
        # served predictions are the ones the reported test accuracy was measured with.
        x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(self.device)
        logits = predict_logits(self.model, x, tta_flip=self.tta_flip, channels_last=True, amp="off",
                                tta_shift=self.tta_shift)
        return torch.softmax(logits / self.temperature, 1).cpu().numpy()

    def prepare(self, item) -> Preprocessed:
        """Anything accepted by predict() -> the 28x28 image the model will see."""
        name = str(item) if isinstance(item, (str, Path)) else "image"
        if isinstance(item, (str, Path, bytes, bytearray, memoryview)) or is_file_object(item):
            # Opened here, as the server opens uploads, so that a 28x28 Fashion-MNIST-style file
            # is recognised below as what it is, not converted as a photo of one.
            item = open_image(item, draft=self.draft_size())
        a = dataset_image(item)   # the one test the CLI, the API and the server share
        if a is not None:
            return Preprocessed(a, "dark", (0, 0, 28, 28), "dataset")
        try:
            return preprocess(item, pipeline=self.pipeline, options=self.robust_options)
        except PreprocessError as e:
            raise PreprocessError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None

    def draft_size(self) -> int | None:
        """The size to decode JPEGs at (open_image's draft): the robust conversion works at
        robust.WORK px, so a large photo is decoded reduced right away; None for the paper's."""
        if self.pipeline != "robust":
            return None
        from fmnist.photos.robust import WORK
        return WORK

    def judge(self, item_found: bool, note: str, p: np.ndarray) -> tuple[bool, str | None]:
        """(unsure, reason) for one image: no clear item, or a top probability under the
        threshold below which this model was wrong more often than right on validation."""
        if not item_found:
            return True, note or "no clear item found in the photo"
        top = float(np.max(p))
        if top < self.threshold:
            return True, (f"low confidence: {top:.0%} is under the {self.threshold:.0%} below which this "
                          f"model is wrong more often than right (validation)")
        return False, None

    def verdict(self, pre: Preprocessed, p: np.ndarray) -> tuple[bool, str | None]:
        """judge() for a prepared image, plus what to do about an unsure photo (PHOTO_TIP): the
        one verdict the CLI, the API and the web page all give."""
        unsure, reason = self.judge(pre.item_found, pre.note, p)
        if unsure and pre.pipeline != "dataset":   # a 28x28 dataset image was not photographed
            reason = f"{reason}; {PHOTO_TIP}"
        return unsure, reason

    def predict(self, items, top_k: int = 3) -> list[Prediction]:
        """Paths, bytes, binary file objects, PIL images or arrays, one or a list of them. A bad
        item gets .error; the others still run."""
        items = as_items(items)
        preds, batch, slots, prepared = [], [], [], []
        for i, item in enumerate(items):
            src = item_name(item, i)
            try:
                pre = self.prepare(item)
            except PreprocessError as e:
                preds.append(Prediction(src, error=str(e)))
                continue
            preds.append(Prediction(src, image=pre.image))
            batch.append(pre.image)
            slots.append(len(preds) - 1)
            prepared.append(pre)
        probs = self.probabilities(np.stack(batch)) if batch else np.zeros((0, 10))
        k = max(1, min(top_k, len(self.class_names)))
        for slot, pre, p in zip(slots, prepared, probs):
            order = np.argsort(-p)[:k]
            preds[slot].top = [(self.class_names[j], float(p[j])) for j in order]
            preds[slot].probabilities = [float(v) for v in p]
            preds[slot].unsure, preds[slot].reason = self.verdict(pre, p)
        return preds


def as_items(items) -> list:
    """One item (a path, bytes, a binary file object, a PIL image or an array) or a list of them."""
    if isinstance(items, (str, Path, np.ndarray, bytes, bytearray, memoryview)) or is_file_object(items) \
            or hasattr(items, "size") and hasattr(items, "mode"):
        return [items]
    return list(items)


def item_name(item, i: int) -> str:
    """How results name item number i: its path, an open file's name, else its type and place."""
    named = getattr(item, "name", None)  # an open file's path; None or a number for others
    return str(item) if isinstance(item, (str, Path)) else \
        named if isinstance(named, str) else f"<{type(item).__name__} #{i}>"


def format_table(preds: list[Prediction], top_k: int) -> str:
    width = max([len(p.source) for p in preds] + [4])
    lines = [f"{'file':<{width}}  " + "  ".join(f"{'top-' + str(i + 1):<22}" for i in range(top_k))]
    for p in preds:
        if p.error:
            lines.append(f"{p.source:<{width}}  error: {p.error}")
        else:
            lines.append(f"{p.source:<{width}}  " + "  ".join(f"{c + ' ' + format(pr, '.1%'):<22}" for c, pr in p.top)
                         + (f"  UNSURE: {p.reason}" if p.unsure else ""))
    return "\n".join(lines)
