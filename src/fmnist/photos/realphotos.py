"""Real labelled photos and how a model does on them (`fmnist bench photos --real`).

A set is named (`real`, see fmnist.photos.sets) or a folder of photos with a manifest.csv with
at least the columns
  file, label, kind, split, sha256
label: a class name; kind: clean (item alone on a plain ground) or casual (at home: a bed,
a floor, a hanger); split: dev (tune on it) or heldout (report only). Every file is checked
against its SHA-256, so a figure always names exactly the photos it was measured on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist.classes import CLASS_NAMES
from fmnist.photos import sets
from fmnist.photos.sets import PhotoSetError

log = logging.getLogger(__name__)

NONE = "none"   # label of a photo that shows no clothing: the right answer is "unsure"


@dataclass
class Photo:
    path: Path
    label: str
    kind: str
    split: str
    contributor: str = ""   # who took it (the unit the split is drawn by; fmnist.photos.sets.split_for)


def read_manifest(spec: str | Path, verify: bool = True, allow_missing: bool = False) -> list[Photo]:
    """The photos of one set: a name (`real`, found in $FMNIST_PHOTOS or the cache) or a folder
    with its own manifest.csv. Every file is checked against its SHA-256; a missing file is an
    error naming it and the fetch command, unless allow_missing (then it is left out, logged)."""
    ps = sets.resolve(str(spec))
    out, absent = [], []
    for r in ps.rows:
        if r.label not in CLASS_NAMES and r.label != NONE:
            raise PhotoSetError(f"{ps.name}: {r.file}: label {r.label!r} is not a class ({', '.join(CLASS_NAMES)}) "
                                f"nor {NONE!r} (a photo of no clothing)")
        p = ps.path(r)
        if not p.is_file():
            absent.append(r.file)
            continue
        if verify and sets.sha256_file(p) != r.sha256.lower():
            raise PhotoSetError(f"{p} does not match its SHA-256 in the manifest; "
                                + ("restore the file or fix the manifest" if sets.is_path(str(spec))
                                   else sets.fetch_hint(ps.name)))
        out.append(Photo(p, r.label, r.kind, r.split, r.contributor or sets.contributor_of(r)))
    if absent:
        what = f"{len(absent)} of {len(ps.rows)} photos of {ps.name!r} are missing from {ps.folder} ({', '.join(absent[:3])}" \
               + (", ..." if len(absent) > 3 else "") + ")"
        if not allow_missing:
            raise PhotoSetError(what + "; " + sets.fetch_hint(ps.name))
        log.warning("%s; using the %d that are there", what, len(out))
    return out


def read_manifests(specs: str | Path, allow_missing: bool = False) -> list[Photo]:
    """Several sets, comma-separated (as --real-photos and --nonclothing take them)."""
    return [p for spec in str(specs).split(",") if spec.strip()
            for p in read_manifest(spec.strip(), allow_missing=allow_missing)]


def select(photos: list[Photo], split: str) -> list[Photo]:
    """split: dev, heldout or all."""
    return photos if split == "all" else [p for p in photos if p.split == split]


def _acc(mask: np.ndarray, correct: np.ndarray) -> dict:
    n = int(mask.sum())
    return {"n": n, "correct": int(correct[mask].sum()), "acc": float(correct[mask].mean()) if n else None}


def evaluate(predictor, photos: list[Photo]) -> dict:
    """Accuracy overall, per kind, per class; confusion matrix; unsure verdicts; one row a photo."""
    preds = predictor.predict([p.path for p in photos], top_k=3)
    names = list(CLASS_NAMES)
    y = np.array([names.index(p.label) for p in photos])
    yhat = np.array([names.index(r.top[0][0]) if r.ok else -1 for r in preds])
    correct = yhat == y
    unsure = np.array([bool(getattr(r, "unsure", False)) for r in preds])
    kinds = sorted({p.kind for p in photos})
    cm = np.zeros((10, 10), int)
    for a, b in zip(y, yhat):
        if b >= 0:
            cm[a, b] += 1
    sure = ~unsure
    return {
        "n": len(photos), **{k: v for k, v in _acc(np.ones(len(photos), bool), correct).items() if k != "n"},
        "errors": int((yhat < 0).sum()),
        "per_kind": {k: _acc(np.array([p.kind == k for p in photos]), correct) for k in kinds},
        "per_class": {c: _acc(y == i, correct) for i, c in enumerate(names) if (y == i).any()},
        "confusion": cm.tolist(),
        "unsure": {"fraction": float(unsure.mean()) if len(unsure) else 0.0,
                   "acc_when_sure": float(correct[sure].mean()) if sure.any() else None,
                   "acc_when_unsure": float(correct[unsure].mean()) if unsure.any() else None},
        "rows": [{"file": p.path.name, "label": p.label, "kind": p.kind,
                  "pred": r.top[0][0] if r.ok else None, "prob": round(r.top[0][1], 4) if r.ok else None,
                  "unsure": bool(getattr(r, "unsure", False)), "error": r.error}
                 for p, r in zip(photos, preds)],
    }


def unsure_rate(predictor, photos: list[Photo]) -> dict:
    """Photos of no clothing: how many come back unsure (the right answer), and why."""
    preds = predictor.predict([p.path for p in photos], top_k=1)
    unsure = [r.unsure for r in preds if r.ok]
    why = {}
    for r in preds:
        if r.ok and r.unsure:
            key = "no clear item" if r.reason.startswith("no clear item") else "low confidence"
            why[key] = why.get(key, 0) + 1
    per_kind = {}
    for p, r in zip(photos, preds):
        if r.ok:
            k = per_kind.setdefault(p.kind, {"n": 0, "unsure": 0})
            k["n"] += 1
            k["unsure"] += int(r.unsure)
    for k in per_kind.values():
        k["fraction"] = k["unsure"] / k["n"]
    return {"n": len(unsure), "unsure": int(sum(unsure)), "fraction": float(np.mean(unsure)) if unsure else None,
            "reasons": why, "per_kind": per_kind,
            "rows": [{"file": p.path.name, "kind": p.kind, "pred": r.top[0][0] if r.ok else None,
                                      "prob": round(r.top[0][1], 4) if r.ok else None, "unsure": r.unsure}
                                     for p, r in zip(photos, preds)]}


def summary_line(name: str, r: dict) -> str:
    kinds = ", ".join(f"{k} {v['acc']:.1%} ({v['correct']}/{v['n']})" for k, v in r["per_kind"].items())
    return f"{name}: {r['acc']:.1%} ({r['correct']}/{r['n']}); {kinds}; unsure {r['unsure']['fraction']:.0%}"
