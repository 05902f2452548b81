"""GPU benchmark in one call: what to measure on a machine with a CUDA GPU for a limited time.

    # on the GPU machine, from the repository root (FMNIST_DATA: where the dataset's files are)
    PYTHONPATH=src python3 scripts/gpu_bench.py --out bench/gpu --budget 540
    # best-gpu's full 180-epoch schedule alone (~7-8 minutes of an H200)
    PYTHONPATH=src python3 scripts/gpu_bench.py --out bench/gpu --parts probe,best-gpu --budget 560
    # here, on CPU at tiny sizes: checks the script itself (nothing it measures means anything)
    PYTHONPATH=src python3 scripts/gpu_bench.py --smoke --out /tmp/gpu-bench

Every call first times one training epoch of `seed` (bench.seed_epoch, the yardstick of `fmnist
bench accuracy`), so its times also read in seed epochs, and times it again at its end. Then the
parts, in this order (--parts picks some); OUT/gpu_bench.json is rewritten after each, so a call
cut off by its time limit keeps what it finished, and a later call with the same --out adds to it
(one entry per call under "sittings", see bench/README.md):

  probe       ms per training step of fast, gpu and best-gpu (the real loop, eager): the epoch
              time each preset should take, and whether best-gpu fits the budget
  syncs       epochs of 10 and 30 of gpu's steps under torch.cuda.set_sync_debug_mode("warn"): the
              host syncs a step makes (expected 0; an epoch's end reads its figures). CUDA only
  fast        `fast` on the GPU, seed 0, for reference
  gpu         `gpu`, seeds 0, 1, 2: median time to 94%
  graphs      `gpu --compile --compile-mode reduce-overhead` (CUDA graphs), seed 0: does
              compiling pay? (its first epoch includes the compile)
  best-gpu    `best-gpu`, seed 0: final accuracy, by a plain `fmnist train` run (no test pass
              after each epoch: on `wrn` that fp32 pass and the checkpoints would cost more than
              the budget allows), then the test set once. If the probe says its epochs do not fit
              what is left of --budget, it runs a shorter schedule (best-gpu@N, recorded as such)
              instead of being cut off

The other accuracy parts are `fmnist bench accuracy` runs (test accuracy after every epoch, for
reporting only): `python scripts/results_tables.py OUT/gpu_bench.json` renders them as docs/results.md shows.
Run directories (checkpoints: best-gpu's last.pt is ~280 MB) go to --runs, not --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from fmnist import data
from fmnist.bench import runner as bench
from fmnist.training import config
from fmnist.utils.atomic import write_json
from fmnist.utils.logsetup import setup_logging
from fmnist.training.distributed import DistInfo
from fmnist.models.networks import create_model, model_config
from fmnist.utils.runinfo import environment, pick_device
from fmnist.training.train import EMA, epoch_generators, make_optimizer, train_one_epoch

log = logging.getLogger("fmnist.gpu_bench")

PARTS = ("probe", "syncs", "fast", "gpu", "graphs", "best-gpu")
TRAIN_IMAGES = 54_000  # the training split at --val-fraction 0.1
# --smoke: every run tiny, on CPU, one thread, each network at a width that a CPU trains (and
# tests on 10,000 images after every epoch) in seconds, validating on 1,200 images, best-gpu's
# final report on 1,000 test images; best-gpu for two epochs, so that a small --budget shortens
# its schedule (best-gpu@1)
SMOKE = {"device": "cpu", "subset": 512, "test_subset": 1000, "val_fraction": 0.02, "epochs": 1, "batch_size": 64,
         "threads": 1, "model_config": {"stem": 8, "widths": (16, 32)}}
SMOKE_BEST = {"model_config": {"stem": 4, "widths": (8, 8, 8)}, "epochs": 2}


def overrides(preset: str, smoke: bool, **extra) -> dict:
    if not smoke:
        return extra
    return {**SMOKE, **(SMOKE_BEST if preset == "best-gpu" else {}), **extra}


def _loop_parts(preset: str, ovr: dict, device: torch.device):
    cfg = config.resolve(preset, {k: v for k, v in ovr.items() if k != "subset"})
    torch.manual_seed(0)
    model = create_model(cfg.model, model_config(cfg.model, cfg.model_config)).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cfg, model, make_optimizer(model, cfg, device), (EMA(model, cfg.ema) if cfg.ema else None)


def _epoch(cfg, model, opt, ema, x, y, device):
    with bench._quiet("fmnist.training.train"):
        return train_one_epoch(model, opt, ema, x, y, cfg, epoch=1, step=0, total_steps=10 ** 6,
                               gen=epoch_generators(0, 1, 0, device), dist=DistInfo())


def probe(preset: str, ovr: dict, ds, device: torch.device, steps: int) -> dict:
    """ms per step of `preset`'s training loop (augmentation, forward, backward, optimizer, EMA)
    over `steps` steps after 3 of warm-up, and the epoch that makes (validation not included)."""
    cfg, model, opt, ema = _loop_parts(preset, ovr, device)
    bs = cfg.batch_size
    x, y = ds.train_images[:(steps + 3) * bs].to(device), ds.train_labels[:(steps + 3) * bs].to(device)
    _epoch(cfg, model, opt, ema, x[:3 * bs], y[:3 * bs], device)
    t = time.perf_counter()
    _epoch(cfg, model, opt, ema, x[3 * bs:], y[3 * bs:], device)  # ends with a read: every step is done
    ms = (time.perf_counter() - t) / steps * 1000
    per_epoch = ms / 1000 * -(-(ovr.get("subset") or TRAIN_IMAGES) // bs)
    r = {"preset": preset, "model": cfg.model, "batch": bs, "steps": steps, "ms_per_step": ms,
         "img_s": bs / ms * 1000, "projected_train_seconds_per_epoch": per_epoch,
         "projected_train_seconds": per_epoch * cfg.epochs, "epochs": cfg.epochs}
    log.info(f"probe {preset}: {ms:.1f} ms/step at batch {bs} -> {per_epoch:.2f} s/epoch, "
             f"{r['projected_train_seconds']:.0f} s for {cfg.epochs} epochs (training only)")
    return r


def syncs(ovr: dict, ds, device: torch.device, steps=(10, 30)) -> dict:
    """Host syncs in epochs of gpu's loop of 10 and 30 steps, as CUDA's sync debug mode reports
    them: the difference is what a step costs (expected 0; the end of an epoch reads its figures)."""
    if device.type != "cuda":
        return {"skipped": "CUDA only (torch.cuda.set_sync_debug_mode)"}
    cfg, model, opt, ema = _loop_parts("gpu", ovr, device)
    n = max(steps) * cfg.batch_size
    x, y = ds.train_images[:n].to(device), ds.train_labels[:n].to(device)
    _epoch(cfg, model, opt, ema, x, y, device)  # warm-up: cuDNN's algorithm search syncs, once
    counts, msgs = {}, set()
    for k in steps:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _epoch(cfg, model, opt, ema, x[:k * cfg.batch_size], y[:k * cfg.batch_size], device)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[str(k)] = len(caught)
        msgs |= {str(w.message).splitlines()[0][:200] for w in caught}
    per_step = (counts[str(steps[-1])] - counts[str(steps[0])]) / (steps[-1] - steps[0])
    log.info(f"syncs: {counts} in epochs of {steps} steps: {per_step:g} per step (expected 0)")
    return {"syncs_per_epoch_of_steps": counts, "syncs_per_step": per_step, "distinct": sorted(msgs)}


class Session:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "gpu_bench.json"
        self.device = pick_device("cpu" if args.smoke else args.device)
        self.report = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.report.setdefault("sittings", []).append({"environment": environment(self.device),
                                                       "parts": args.parts, "smoke": args.smoke})
        self.report.setdefault("environment", self.report["sittings"][0]["environment"])
        self.report.setdefault("accuracy", {})
        self.save()

    def reference(self, ds) -> dict:
        smoke = self.args.smoke
        return bench.seed_epoch(str(self.device), subset=SMOKE["subset"] if smoke else 0,
                                warmup_steps=2 if smoke else 20, ds=ds)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def save(self):
        write_json(self.path, self.report)

    def part(self, name: str, fn):
        """Run one part; a part that raises is recorded as failed and the call goes on, since GPU
        time is scarce and the other parts' figures are worth keeping."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (recorded, then the next part)
            log.exception(f"{name}: failed")
            self.report.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"[:500]
            self.save()
            return None

    def accuracy(self, key: str, spec: str, seeds, **extra):
        preset = spec.partition("@")[0].partition("*")[0]
        ovr = overrides(preset, self.args.smoke, device=str(self.device), **extra)
        res = bench.accuracy_runs([spec], list(seeds), Path(self.args.runs), overrides=ovr,
                                  reference=self.report["reference"])
        self.report["accuracy"][key] = res[spec.partition("*")[0]]
        s = self.report["accuracy"][key]["summary"]
        log.info(f"{key}: final {s['final_test_acc_median']:.4f} (median of {s['n']}), "
                 f"to 94% {s.get('time_to_0.94_median')} s, wall {s['wall_seconds_median']:.1f} s")


def final_run(spec: str, ovr: dict, runs: Path) -> dict:
    """One seed-0 run of `spec` (PRESET or PRESET@EPOCHS) as `fmnist train` makes it, then its
    best.pt on the test set: final accuracy, seconds of training and of training + validation
    (as bench accuracy counts wall time), and the whole call's seconds (checkpoints, calibration)."""
    from fmnist.evaluation.evaluate import evaluate_run
    from fmnist.training.train import train

    preset, _, epochs = spec.partition("@")
    cfg = config.resolve(preset, {**ovr, **({"epochs": int(epochs)} if epochs else {}), "seed": 0,
                                  "out_dir": str(runs)})
    t = time.perf_counter()
    with bench._quiet("fmnist.training.train"):
        run_dir = train(cfg)
    call = time.perf_counter() - t
    hist = bench.read_history(run_dir / "history.csv")
    m = evaluate_run(run_dir, device=cfg.device)
    r = {"spec": spec, "seed": 0, "epochs": cfg.epochs, "final_test_acc": m["test_acc"],
         "best_val_acc": max(h["val_acc"] for h in hist),
         "train_seconds": sum(h["seconds"] for h in hist),
         "wall_seconds": sum(h["seconds"] + h["eval_seconds"] for h in hist), "call_seconds": call,
         "val_curve": [[round(w, 3), a] for w, a in bench.wall_curve(run_dir, key="val_acc")]}
    log.info(f"{spec}: final test {r['final_test_acc']:.4f} after {r['wall_seconds']:.0f} s of training and "
             f"validation ({call:.0f} s in all)")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/gpu", help="folder for gpu_bench.json (default: bench/gpu)")
    ap.add_argument("--runs", default="/tmp/fmnist-gpu-bench", help="folder for run directories "
                    "(default: /tmp/fmnist-gpu-bench)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="seconds this call may take; parts that do not fit are skipped, best-gpu is "
                         "shortened (default: 540)")
    ap.add_argument("--device", default="auto", help="default: auto (cuda where there is one)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks this script (default: off)")
    args = ap.parse_args(argv)
    args.parts = args.parts.split(",")
    if set(args.parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(args.parts) - set(PARTS))}; choose from {', '.join(PARTS)}")
    setup_logging(logging.INFO)
    if args.smoke:
        torch.set_num_threads(1)
    s = Session(args)
    if s.device.type != "cuda" and not args.smoke:
        log.warning(f"no GPU here ({s.device}): the figures will be this machine's, not a GPU's")
    ds = data.load()  # $FMNIST_DATA when set (and then only there)
    steps = 2 if args.smoke else 30
    s.report["reference"] = s.report["sittings"][-1]["reference"] = s.reference(ds)
    s.save()
    if "probe" in args.parts:
        s.report["probe"] = {}
        for p in ("fast", "gpu", "best-gpu"):
            r = s.part(f"probe {p}", lambda: probe(p, overrides(p, args.smoke), ds, s.device, steps))
            if r:
                s.report["probe"][p] = r
        s.save()
    if "syncs" in args.parts:
        s.report["syncs"] = s.part("syncs", lambda: syncs(overrides("gpu", args.smoke), ds, s.device))
        s.save()
    plan = [("fast", "fast", [0], {}), ("gpu", "gpu", [0, 1, 2], {}),
            ("graphs", "gpu", [0], {"compile": True, "compile_mode": "reduce-overhead"})]
    for part, spec, seeds, extra in plan:
        if part not in args.parts:
            continue
        est = s.report.get("probe", {}).get(spec, {}).get("projected_train_seconds", 0) * 1.5 * len(seeds)
        if est > s.left():
            log.warning(f"{part}: skipped, ~{est:.0f} s projected, {s.left():.0f} s left of --budget")
            s.report.setdefault("skipped", {})[part] = f"~{est:.0f} s projected, {s.left():.0f} s left"
            continue
        key = "gpu --compile --compile-mode reduce-overhead" if part == "graphs" else spec
        s.part(part, lambda: s.accuracy(key, spec, seeds, **extra))
        s.save()
    if "best-gpu" in args.parts:
        spec = "best-gpu"
        per_epoch = s.report.get("probe", {}).get("best-gpu", {}).get("projected_train_seconds_per_epoch")
        epochs = config.resolve("best-gpu", overrides("best-gpu", args.smoke)).epochs
        # an epoch's wall time beyond its training steps: validation (on an H200: 2.17 s an epoch
        # of training and validation against the probe's 1.96 s of training) and last.pt now and
        # then; 30 s kept for calibration, the one test pass and the closing reference
        epoch_wall = (per_epoch * 1.25 + (0 if args.smoke else 0.3)) if per_epoch else None
        if epoch_wall and epoch_wall * epochs > s.left() - 30:
            fit = max(1, int((s.left() - 30) / epoch_wall))
            if fit < epochs:
                spec = f"best-gpu@{fit}"
                log.warning(f"best-gpu: {epochs} epochs (~{per_epoch * epochs:.0f} s) do not fit the "
                            f"{s.left():.0f} s left; running {spec}, a {fit}-epoch schedule")
        r = s.part("best-gpu", lambda: final_run(spec, overrides("best-gpu", args.smoke, device=str(s.device)),
                                                  Path(args.runs)))
        if r:
            r["wall_seed_epochs"] = r["wall_seconds"] / s.report["reference"]["seconds"]
            s.report.setdefault("final", {})[spec] = r
        s.save()
    s.report["reference"]["seconds_after"] = s.reference(ds)["seconds"]
    s.save()
    log.info(f"wrote {s.path} after {time.perf_counter() - s.t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
