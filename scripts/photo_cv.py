"""Judge a change to the photo model on photos of people it never saw, across seeds.

    PYTHONPATH=src python scripts/photo_cv.py --out bench/cpu/photos/photo_cv.json [--seeds 0,1,2] \
        [--name NAME] [--set KEY=VALUE ...] [--keep DIR]
    PYTHONPATH=src python scripts/photo_cv.py --out bench/cpu/photos/photo_cv.json --ensemble RUN RUN ... --name NAME
    python scripts/photo_cv.py --out bench/cpu/photos/photo_cv.json --table

Two models of one `photo` recipe differ by up to 8 points on the dev photos, so one run says
little about a change. Here the photos are folded as the held-out split is drawn, by contributor: the
fold is the contributors with sha256(contributor) mod 3 == 0 (the two with more than 100 photos stay in
training, as in the split rule), and the scoring set is their photos of the `real` set's dev rows and
the `train` set's train rows. `photo` models train on the other contributors' `train` and `outliers`
train rows (never on dev or held-out photos), so every scored photo is of a person the model never saw. `--set` gives overrides of the `photo` preset
(TrainConfig and AugmentConfig fields by name, values as JSON: --set epochs=15 --set photo=0.3).
Run the same seeds with and without the change, in the same way, and compare scoring-set accuracy per
seed. The held-out split is never read.

`--score` trains nothing either: it scores kept runs one by one, and with `--conversion` (fields
of robust.RobustOptions, as --set takes them) converts the scoring set with other settings than the
default, so that a change to the conversion alone is judged on models that never saw those photos.

`--ensemble` trains nothing: it scores the average of runs an earlier call kept (`--keep`) as
`fmnist ensemble` makes it (uncalibrated: temperature scaling changes no answer), so it can be
set beside those runs one by one. One entry is appended to OUT and rewritten after each model,
so a cut-off keeps what was measured. Each model takes about 7 minutes on the 2-core VM (18 epochs).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from fmnist import data
from fmnist.training import config
from fmnist.photos import realphotos
from fmnist.utils.atomic import write_json
from fmnist.classes import CLASS_NAMES
from fmnist.utils.malloc import keep_freed_memory
from fmnist.photos import sets
from fmnist.inference.predict import Predictor
from fmnist.photos.preprocess import preprocess
from fmnist.photos.robust import RobustOptions
from fmnist.utils.runinfo import environment
from fmnist.training.train import train

from _records import parse_or_print_table

FOLDS = 3


def in_fold(contributor: str, per_contributor=None) -> bool:
    """The fold kept out of training: fixed by the contributor alone, so every run keeps the same one."""
    per_contributor = per_contributor if per_contributor is not None else sets.contributor_counts(list(sets.OPEN_SPLIT))
    return (int(hashlib.sha256(contributor.encode()).hexdigest(), 16) % FOLDS == 0
            and per_contributor[contributor] <= sets.LARGE_CONTRIBUTOR)


def train_without_fold(into: Path, name: str = "train") -> Path:
    """The train rows of photo set `name` of contributors outside the fold, as a folder `--real-photos`
    reads: the kept rows of its manifest, and links to their files (the manifest's SHA-256 still checks each one)."""
    train_dir = sets.resolve(name).folder
    with open(sets.MANIFESTS / name / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per = sets.contributor_counts(list(sets.OPEN_SPLIT))
    kept = [r for r in rows if r["split"] == "train" and not in_fold(r["contributor"], per)]
    into.mkdir(parents=True, exist_ok=True)
    with open(into / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    for r in kept:
        (into / r["file"]).symlink_to(train_dir / r["file"])
    return into


def scoring_set() -> list[realphotos.Photo]:
    per = sets.contributor_counts(list(sets.OPEN_SPLIT))
    dev = [p for p in realphotos.select(realphotos.read_manifest("real"), "dev") if in_fold(p.contributor, per)]
    fold = [p for p in realphotos.select(realphotos.read_manifest("train"), "train")
            if in_fold(p.contributor, per) and p.label in CLASS_NAMES]
    return dev + fold


def score(checkpoint: Path, photos: list, images: np.ndarray, test) -> dict:
    """Right answers on the scoring set, by source and kind, and the model's 28x28 test accuracy."""
    predictor = Predictor(checkpoint)
    test_acc = float((predictor.probabilities(test[0]).argmax(1) == test[1]).mean())
    right = predictor.probabilities(images).argmax(1) == np.array([CLASS_NAMES.index(p.label) for p in photos])
    real_dir = sets.resolve("real").folder
    source = np.array(["dev" if p.path.parent == real_dir else "fold" for p in photos])
    kind = np.array([p.kind for p in photos])
    out = {"test_acc": test_acc, "pool_right": int(right.sum()), "pool_n": len(photos), "pool_acc": float(right.mean())}
    for name, m in (("dev", source == "dev"), ("fold", source == "fold"), ("clean", kind == "clean"),
                    ("casual", kind == "casual")):
        out[f"{name}_right"], out[f"{name}_n"] = int(right[m].sum()), int(m.sum())
    return out


def table(doc: dict) -> str:
    out = ["| entry | name | overrides | seed | scoring set (dev + fold) | dev | fold | clean | casual | 28x28 test |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, s in enumerate(doc["sittings"], 1):
        for m in s["models"]:
            changed = {**s["overrides"], **({"conversion": s["conversion"]} if s.get("conversion") else {})}
            out.append(f"| {i} | {s['name']} | `{json.dumps(changed)}` | {m['seed']} | "
                       f"{m['pool_acc'] * 100:.1f} % ({m['pool_right']}/{m['pool_n']}) | "
                       f"{m['dev_right']}/{m['dev_n']} | {m['fold_right']}/{m['fold_n']} | "
                       f"{m['clean_right']}/{m['clean_n']} | {m['casual_right']}/{m['casual_n']} | "
                       f"{m['test_acc'] * 100:.2f} % |")
    return "\n".join(out)


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value   # a bare word: a string
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    ap.add_argument("--name", default="photo", help="what this entry tries (default: photo)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of the photo preset")
    ap.add_argument("--ensemble", nargs="+", type=Path, metavar="RUN",
                    help="score the ensemble of these kept runs instead of training (--seeds and --set unused)")
    ap.add_argument("--score", nargs="+", type=Path, metavar="RUN",
                    help="score these kept runs one by one instead of training (--seeds and --set unused)")
    ap.add_argument("--conversion", action="append", default=[], metavar="KEY=VALUE",
                    help="with --score or --ensemble: a robust.RobustOptions field for the scoring set's conversion "
                         "(default: the default conversion)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="keep the trained runs under DIR (default: deleted with this call's temporary folder)")
    args, out, doc = parse_or_print_table(ap, table)
    overrides = parse_set(args.set)
    try:
        config.resolve("photo", overrides)   # a bad override fails now, not after the first model
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: --set: {e}") from None
    conversion = parse_set(args.conversion)
    if conversion and not (args.score or args.ensemble):
        raise SystemExit("error: --conversion needs --score or --ensemble: a model trained here converts its "
                         "training photos with the default conversion")
    try:
        options = RobustOptions(**conversion)
    except TypeError as e:
        raise SystemExit(f"error: --conversion: {e}") from None
    keep_freed_memory()   # as `fmnist train` runs
    photos = scoring_set()
    images = np.stack([preprocess(p.path, options=options).image for p in photos])
    ds = data.load()
    test = (ds.test_images.numpy(), ds.test_labels.numpy())
    sitting = {"environment": environment("cpu"), "name": args.name, "overrides": overrides,
               "fold": f"contributors with sha256(contributor) mod {FOLDS} == 0 and at most {sets.LARGE_CONTRIBUTOR} photos", "models": []}
    if conversion:
        sitting["conversion"] = conversion
    doc["sittings"].append(sitting)
    write_json(out, doc)
    if args.ensemble:
        from fmnist.training.ensemble import make

        with tempfile.TemporaryDirectory() as tmp:
            made = make(args.ensemble, tmp, calibrated=False, dataset=ds)
            seeds = "+".join(str(m["seed"]) for m in made["members"])
            row = {"seed": seeds, "run": [str(r) for r in args.ensemble], **score(Path(made["checkpoint"]), photos, images, test)}
        sitting["models"].append(row)
        write_json(out, doc)
        print(f"ensemble of seeds {seeds}: scoring set {row['pool_acc']:.1%} ({row['pool_right']}/{row['pool_n']}), "
              f"28x28 test {row['test_acc']:.2%}", flush=True)
        return
    if args.score:
        for run in args.score:
            seed = json.loads((run / "config.json").read_text())["seed"]
            row = {"seed": seed, "run": str(run), **score(run / "best.pt", photos, images, test)}
            sitting["models"].append(row)
            write_json(out, doc)
            print(f"seed {seed}: scoring set {row['pool_acc']:.1%} ({row['pool_right']}/{row['pool_n']}), "
                  f"28x28 test {row['test_acc']:.2%}", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        real = f"{train_without_fold(Path(tmp) / 'train')},{train_without_fold(Path(tmp) / 'outliers', 'outliers')}"
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = config.resolve("photo", {**overrides, "seed": seed, "real_photos": real,
                                           "out_dir": str(args.keep or Path(tmp) / "runs")})
            run_dir = train(cfg)
            row = {"seed": seed, "run": str(run_dir) if args.keep else run_dir.name, **score(run_dir / "best.pt", photos, images, test)}
            sitting["models"].append(row)
            write_json(out, doc)
            print(f"seed {seed}: scoring set {row['pool_acc']:.1%} ({row['pool_right']}/{row['pool_n']}), "
                  f"dev {row['dev_right']}/{row['dev_n']}, fold {row['fold_right']}/{row['fold_n']}, "
                  f"28x28 test {row['test_acc']:.2%}", flush=True)


if __name__ == "__main__":
    main()
