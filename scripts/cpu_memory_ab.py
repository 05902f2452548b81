"""CPU training and evaluation with and without commit 09f2cc0's two changes, in one sitting:
glibc's malloc keeping freed memory (fmnist.utils.malloc) and evaluation at batch 128 on CPU
(inference.eval_batch_size) instead of 1024.

    python scripts/cpu_memory_ab.py --out bench/cpu --reps 3

Each run is its own process: a short `fast` training (a seeded subset, the preset's own
augmentation, validation each epoch), then the test-set evaluation `fmnist train` ends with.
"before" runs the same code with glibc's defaults and evaluation batches of 1024; the two
alternate, the order flipping every repetition, so a drifting machine hits both alike.
Appends a sitting to OUT/memory_ab.json and prints medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One run, in a child process: prints a JSON line of its timings.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
variant, subset, epochs, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
from fmnist.training import config
from fmnist.utils import malloc
from fmnist.evaluation.evaluate import evaluate_run
from fmnist.training.train import train
import fmnist.evaluation.evaluate, fmnist.inference.forward
import logging; logging.getLogger("fmnist").setLevel(logging.WARNING)  # no progress lines
if variant == "after":
    malloc.keep_freed_memory()
    eval_batch = 0                       # by device: 128 on CPU
else:
    eval_batch = 1024                    # the size before
    orig = fmnist.inference.forward.predict_logits
    fmnist.evaluation.evaluate.predict_logits = lambda m, x, batch_size=0, **k: orig(m, x, 1024, **k)
cfg = config.resolve("fast", {"subset": subset, "epochs": epochs, "out_dir": out, "eval_batch_size": eval_batch})
t0 = time.perf_counter()
run = train(cfg)
t1 = time.perf_counter()
m = evaluate_run(run, device="cpu")
t2 = time.perf_counter()
import csv
rows = list(csv.DictReader(open(run / "history.csv")))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"variant": variant, "epoch_seconds": [float(r["seconds"]) for r in rows],
                  "val_seconds": [float(r["eval_seconds"]) for r in rows], "train_seconds": t1 - t0,
                  "test_eval_seconds": t2 - t1, "sys_seconds": ru.ru_stime, "user_seconds": ru.ru_utime,
                  "test_acc": m["test_acc"]}))
"""


def one(variant: str, subset: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "src"), variant, str(subset), str(epochs), out],
                           capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{variant} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/cpu", help="folder of memory_ab.json (default: bench/cpu)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each variant (default: 3)")
    ap.add_argument("--subset", type=int, default=20000, help="training images (default: 20000)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fmnist.utils.atomic import append_sitting
    from fmnist.utils.runinfo import environment

    runs = []
    for rep in range(args.reps):
        for variant in (("before", "after") if rep % 2 == 0 else ("after", "before")):
            runs.append(one(variant, args.subset, args.epochs))
            print(f"rep {rep} {variant}: epoch {statistics.median(runs[-1]['epoch_seconds']):.2f} s, "
                  f"test eval {runs[-1]['test_eval_seconds']:.2f} s, sys {runs[-1]['sys_seconds']:.1f} s", flush=True)
    summary = {}
    for variant in ("before", "after"):
        rs = [r for r in runs if r["variant"] == variant]
        summary[variant] = {k: statistics.median(statistics.median(r[k]) if isinstance(r[k], list) else r[k] for r in rs)
                            for k in ("epoch_seconds", "val_seconds", "train_seconds", "test_eval_seconds",
                                      "sys_seconds", "test_acc")}
    summary["epoch_speedup"] = summary["before"]["epoch_seconds"] / summary["after"]["epoch_seconds"]
    summary["test_eval_speedup"] = summary["before"]["test_eval_seconds"] / summary["after"]["test_eval_seconds"]
    env = environment("cpu")
    env.pop("malloc_keeps_freed_memory", None)  # per variant here, not per process
    append_sitting(Path(args.out) / "memory_ab.json", {"environment": env, "reps": args.reps, "subset": args.subset,
                                                      "epochs": args.epochs, "runs": runs, "summary": summary})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
