"""Embeddings for visual search: a fixed-length, L2-normalised vector per image.

The vector is the network's penultimate features (`forward_penultimate` in models/networks.py): for the
shipped ensemble, each member's pooled features L2-normalised and set side by side (3 x 128 =
384 numbers), then normalised as a whole, so the inner product of two embeddings is their cosine
similarity. Photos go through the same conversion as `fmnist predict` (Predictor.prepare).

No mirror averaging (the flip TTA of classification): it would double the forward passes of
every catalogue item. Retrieval quality is measured by `fmnist bench search` (docs/search.md).

An embedding is only comparable with embeddings of the same weights: `model_record` names them
by a SHA-256 of the weights (not of the file, which calibration rewrites without touching them).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmnist.inference.forward import to_input
from fmnist.inference.predict import Predictor

log = logging.getLogger(__name__)

# Bumped whenever the recipe above changes, so that an index of the old vectors is refused.
EMBEDDING = "penultimate-l2-v1"
# Images per forward pass: a CPU wants each layer's activations in cache (inference.eval_batch_size).
BATCH = 128


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the parameter and buffer tensors in state-dict order: the same for a file
    that was only recalibrated or moved, different for any other weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Embedder:
    """Photos, PIL images, arrays or 28x28 uint8 batches -> (N, dim) float32 unit vectors.

        e = Embedder()                        # the model shipped inside the package
        vectors = e.embed_images(images)      # (N, 28, 28) uint8, as the dataset stores them
    """

    def __init__(self, checkpoint_path: str | Path | None = None, predictor: Predictor | None = None,
                 pipeline: str = "robust"):
        self.predictor = predictor or Predictor(checkpoint_path, pipeline=pipeline)
        if self.predictor.backend != "torch":
            raise ValueError("visual search needs the PyTorch checkpoint (its penultimate features are not in "
                             "an exported ONNX graph): pass the .pt file or run directory, with --backend torch")
        self.model = self.predictor.model.eval()
        if not hasattr(self.model, "forward_penultimate"):
            raise ValueError(f"model {self.predictor.meta.get('model')!r} has no penultimate features for search")
        with torch.no_grad():
            self.dim = int(self.model.forward_penultimate(torch.zeros(1, 1, 28, 28)).shape[1])
        self.model_record = {
            "embedding": EMBEDDING,
            "dim": self.dim,
            "weights_sha256": weights_sha256(self.model),
            "model": self.predictor.meta.get("model"),
            "description": self.predictor.meta.get("description"),
            "checkpoint": Path(self.predictor.meta["checkpoint"]).name,
        }

    @torch.no_grad()
    def embed_images(self, images: np.ndarray | torch.Tensor, batch_size: int = BATCH) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, dim) float32, each row of unit length."""
        x_all = torch.as_tensor(np.asarray(images, dtype=np.uint8)) if not torch.is_tensor(images) else images
        out = []
        for i in range(0, len(x_all), batch_size):
            x = to_input(x_all[i:i + batch_size].to(self.predictor.device), channels_last=True)
            out.append(F.normalize(self.model.forward_penultimate(x).float(), dim=1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)

    def prepare(self, item):
        """A photo (path, bytes, PIL image, array) -> the 28x28 image the model sees
        (preprocess.Preprocessed), converted exactly as `fmnist predict` converts it."""
        return self.predictor.prepare(item)
