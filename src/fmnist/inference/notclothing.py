"""Scores for "is this clothing at all?": higher means more like the photos the model was trained on.

The Predictor calls a photo unsure when its calibrated top probability is low (`msp`). That score
only says how the ten classes compete: a cheeseburger that looks more like a Sandal than anything
else gets a high one. The alternatives measured against it (scripts/photo_detectors.py):

  energy       logsumexp of the raw logits (Liu et al. 2020), averaged over ensemble members
  agreement    logsumexp of the model's own output: for one network its energy; for an ensemble
               (whose output is the members' mean log-softmax) the log of the summed geometric mean
               of the members' probabilities, high only when they agree and are sure. It needs
               nothing but the output, so an exported ONNX model gives it too
  mahalanobis  minus the smallest Mahalanobis distance of the penultimate features to a class
               mean, with one shared covariance (Lee et al. 2018), fitted on training images
  knn          minus the distance of the L2-normalised penultimate features to their k-th nearest
               training feature (Sun et al. 2022)

Every score flips each image as the model's flip TTA does and averages the two views.
"""

from __future__ import annotations

import numpy as np
import torch

from fmnist.inference.forward import to_input

SCORES = ("msp", "energy", "agreement", "mahalanobis", "knn")
KNN_K = 10   # of ~10k reference features; Sun et al. use k=50 of 50k CIFAR images, the same share


def members(model: torch.nn.Module) -> list[torch.nn.Module]:
    """An ensemble's members, or the model itself."""
    return list(getattr(model, "members", [model]))


@torch.no_grad()
def outputs(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(N, 28, 28) uint8 -> per member: flip-averaged logits (N, 10) and penultimate features (N, D)."""
    logits, feats = [], []
    for m in members(model):
        m.eval()
        lo, fe = [], []
        for i in range(0, len(images), batch):
            x = to_input(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])), channels_last=False)
            f = (m.forward_penultimate(x) + m.forward_penultimate(x.flip(3))) / 2
            lo.append(((m(x) + m(x.flip(3))) / 2).float().numpy())
            fe.append(f.float().numpy())
        logits.append(np.concatenate(lo))
        feats.append(np.concatenate(fe))
    return logits, feats


def agreement(output_logits: np.ndarray) -> np.ndarray:
    """(N, 10) the model's output (before temperature) -> (N,) logsumexp."""
    return torch.logsumexp(torch.from_numpy(np.asarray(output_logits, np.float32)), 1).numpy()


def energy(logits: list[np.ndarray]) -> np.ndarray:
    return np.mean([torch.logsumexp(torch.from_numpy(lo), 1).numpy() for lo in logits], 0)


class Mahalanobis:
    """Class means and one shared covariance per member, fitted on labelled training features."""

    def __init__(self, feats: list[np.ndarray], labels: np.ndarray):
        self.means, self.precisions = [], []
        for f in feats:
            mu = np.stack([f[labels == c].mean(0) for c in range(10)])
            centred = f - mu[labels]
            cov = centred.T @ centred / len(f) + 1e-3 * np.eye(f.shape[1])   # ridge: some channels are ~constant
            self.means.append(mu)
            self.precisions.append(np.linalg.inv(cov))

    def __call__(self, feats: list[np.ndarray]) -> np.ndarray:
        out = []
        for f, mu, p in zip(feats, self.means, self.precisions):
            d = f[:, None, :] - mu[None]                      # (N, 10, D)
            out.append(np.einsum("ncd,de,nce->nc", d, p, d).min(1))
        return -np.mean(out, 0)


class KNN:
    """Distance to the k-th nearest reference feature, members' normalised features side by side."""

    def __init__(self, feats: list[np.ndarray], k: int = KNN_K):
        self.ref = torch.from_numpy(self.embed(feats))
        self.k = k

    @staticmethod
    def embed(feats: list[np.ndarray]) -> np.ndarray:
        z = np.concatenate([f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12) for f in feats], 1)
        return (z / np.sqrt(len(feats))).astype(np.float32)

    def __call__(self, feats: list[np.ndarray]) -> np.ndarray:
        q = torch.from_numpy(self.embed(feats))
        d = torch.cdist(q, self.ref)
        return -d.topk(self.k, 1, largest=False).values[:, -1].numpy()


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counted half."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None]).mean()
    ties = (pos[:, None] == neg[None]).mean()
    return float(greater + ties / 2)


def accepted_at_kept(pos: np.ndarray, neg: np.ndarray, kept: float = 0.95) -> float:
    """Share of negatives scoring at or above the threshold that keeps `kept` of the positives. A
    score of -inf (no item found) is unsure at any threshold: such a negative is never accepted,
    even where so many positives have it that keeping `kept` of them needs no threshold at all."""
    thr = np.quantile(np.asarray(pos, float), 1 - kept, method="lower")
    neg = np.asarray(neg, float)
    return float(((neg >= thr) & np.isfinite(neg)).mean())


def threshold_keeping(pos: np.ndarray, kept: float = 0.95) -> float:
    """The score below which a photo is unsure, chosen to keep `kept` of these (dev) positives."""
    return float(np.quantile(np.asarray(pos, float), 1 - kept, method="lower"))
