#!/usr/bin/env python3
"""Seed-to-seed spread of real-photo figures: several checkpoints on one split of the `real`
photo set, plus how many held-out hats (`outliers`) and photos of no clothing (`nonclothing`)
come back unsure. The sets must be on this machine (fmnist photos fetch real outliers nonclothing).

    python scripts/photo_seed_check.py --out bench/cpu/photos/members.json \
        --model "NAME=RUN_DIR/best.pt" [--model ...]

One model's figures move by several photos between seeds (93 held-out photos of `real`: one photo is
1.1 points), so a recipe is compared by two or more seeds, not one run.
"""
import argparse
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from fmnist.photos import realphotos
from fmnist.inference.predict import Predictor
from fmnist.utils.runinfo import environment



def _run_test_acc(path: Path):
    m = path.parent / "metrics.json"   # a run directory's evaluation, beside its best.pt
    return json.loads(m.read_text())["test_acc"] if m.is_file() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (repeat)")
    ap.add_argument("--split", default="heldout", help="split of the real set: dev or heldout (default: heldout)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    real = realphotos.select(realphotos.read_manifest("real"), args.split)
    things = realphotos.read_manifest("nonclothing")
    hats = realphotos.select(realphotos.read_manifest("outliers"), "heldout")
    res = {"environment": environment("cpu"), "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "split": args.split, "models": {}}
    for spec in args.model:
        name, path = spec.split("=", 1)
        pr = Predictor(path)
        r = realphotos.evaluate(pr, real)
        res["models"][name] = {
            "checkpoint_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "test_acc": pr.meta["metrics"].get("test_acc") or _run_test_acc(Path(path)),
            "acc": r["acc"], "clean": r["per_kind"]["clean"]["acc"], "casual": r["per_kind"]["casual"]["acc"],
            "n": r["n"], "unsure_fraction": r["unsure"]["fraction"],
            "nonclothing_unsure": realphotos.unsure_rate(pr, things)["unsure"], "nonclothing_n": len(things),
            "heldout_hats_unsure": realphotos.unsure_rate(pr, hats)["unsure"], "heldout_hats_n": len(hats)}
        m = res["models"][name]
        print(f"{name}: {m['acc']:.1%} (clean {m['clean']:.1%}, casual {m['casual']:.1%}); test {m['test_acc']}; "
              f"unsure: things {m['nonclothing_unsure']}/{m['nonclothing_n']}, hats {m['heldout_hats_unsure']}/{m['heldout_hats_n']}")
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
