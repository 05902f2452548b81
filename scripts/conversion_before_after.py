"""Time robust photo conversion: another revision's robust.py against the working tree's, in one run.

    PYTHONPATH=src flock /work/cpu.lock python scripts/conversion_before_after.py [--ref main] [--reps 30] \
        [--out bench/cpu-photos]

Inputs (the ones the project quotes): the 12 real photos `fmnist bench photos` scales to 1 MP
and re-encodes at JPEG quality 90 (bench.conversion_speed), and the ~12.8 KB product photo the
server load test posts (loadtest.bench_photo). For each, the server's per-photo path
preprocess() (decode + convert) and robust.convert alone on the decoded array are timed, old
and new interleaved call by call so drift between them cancels; one core (torch and OpenCV
threads 1). Median and 90th percentile ms per call; with --out, the sitting is appended to
OUT/conversion_before_after.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import fmnist
from fmnist.bench import loadtest
from fmnist.photos import robust
from fmnist.bench.runner import scaled_jpegs
from fmnist.photos.preprocess import load_rgb, preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_conversion_identical import load_reference  # noqa: E402

REAL = Path(__file__).resolve().parents[1] / "photos" / "real"


def with_robust(mod, fn, *a):
    """Call fn with `mod` standing in for fmnist.photos.robust (preprocess imports it per call)."""
    saved = sys.modules["fmnist.photos.robust"]
    sys.modules["fmnist.photos.robust"], fmnist.photos.robust = mod, mod
    try:
        return fn(*a)
    finally:
        sys.modules["fmnist.photos.robust"], fmnist.photos.robust = saved, saved


def time_pair(calls_old, calls_new, reps: int) -> tuple[list[float], list[float]]:
    """Interleave old and new call by call, `reps` rounds over every input; ms per call."""
    t_old, t_new = [], []
    for f_old, f_new in zip(calls_old, calls_new):   # warm-up
        f_old(), f_new()
    for r in range(reps):
        for f_old, f_new in zip(calls_old, calls_new):
            pair = [(f_old, t_old), (f_new, t_new)]
            for f, ts in (pair if r % 2 == 0 else pair[::-1]):   # alternate who goes first
                t = time.perf_counter()
                f()
                ts.append((time.perf_counter() - t) * 1000)
    return t_old, t_new


def fmt(ts: list[float]) -> str:
    return f"median {np.median(ts):6.2f} ms, p90 {np.percentile(ts, 90):6.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="main", help="git revision to compare against (default: main)")
    ap.add_argument("--reps", type=int, default=30, help="rounds over every input (default: 30)")
    ap.add_argument("--out", default=None, help="append the sitting to OUT/conversion_before_after.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    old = load_reference(args.ref)
    photo, about = loadtest.bench_photo(REAL)
    inputs = {"1-MP JPEG q90 (12 real photos)": scaled_jpegs(REAL), f"load-test photo: {about}": [photo]}
    print(f"ref {args.ref} vs working tree; {args.reps} interleaved rounds; one core")
    rows = []
    for name, blobs in inputs.items():
        arrays = [np.asarray(load_rgb(b, work=robust.WORK)) for b in blobs]
        print(name)
        for what, old_calls, new_calls in [
            ("preprocess (decode + convert)",
             [lambda b=b: with_robust(old, preprocess, b) for b in blobs],
             [lambda b=b: preprocess(b) for b in blobs]),
            ("robust.convert alone",
             [lambda a=a: old.convert(a) for a in arrays],
             [lambda a=a: robust.convert(a) for a in arrays]),
        ]:
            t_old, t_new = time_pair(old_calls, new_calls, args.reps)
            print(f"  {what:30s} old {fmt(t_old)} | new {fmt(t_new)} | "
                  f"{np.median(t_old) / np.median(t_new):.2f}x")
            rows.append({"input": name, "path": what, "calls": len(t_new),
                         "old_median_ms": float(np.median(t_old)), "old_p90_ms": float(np.percentile(t_old, 90)),
                         "new_median_ms": float(np.median(t_new)), "new_p90_ms": float(np.percentile(t_new, 90))})
    if args.out:
        from fmnist.utils.atomic import append_sitting
        from fmnist.utils.runinfo import environment

        path = Path(args.out) / "conversion_before_after.json"
        ref = subprocess.run(["git", "rev-parse", args.ref], capture_output=True, text=True).stdout.strip()
        append_sitting(path, {"environment": environment("cpu"), "ref": args.ref, "ref_commit": ref,
                              "reps": args.reps, "threads": 1, "rows": rows})
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
