"""Short trials of `fast`-recipe variants under a ~120 s wall-time budget (issue 3's time-to-93 %
target), judged on the validation split only (no test images are touched): does a cheaper net,
or a recipe without augmentation, buy accuracy at a fixed budget?

    python scripts/budget_sweep.py --out bench/cpu/budget_sweep.json

Each candidate is the fast preset with overrides (model config, epochs). Writes one JSON row per
candidate: final validation accuracy and wall time (training + per-epoch validation, the same
wall time the benchmark counts).
"""

import argparse
import json
import time
from pathlib import Path

from fmnist.training import config
from fmnist.utils.atomic import write_json
from fmnist.bench.runner import wall_curve
from fmnist.utils.runinfo import environment
from fmnist.training.train import train

CANDIDATES = [
    # name, model_config overrides, epochs[, other recipe overrides]: sized from `fmnist.bench.runner.time_train_steps` (bf16, batch
    # 256) so that each run takes ~110-120 s on the 2-core AMD EPYC: fast 2,187 img/s; space-to-depth
    # stem 2,372; widths 48/96 2,503; both with stem 24 3,271, with stem 32 3,437
    ("fast@4 (reference)", {}, 4),
    ("s2d stem 32, widths 48/96 @6", {"stem_patch": 2, "stem": 32, "widths": (48, 96)}, 6),
    ("s2d stem 24, widths 48/96 @6", {"stem_patch": 2, "stem": 24, "widths": (48, 96)}, 6),
    ("fast@4, no augmentation", {}, 4, {"augment": {"translate": 0, "flip": False, "erase": 0.0}}),
    ("fast@4, batch 128 (2x the steps)", {}, 4, {"batch_size": 128}),
    ("fast@4, peak lr 1.2e-2", {}, 4, {"lr": 1.2e-2}),
    ("fast@4, batch 64 (4x the steps)", {}, 4, {"batch_size": 64}),
    ("s2d stem 24, widths 48/96 @6, batch 128", {"stem_patch": 2, "stem": 24, "widths": (48, 96)}, 6,
     {"batch_size": 128}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--only", default=None, help="comma-separated candidate indices to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    pick = [int(i) for i in args.only.split(",")] if args.only else range(len(CANDIDATES))
    for i in pick:
        name, mcfg, epochs, *extra = CANDIDATES[i]
        extra = extra[0] if extra else {}
        flat = {**{k: v for k, v in extra.items() if k != "augment"}, **extra.get("augment", {})}
        cfg = config.resolve("fast", {"model_config": mcfg, "epochs": epochs, "seed": args.seed,
                                      "out_dir": "/tmp/fmnist-budget-sweep", **flat})
        t = time.perf_counter()
        run_dir = train(cfg)
        wall, val_acc = wall_curve(run_dir, "val_acc")[-1]   # as the benchmark counts wall time
        row = {"name": name, "model_config": mcfg, "epochs": epochs, "overrides": extra, "seed": args.seed,
               "val_acc": val_acc, "wall_seconds": wall,
               "elapsed_seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"{name:>30}: val {row['val_acc']:.4f} in {wall:.0f} s", flush=True)
    out = Path(args.out)
    if args.only and out.exists():  # a partial rerun adds to (or replaces rows of) the earlier file
        old = json.loads(out.read_text())["rows"]
        rows = [r for r in old if r["name"] not in {x["name"] for x in rows}] + rows
    write_json(out, {"environment": environment("cpu"), "rows": rows})


if __name__ == "__main__":
    main()
