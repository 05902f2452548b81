"""A model on the contributor-disjoint held-out photos: accuracy, and how well each score tells clothing from not.

    PYTHONPATH=src python scripts/photo_detectors.py --out bench/cpu/photos/detectors.json --name shipped \
        [--checkpoint PATH] [--trained-on GIT_REF]

Held-out clothing: the `heldout` rows of the `real` and `train` sets; held-out non-clothing: the
`heldout` rows of `nonclothing` and `outliers` (hats, gloves). With --trained-on, a photo whose split
in the manifests at that commit was `dev` or `train` in a set the model trained on (--trained-sets) is
left out: a model trained on the earlier per-file split (the shipped one) trained on it. Scores (fmnist.inference.notclothing): msp (the
calibrated top probability, what the Predictor uses), energy, agreement, mahalanobis and knn (penultimate
features; fitted on the `train` set's train rows plus --fit-images Fashion-MNIST training images).
Per score: AUROC and the share of non-clothing accepted when 95 % of clothing is kept, on held-out;
AUROC on dev (the `real` set's dev photos against the `nonclothing` set's dev rows: what a score is
chosen by); and thresholds chosen on the dev photos alone (keeping 95 % and 85 % of them), with the
held-out clothing and non-clothing each calls unsure. A photo in which no item is found is unsure
under every score. With --everyday, the `everyday` set's held-out rows are scored too (a share unsure per
score: a source the model may have trained on, so apart from the detector table). The model's accuracy per kind,
class and set is written beside. One entry per
--name in OUT (rewritten whole).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from fmnist import data
from fmnist.classes import CLASS_NAMES
from fmnist.inference import notclothing as nc
from fmnist.inference.forward import predict_logits
from fmnist.inference.predict import Predictor, default_checkpoint
from fmnist.photos import realphotos
from fmnist.utils.atomic import read_record, write_json
from fmnist.utils.runinfo import environment

log = logging.getLogger("photo_detectors")
KEPT = 0.95       # the standard operating point the acceptance figure is reported at
SHIP_KEPT = 0.85  # the point a shipped threshold is chosen at on dev: held-out clothing kept less often than dev


def one_member(path: Path, n: int, out: Path) -> Path:
    """Member n of the ensemble checkpoint at `path`, written to `out` as a checkpoint of its own
    and calibrated on its validation split (the ensemble's temperature and threshold are the average's)."""
    from fmnist.evaluation.calibrate import calibrate
    from fmnist.models import checkpoint

    ens = checkpoint.load(path)
    if ens["model"] != "ensemble" or not 0 <= n < ens["model_config"]["n"]:
        raise SystemExit(f"--member {n}: {path} is not an ensemble with a member {n}")
    prefix = f"members.{n}."
    state = {k[len(prefix):]: v for k, v in ens["state_dict"].items() if k.startswith(prefix)}
    info = ens["members"][n]
    ck = checkpoint.make(ens["model_config"]["member"], ens["model_config"]["member_config"], state,
                         metrics={"val_acc": info.get("val_acc")}, epoch=info.get("epoch"),
                         train_config={**ens["train_config"], "seed": info.get("seed")})
    ck["normalization"] = ens["normalization"]
    checkpoint.save(ck, out)
    calibrate(out)
    return out


def run_test_acc(ckpt: Path | None) -> float | None:
    """A run's test accuracy from the metrics.json `fmnist train` writes beside its best.pt (the
    checkpoint itself holds validation figures only)."""
    m = ckpt.parent / "metrics.json" if ckpt else None
    return json.loads(m.read_text()).get("test_acc") if m and m.is_file() else None


def trained_rows(ref: str, trained_sets: list[str]) -> set[tuple[str, str]]:
    """(set, file) of the rows of `trained_sets` that a model trained on the manifests at git commit
    `ref` read (their dev and train splits)."""
    out = set()
    for name in trained_sets:
        path = f"src/fmnist/photos/manifests/{name}/manifest.csv"
        text = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout
        out |= {(name, r["file"]) for r in csv.DictReader(io.StringIO(text)) if r["split"] in ("dev", "train")}
    return out


def photos(name: str, split: str, skip: set) -> list[realphotos.Photo]:
    return [p for p in realphotos.select(realphotos.read_manifest(name), split) if (name, p.path.name) not in skip]


def prepare(predictor: Predictor, ps: list) -> tuple[np.ndarray, np.ndarray]:
    pre = [predictor.prepare(p.path) for p in ps]
    return np.stack([q.image for q in pre]), np.array([q.item_found for q in pre])


def accuracy(pred: np.ndarray, ps: list, sources: list[str], found: np.ndarray) -> dict:
    """Right answers in all, per kind, set and class; and among the photos in which the conversion
    found no item (where the errors come from: the conversion or the model)."""
    y = np.array([CLASS_NAMES.index(p.label) for p in ps])
    right = pred == y

    def part(mask):
        return {"n": int(mask.sum()), "correct": int(right[mask].sum()),
                "acc": float(right[mask].mean()) if mask.any() else None}

    kinds, src = np.array([p.kind for p in ps]), np.array(sources)
    return {**part(np.ones(len(ps), bool)),
            "per_kind": {k: part(kinds == k) for k in sorted(set(kinds))},
            "per_set": {s: part(src == s) for s in sorted(set(sources))},
            "per_class": {c: part(y == i) for i, c in enumerate(CLASS_NAMES) if (y == i).any()},
            "no_item_found": {**part(~found), "per_kind": {k: part(~found & (kinds == k)) for k in sorted(set(kinds))}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="JSON record (one entry per --name)")
    ap.add_argument("--name", default="shipped", help="the entry's name (default: shipped)")
    ap.add_argument("--checkpoint", type=Path, help="model to measure (default: the shipped model)")
    ap.add_argument("--trained-on", metavar="GIT_REF",
                    help="leave out photos that were dev or train rows at this commit (the model trained on them)")
    ap.add_argument("--trained-sets", default="real,train,outliers",
                    help="with --trained-on: the photo sets the model trained on (default: real,train,outliers)")
    ap.add_argument("--member", type=int, metavar="N",
                    help="score member N (0-based) of an ensemble checkpoint alone, calibrated anew on its validation "
                         "split: the like of one run of a recipe, to set beside one run of another")
    ap.add_argument("--everyday", action="store_true",
                    help="also score the `everyday` set's held-out rows (non-clothing from a source models may train on)")
    ap.add_argument("--fit-images", type=int, default=5000,
                    help="Fashion-MNIST training images beside the training photos that the feature scores are fitted on (default: 5000)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    skip = trained_rows(args.trained_on, args.trained_sets.split(",")) if args.trained_on else set()
    source = args.checkpoint or default_checkpoint()
    if args.member is not None:
        source = one_member(source, args.member, Path(tempfile.mkdtemp()) / "member.pt")
    predictor = Predictor(source)
    model = predictor.model

    groups = {"heldout_clothing": [("real", "heldout"), ("train", "heldout")],
              "heldout_other": [("nonclothing", "heldout"), ("outliers", "heldout")],
              "dev_clothing": [("real", "dev")], "dev_other": [("nonclothing", "dev")],
              "fit": [("train", "train")]}
    if args.everyday:  # the everyday set's held-out photographers: a source a model may train on (its other rows)
        groups["heldout_everyday"] = [("everyday", "heldout")]
    other = {"heldout_other", "dev_other", "heldout_everyday"}
    got = {}
    for g, parts in groups.items():
        ps, src = [], []
        for name, split in parts:
            chosen = [p for p in photos(name, split, skip if g != "fit" else set())
                      if (p.label in CLASS_NAMES) == (g not in other)]
            ps += chosen
            src += [name] * len(chosen)
        log.info("%s: %d photos, converting", g, len(ps))
        images, found = prepare(predictor, ps)
        got[g] = {"photos": ps, "sources": src, "images": images, "found": found}

    ds = data.load()
    pick = torch.randperm(len(ds.train_images), generator=torch.Generator().manual_seed(0))[:args.fit_images]
    fit_images = np.concatenate([got["fit"]["images"], ds.train_images[pick].numpy()])
    fit_labels = np.concatenate([[CLASS_NAMES.index(p.label) for p in got["fit"]["photos"]],
                                 ds.train_labels[pick].numpy()])
    _, fit_feats = nc.outputs(model, fit_images)
    maha, knn = nc.Mahalanobis(fit_feats, fit_labels), nc.KNN(fit_feats)

    scores = {}
    for g, v in got.items():
        if g == "fit":
            continue
        probs = predictor.probabilities(v["images"])
        logits, feats = nc.outputs(model, v["images"])
        out = predict_logits(model, torch.from_numpy(v["images"]), tta_flip=predictor.tta_flip,
                             tta_shift=predictor.tta_shift).numpy()
        s = {"msp": probs.max(1), "energy": nc.energy(logits), "agreement": nc.agreement(out),
             "mahalanobis": maha(feats), "knn": knn(feats)}
        # no item found: unsure under every score (the Predictor says so before any score)
        scores[g] = {k: np.where(v["found"], x, -np.inf) for k, x in s.items()}
        v["probs"] = probs

    def share(mask):
        return {"n": int(mask.size), "unsure": int(mask.sum()), "fraction": float(mask.mean()) if mask.size else None}

    detectors = {}
    for k in nc.SCORES:
        hc, ho = scores["heldout_clothing"][k], scores["heldout_other"][k]
        thr = nc.threshold_keeping(scores["dev_clothing"][k], KEPT)
        ship = nc.threshold_keeping(scores["dev_clothing"][k], SHIP_KEPT)
        detectors[k] = {"auroc": nc.auroc(hc, ho), "accepted_at_95_kept": nc.accepted_at_kept(hc, ho, KEPT),
                        "dev_auroc": nc.auroc(scores["dev_clothing"][k], scores["dev_other"][k]),
                        "dev_threshold": thr,
                        "heldout_clothing_unsure": share(hc < thr), "heldout_other_unsure": share(ho < thr),
                        "dev_other_unsure": share(scores["dev_other"][k] < thr),
                        "ship_threshold": ship, "ship_heldout_clothing_unsure": share(hc < ship),
                        "ship_heldout_other_unsure": share(ho < ship)}
        if "heldout_everyday" in scores:
            detectors[k]["heldout_everyday_unsure"] = share(scores["heldout_everyday"][k] < thr)
    # what the Predictor does today: no item, or calibrated top probability under its own threshold
    in_use = {g: share(scores[g]["msp"] < predictor.threshold) for g in ("heldout_clothing", "heldout_other", "dev_other",
                                                                         "heldout_everyday") if g in scores}

    hcg = got["heldout_clothing"]
    pred = hcg["probs"].argmax(1)
    sure = scores["heldout_clothing"]["msp"] >= predictor.threshold
    hog = got["heldout_other"]
    entry = {
        "environment": environment("cpu"), "checkpoint": str(args.checkpoint or "shipped default.pt"), "member": args.member,
        "test_acc_28x28": predictor.meta.get("metrics", {}).get("test_acc") or run_test_acc(args.checkpoint),
        "trained_on_ref": args.trained_on, "kept": KEPT, "fit": f"{len(got['fit']['photos'])} train-split photos + "
                                                                  f"{args.fit_images} Fashion-MNIST training images",
        "counts": {g: len(v["photos"]) for g, v in got.items()},
        "accuracy": {**accuracy(pred, hcg["photos"], hcg["sources"], hcg["found"]),
                     "acc_when_sure": float((pred == [CLASS_NAMES.index(p.label) for p in hcg["photos"]])[sure].mean())
                     if sure.any() else None},
        "in_use": {"threshold": predictor.threshold, **in_use},
        "detectors": detectors,
        "heldout_other_predictions": {p.path.name: CLASS_NAMES[int(i)] for p, i in zip(hog["photos"], hog["probs"].argmax(1))
                                      } if "probs" in hog else {},
    }
    doc = read_record(args.out) if args.out.exists() else {}
    doc.pop("sittings", None)
    doc[args.name] = entry
    write_json(args.out, doc)
    a = entry["accuracy"]
    print(f"{args.name}: held-out clothing {a['acc']:.1%} ({a['correct']}/{a['n']}); "
          + ", ".join(f"{k} {v['acc']:.1%} ({v['correct']}/{v['n']})" for k, v in a["per_kind"].items()))
    for k, d in detectors.items():
        print(f"  {k:<12} AUROC {d['auroc']:.3f}  accepted at 95% kept {d['accepted_at_95_kept']:.0%}  "
              f"dev threshold: held-out clothing unsure {d['heldout_clothing_unsure']['fraction']:.0%}, "
              f"non-clothing unsure {d['heldout_other_unsure']['fraction']:.0%}; at {SHIP_KEPT:.0%} of dev kept: "
              f"{d['ship_heldout_clothing_unsure']['fraction']:.0%} / {d['ship_heldout_other_unsure']['fraction']:.0%}; "
              f"dev AUROC {d['dev_auroc']:.3f}")
    print(f"  in use (T-scaled top prob < {predictor.threshold:.2f} or no item): clothing unsure "
          f"{in_use['heldout_clothing']['fraction']:.0%}, non-clothing unsure {in_use['heldout_other']['fraction']:.0%}")


if __name__ == "__main__":
    main()
