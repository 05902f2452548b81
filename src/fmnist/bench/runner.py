"""`fmnist bench`: hardware efficiency and time-to-accuracy, measured in one run on one machine.

  throughput  fp32 matmul and dense-conv peaks; per model: training and inference images/s, FLOPs per image
              (counted by torch.utils.flop_counter), achieved GFLOP/s and its share of the peak;
              eager vs torch.compile (compile time included)
  profile     torch.profiler over steps of `fast`'s real training loop: self time by op kind
  accuracy    times one training epoch of the `seed` network first (the reference workload), then
              trains each preset for each seed, evaluating the *test* set after every epoch for
              reporting only (nothing is chosen on it), and reports wall time to 92/93/94/95%, in
              seconds and in "seed epochs" (multiples of the reference), so that runs on
              different machines, or on one machine whose speed drifts, can be compared

Writes bench.json and time_to_accuracy.png into --out.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmnist.utils.atomic import write_json
from fmnist.models.networks import REGISTRY, count_parameters, create_model
from fmnist.utils.runinfo import environment

log = logging.getLogger(__name__)

THRESHOLDS = (0.92, 0.93, 0.94, 0.95)


def _best_seconds(fn, reps: int = 10, rounds: int = 3, warmup: int = 3) -> float:
    """Fastest of `rounds` timings of `reps` calls: the least disturbed by other load."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - t)
    return best


def _images_per_second(step, batch: int, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def matmul_peak(n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    """Achieved GFLOP/s of a large square matmul: the practical ceiling for conv nets here."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 * reps / _best_seconds(lambda: a @ b, reps) / 1e9


def conv_peak(c: int = 256, hw: int = 7, batch: int = 256, reps: int = 10, dtype=torch.float32) -> float:
    """Achieved GFLOP/s of a large dense 3x3 convolution (oneDNN). On CPUs where the BLAS
    is not tuned (MKL's sgemm on AMD runs below oneDNN's conv kernels), this, not the
    matmul, is the real ceiling for a conv net: a ratio to the matmul peak can exceed 100%."""
    x = torch.randn(batch, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return 2 * batch * c * c * 9 * hw * hw * reps / _best_seconds(lambda: F.conv2d(x, w, padding=1), reps) / 1e9


def train_flops_per_image(model, batch: int = 64) -> tuple[float, float]:
    """(training FLOPs, inference FLOPs) per image: forward+backward, and forward alone."""
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train = fc.get_total_flops() / batch
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    model.train()
    return train, fc.get_total_flops() / batch


def time_train_steps(model, batch: int, steps: int = 12, warmup: int = 3, channels_last: bool = True,
                     amp: str = "off") -> float:
    from fmnist.inference.forward import autocast

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with autocast(x.device, amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _images_per_second(step, batch, steps, warmup)


@torch.no_grad()
def time_inference(model, batch: int, steps: int = 20, warmup: int = 3, channels_last: bool = True,
                   amp: str = "off") -> float:
    from fmnist.inference.forward import autocast

    model.eval()
    x = torch.rand(batch, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with autocast(x.device, amp):
            model(x)

    return _images_per_second(step, batch, steps, warmup)


def throughput(models=None, batch: int = 256, compile_check: bool = True, matmul_n: int = 2048,
               steps: int = 12) -> dict:
    from fmnist.inference.forward import bf16_fast

    peaks = {"fp32": matmul_peak(matmul_n)}
    conv_peaks = {"fp32": conv_peak(batch=batch)}
    precisions = ["fp32"]
    if bf16_fast(torch.device("cpu")):
        peaks["bf16"] = matmul_peak(matmul_n, dtype=torch.bfloat16)
        conv_peaks["bf16"] = conv_peak(batch=batch, dtype=torch.bfloat16)
        precisions.append("bf16")
    log.info("matmul peak: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
             + "; dense 3x3 conv peak: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in conv_peaks.items())
             + f" ({torch.get_num_threads()} threads)")
    out = {"matmul_peak_gflops": peaks, "conv_peak_gflops": conv_peaks, "batch": batch, "models": {}}
    for name in models or list(REGISTRY):
        torch.manual_seed(0)
        m = create_model(name)
        tf, inf = train_flops_per_image(m, batch=min(batch, 64))  # per image: any batch counts the same
        m = m.to(memory_format=torch.channels_last)
        r = {"params": count_parameters(m), "train_mflop_per_image": tf / 1e6, "infer_mflop_per_image": inf / 1e6}
        for prec in precisions:
            amp = "bf16" if prec == "bf16" else "off"
            tr = time_train_steps(m, batch, steps=steps, warmup=min(3, steps), amp=amp)
            ev = time_inference(m, batch, steps=steps, warmup=min(3, steps), amp=amp)
            r[prec] = {"train_img_s": tr, "infer_img_s": ev, "train_gflops": tr * tf / 1e9,
                       "infer_gflops": ev * inf / 1e9,
                       "train_peak_ratio": tr * tf / 1e9 / peaks[prec], "infer_peak_ratio": ev * inf / 1e9 / peaks[prec],
                       "train_vs_fp32_peak": tr * tf / 1e9 / peaks["fp32"],
                       "train_conv_peak_ratio": tr * tf / 1e9 / conv_peaks[prec]}
            q = r[prec]
            log.info(f"{name:>6} {prec}: {r['params']:>9,} params  train {tr:6.0f} img/s {q['train_gflops']:6.1f} GFLOP/s "
                     f"({q['train_peak_ratio']:.0%} of {prec} matmul peak, {q['train_conv_peak_ratio']:.0%} of {prec} "
                     f"conv peak, {q['train_vs_fp32_peak']:.0%} of fp32 matmul peak)  "
                     f"infer {ev:6.0f} img/s ({q['infer_peak_ratio']:.0%})")
        out["models"][name] = r
    if compile_check:
        out["compile"] = compile_comparison(batch)
    return out


def compile_comparison(batch: int, steps: int = 200) -> dict:
    """Eager vs torch.compile on `fast` for `steps` training steps, compile time included
    (fp32: the comparison is about the compiler, not the precision)."""
    res = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        m = create_model("fast").to(memory_format=torch.channels_last)
        fwd = m
        t0 = time.perf_counter()
        try:
            if mode == "compile":
                fwd = torch.compile(m)
            rate = time_train_steps(fwd, batch, steps=steps, warmup=1)
        except Exception as e:  # no C++ toolchain etc.: report, do not fail the benchmark
            res[mode] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log.info(f"  {mode}: failed ({type(e).__name__})")
            continue
        total = time.perf_counter() - t0
        res[mode] = {"steady_img_s": rate, "total_seconds_for_steps": total, "steps": steps + 1}
        log.info(f"  fast {mode:>7}: {rate:7.0f} img/s steady, {total:6.1f} s for {steps + 1} steps incl. compile")
    return res


REFERENCE_WORKLOAD = ("one training epoch of the `seed` preset (the assignment's CNN, batch 64, fp32, Adam) over "
                      "its training split, after a warm-up")


def seed_epoch(device: str = "auto", subset: int = 0, warmup_steps: int = 20, ds=None) -> dict:
    """Time the reference workload on `device`: one epoch of `seed` over the 54,000 images a seed
    run trains on (the first `subset` of them, for tests), through the real training loop; `ds`:
    the dataset if loaded already. Returns {"workload", "seconds", "images", "device", "threads"}."""
    from fmnist import data
    from fmnist.training import config
    from fmnist.training.distributed import DistInfo
    from fmnist.models.networks import model_config
    from fmnist.utils.runinfo import pick_device
    from fmnist.training.train import epoch_generators, make_optimizer, train_one_epoch

    dev = pick_device(device)
    cfg = config.resolve("seed", {"device": str(dev)})
    ds = ds or data.load()
    train_idx, _ = data.stratified_split(ds.train_labels, cfg.val_fraction, cfg.seed)
    if subset:
        train_idx = train_idx[:subset]
    x, y = ds.train_images[train_idx].to(dev), ds.train_labels[train_idx].to(dev)
    torch.manual_seed(0)
    model = create_model(cfg.model, model_config(cfg.model)).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg, dev)

    def epoch(xs, ys):
        with _quiet("fmnist.training.train"):  # no progress bar
            return train_one_epoch(model, opt, None, xs, ys, cfg, epoch=1, step=0, total_steps=1,
                                   gen=epoch_generators(0, 1, 0, dev), dist=DistInfo())

    n_warm = warmup_steps * cfg.batch_size  # first calls pick kernels and allocate: not the workload
    epoch(x[:n_warm], y[:n_warm])
    t = time.perf_counter()
    epoch(x, y)  # ends by reading its loss from the device, so the time includes every step
    seconds = time.perf_counter() - t
    log.info(f"reference: one `seed` epoch ({len(x):,} images, batch {cfg.batch_size}) on {dev}: {seconds:.2f} s")
    return {"workload": REFERENCE_WORKLOAD, "seconds": seconds, "images": len(x), "device": str(dev),
            "threads": torch.get_num_threads()}


def time_to(curve, thresholds=THRESHOLDS) -> dict:
    """{"0.93": first wall time at which the accuracy reached 93%, or None} from a run's curve
    of (wall time, accuracy): test accuracy in `bench accuracy`, validation in the sweeps."""
    return {f"{t:.2f}": next((w for w, a in curve if a >= t), None) for t in thresholds}


def in_seed_epochs(run: dict) -> dict:
    """The run's times as multiples of its call's reference (run["seed_epoch_seconds"]):
    adds wall_seed_epochs and time_to_seed_epochs (None where the threshold was not reached)."""
    ref = run["seed_epoch_seconds"]
    return {**run, "wall_seed_epochs": run["wall_seconds"] / ref,
            "time_to_seed_epochs": {k: None if v is None else v / ref for k, v in run["time_to"].items()}}


def accuracy_runs(presets, seeds, out_dir: Path, epochs: dict | None = None, overrides: dict | None = None,
                  reference: dict | None = None) -> dict:
    """Train each preset spec for each seed; `overrides` go to every run (e.g. device, or a
    subset for tests); with `reference` (seed_epoch()), every time is also given in seed epochs."""
    from fmnist.training import config
    from fmnist.training.train import train

    results = {}
    for spec in presets:
        # "fast@8" = the fast preset with an 8-epoch schedule (a shorter budget, not a cut-off run);
        # "best-cpu*1" = only the first seed (for presets too long to repeat)
        name, _, n_seeds = spec.partition("*")
        preset, _, n_epochs = name.partition("@")
        if name in results:
            raise ValueError(f"preset {name!r} is listed twice in --presets")
        runs = []
        for seed in (seeds[:int(n_seeds)] if n_seeds else seeds):
            given = {"seed": seed, "out_dir": str(out_dir / "runs"), "report_test": True}
            if n_epochs:
                given["epochs"] = int(n_epochs)
            elif epochs and preset in epochs:
                given["epochs"] = epochs[preset]
            cfg = config.resolve(preset, {**given, **(overrides or {})})
            log.info(f"training {spec} seed {seed} ({cfg.epochs} epochs)...")
            try:
                with _quiet("fmnist.training.train", "fmnist.evaluation.calibrate"):  # this part's own lines report each run
                    run_dir = train(cfg)
            except KeyboardInterrupt:
                done = sum(len(r["runs"]) for r in results.values())
                if done:
                    log.warning(f"interrupted: the {done} finished run(s) are in {out_dir / 'accuracy_partial.json'}")
                raise
            curve = wall_curve(run_dir)
            wall = curve[-1][0]
            reach = time_to(curve)
            run = {"seed": seed, "run_dir": str(run_dir), "curve": curve, "final_test_acc": curve[-1][1],
                   "wall_seconds": wall, "time_to": reach}
            if reference is not None:
                run = in_seed_epochs({**run, "seed_epoch_seconds": reference["seconds"]})
            runs.append(run)
            # Keyed by NAME without "*K": the seeds are in the runs, and --append can add more later.
            results[name] = {"runs": runs, "summary": _summarise(runs)}
            # After every run, not every preset: a cut-off in a preset's third 15-minute seed
            # keeps the first two (a long benchmark keeps what it measured).
            write_json(out_dir / "accuracy_partial.json", results)
            ratio = (lambda k: f" = {run['time_to_seed_epochs'][k]:.1f}x") if reference else (lambda k: "")
            log.info(f"  final test acc {curve[-1][1]:.4f} in {wall:.0f} s; time to " +
                     ", ".join(f"{k}: {'-' if v is None else f'{v:.0f}s' + ratio(k)}" for k, v in reach.items()))
    return results


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Only warnings from these loggers while the block runs (and no progress bars)."""
    saved = [(lg, lg.level) for lg in map(logging.getLogger, loggers)]
    for lg, level in saved:
        lg.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def parse_seeds(text: str) -> list[int]:
    """'3' = seeds 0, 1, 2; '1,2' = exactly seeds 1 and 2 (to add seeds to an earlier run)."""
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be a count (e.g. 3) or a comma-separated list of seeds (e.g. 1,2), "
                         f"got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds list must hold distinct non-negative seeds, got {text!r}")
    return seeds


def merge_accuracy(old: dict, new: dict) -> dict:
    """Add `new` runs to an earlier accuracy part: a run of the same preset and seed is replaced,
    the summaries are recomputed. Old keys written as NAME*K are read as NAME."""
    merged: dict = {}
    for spec, r in old.items():
        merged.setdefault(spec.partition("*")[0], {})["runs"] = [_complete(run) for run in r["runs"]]
    for name, r in new.items():
        seeds = {run["seed"] for run in r["runs"]}
        kept = [run for run in merged.get(name, {}).get("runs", []) if run["seed"] not in seeds]
        merged[name] = {"runs": sorted(kept + r["runs"], key=lambda run: run["seed"])}
    for r in merged.values():
        r["summary"] = _summarise(r["runs"])
    return merged


def _complete(run: dict) -> dict:
    """A run from an older bench.json: the thresholds added since (95%) from its curve."""
    if "curve" in run and any(f"{t:.2f}" not in run["time_to"] for t in THRESHOLDS):
        run = {**run, "time_to": {**time_to(run["curve"]), **run["time_to"]}}
        if "seed_epoch_seconds" in run:
            run = in_seed_epochs(run)
    return run


def _median_or_none(times) -> float | None:
    """Median over seeds; a seed that never reached the threshold (None) counts as infinitely
    slow, and a median that is such a seed is None (not reached)."""
    median = statistics.median([x if x is not None else float("inf") for x in times])
    return median if median != float("inf") else None


def _summarise(runs) -> dict:
    accs = [r["final_test_acc"] for r in runs]
    s = {"n": len(runs), "final_test_acc_median": statistics.median(accs),
         "final_test_acc_mean": statistics.mean(accs),
         "final_test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
         "wall_seconds_median": statistics.median(r["wall_seconds"] for r in runs)}
    # Seed epochs where every run has its call's reference (runs appended from several calls
    # each carry their own, so the median is over per-run ratios).
    ratios = all("seed_epoch_seconds" in r for r in runs)
    if ratios:
        s["wall_seed_epochs_median"] = statistics.median(r["wall_seed_epochs"] for r in runs)
    for t in THRESHOLDS:
        k = f"{t:.2f}"
        if not all(k in r["time_to"] for r in runs):
            continue  # a threshold older runs were not measured for
        times = [r["time_to"][k] for r in runs]
        s[f"time_to_{k}_median"] = _median_or_none(times)
        s[f"time_to_{k}_reached"] = f"{sum(x is not None for x in times)}/{len(times)}"
        if ratios:
            s[f"time_to_{k}_median_seed_epochs"] = _median_or_none([r["time_to_seed_epochs"][k] for r in runs])
    return s


def wall_curve(run_dir: Path, key: str = "test_acc") -> list[tuple[float, float]]:
    """A run's (wall seconds so far, history[key]) per epoch. Wall time is training plus
    validation; a per-epoch test pass (report_test) is reporting only and not counted."""
    wall, curve = 0.0, []
    for h in read_history(Path(run_dir) / "history.csv"):
        wall += h["seconds"] + h["eval_seconds"]
        curve.append((wall, h[key]))
    return curve


def read_history(path: Path) -> list[dict]:
    """A run's history.csv as dicts of floats (empty cells left out)."""
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plot(results: dict, path: Path) -> None:
    from fmnist.evaluation.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (preset, r) in enumerate(results.items()):
        for j, run in enumerate(r["runs"]):
            w, a = zip(*run["curve"])
            ax.plot(w, [x * 100 for x in a], "o-", ms=3, color=colours[i % len(colours)], alpha=0.8,
                    label=f"{preset} (median final {r['summary']['final_test_acc_median']:.2%})" if j == 0 else None)
    for t in THRESHOLDS:
        ax.axhline(t * 100, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="training wall time (s, train + validation)", ylabel="test accuracy (%)", xscale="log",
           ylim=(88, 96), title="Fashion-MNIST: test accuracy against wall time, per preset and seed")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)


# --dry-run: every part's whole code path at sizes that take seconds, for CI and the test suite
# (a smoke test: the figures it writes mean nothing).
DRY_RUN = {
    # batch 4, one timed step after one warm-up: wrn alone costs 11.7 GFLOP per training image
    "throughput": dict(batch=4, matmul_n=128, steps=1, compile_check=False),
    "accuracy": dict(overrides={"subset": 500, "epochs": 1, "val_fraction": 0.02, "test_subset": 1000}),
    "seed_epoch": dict(subset=512, warmup_steps=2),
    "profile": dict(steps=2, warmup=1),
    "photos": dict(n=50),
    "photos_real": dict(limit=6, test_n=200),
    "conversion_speed": dict(n=2, reps=1),
    "onnx": dict(batch=8, test_n=200, reps=2, latency_n=10, calib_n=64),
    "serve": dict(levels=(2,), seconds=0.3, warmup=0, soak=(2, 0.3), onnx=False, workers=1),
}


def run(args) -> int:
    import json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fmnist.utils.runinfo import pick_device

    env = environment(pick_device(args.device))  # the accuracy part's device (the throughput part runs on CPU)
    seeds = parse_seeds(str(args.seeds))
    report = {"environment": env}
    if args.append:
        # Keep what an earlier run on this machine measured; parts measured now replace theirs,
        # and accuracy runs are added per preset and seed (a 35-minute preset's seeds need not
        # all fit in one call). Each appended call's environment is kept beside the first.
        try:
            report = json.loads((out / "bench.json").read_text())
        except FileNotFoundError:
            raise SystemExit(f"error: --append needs an earlier {out / 'bench.json'}; run without --append first")
        report.setdefault("appended", []).append({"environment": env, "parts": args.parts,
                                                   "presets": args.presets, "seeds": seeds})
    if args.threads:
        torch.set_num_threads(args.threads)
    dry = DRY_RUN if getattr(args, "dry_run", False) else {}
    if "throughput" in args.parts:
        report["throughput"] = throughput(**{"compile_check": not args.no_compile_check, **dry.get("throughput", {})})
        write_json(out / "bench.json", report)
    if "accuracy" in args.parts:
        epochs = dict(kv.split("=") for kv in args.epochs.split(",")) if args.epochs else {}
        # the call's yardstick, before the long runs (--dry-run: a few hundred images of it)
        ref = seed_epoch(args.device, **dry.get("seed_epoch", {}))
        acc = accuracy_runs(args.presets.split(","), seeds, out, {k: int(v) for k, v in epochs.items()},
                            overrides={"device": args.device, **dry.get("accuracy", {}).get("overrides", {})},
                            reference=ref)
        ref["seconds_after"] = seed_epoch(args.device, **dry.get("seed_epoch", {}))["seconds"]
        (report["appended"][-1] if args.append else report)["reference"] = ref
        report["accuracy"] = merge_accuracy(report.get("accuracy", {}), acc) if args.append else acc
        plot(report["accuracy"], out / "time_to_accuracy.png")
    if "profile" in args.parts:
        report["profile"] = profile_training(**dry.get("profile", {}))
    if "photos" in args.parts:
        report["photos"] = photos(checkpoint_path=args.checkpoint, figure=out / "photo_pipeline.png",
                                  **dry.get("photos", {}))
        if args.real:
            report["photos_real"] = photos_real(args.real, args.checkpoint, out, ablation=args.ablation,
                                                nonclothing=args.nonclothing, **dry.get("photos_real", {}))
            report["conversion_speed"] = conversion_speed(args.real, **dry.get("conversion_speed", {}))
        write_json(out / "bench.json", report)
    if "onnx" in args.parts:
        report["onnx"] = onnx_backends(checkpoint_path=args.checkpoint, **dry.get("onnx", {}))
    if "search" in args.parts:
        # Its own file (OUT/search.json), each catalogue size written when done.
        from fmnist.bench import search as bench_search
        bench_search.run(args, env)
        if set(args.parts) == {"search"}:
            return 0
    if "serve" in args.parts:
        # Its own file, one entry per call: earlier figures are never replaced.
        from fmnist.utils.atomic import append_sitting
        from fmnist.bench.loadtest import run_all
        n = append_sitting(out / "serve.json", {"environment": env, **run_all(checkpoint=args.checkpoint,
                                                                             **dry.get("serve", {}))})
        log.info(f"added entry {n} to {out / 'serve.json'}")
        if set(args.parts) == {"serve"}:
            return 0
    write_json(out / "bench.json", report)
    (out / "accuracy_partial.json").unlink(missing_ok=True)  # the accuracy part's safety copy, now in bench.json
    log.info(f"wrote {out / 'bench.json'}" + (f" and {out / 'time_to_accuracy.png'}" if "accuracy" in args.parts else ""))
    return 0


# ---------------------------------------------------------------------------- profile

# Op kinds for the profile, matched in this order (first match wins) against the name of the
# outermost profiled call an op ran under: the forward op (aten::conv2d), the backward node
# (autograd::engine::evaluate_function: ConvolutionBackward0) or the optimizer step.
OP_KINDS = (
    ("optimizer (AdamW)", ("optimizer.",)),
    ("convolution", ("conv",)),
    ("batch norm", ("batch_norm", "batchnorm")),
    ("max pool", ("max_pool", "maxpool", "adaptive_max")),
    ("dtype casts (bf16 autocast)", ("_to_copy", "tocopy", "aten::to", "copy_")),
    ("linear + loss", ("addmm", "mm", "linear", "cross_entropy", "log_softmax", "logsoftmax", "nll_loss",
                       "nllloss", "t_backward", "tbackward")),
    ("ReLU + residual adds", ("relu", "threshold", "add")),
    ("batching + augmentation", ("index", "randperm", "pad", "flip", "where", "gather", "rand", "bernoulli",
                                 "uniform", "arange", "div", "unsqueeze", "contiguous", "sub", "slice")),
)


def _op_kind(event) -> tuple[str, str]:
    """(kind, phase) of a profiled op, from the outermost call it ran under."""
    root = event
    while root.cpu_parent is not None:
        root = root.cpu_parent
    name = root.name.lower()
    phase = ("optimizer" if name.startswith("optimizer.") else
             "backward" if name.startswith("autograd::engine") else "forward, batching, loss")
    kind = next((k for k, keys in OP_KINDS if any(w in name for w in keys)), "other")
    return kind, phase


def profile_training(preset: str = "fast", steps: int = 30, warmup: int = 5) -> dict:
    """Where a training step's time goes: torch.profiler around `steps` steps of the real training
    loop (train.train_one_epoch: batching by index, augmentation, forward, backward, optimizer)
    for `preset`, on CPU, self time summed by op kind."""
    from torch.profiler import ProfilerActivity, profile

    from fmnist import data
    from fmnist.training import config
    from fmnist.training.distributed import DistInfo
    from fmnist.models.networks import model_config
    from fmnist.training.train import EMA, epoch_generators, make_optimizer, train_one_epoch

    cfg = config.resolve(preset, {"device": "cpu"})
    ds = data.load()
    torch.manual_seed(0)
    model = create_model(cfg.model, model_config(cfg.model, cfg.model_config))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    dist = DistInfo()

    def epoch(n_steps):
        n = n_steps * cfg.batch_size
        with _quiet("fmnist.training.train"):  # no progress bar inside the profile
            return train_one_epoch(model, opt, ema, ds.train_images[:n], ds.train_labels[:n], cfg, epoch=1, step=0,
                                   total_steps=10 * n_steps, gen=epoch_generators(0, 1, 0, torch.device("cpu")),
                                   dist=dist)

    epoch(warmup)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        epoch(steps)
        wall = time.perf_counter() - t
    kinds: dict[str, float] = {}
    phases: dict[str, float] = {}
    for e in prof.events():
        kind, phase = _op_kind(e)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total
        phases[phase] = phases.get(phase, 0.0) + e.self_cpu_time_total
    total = sum(kinds.values())

    def per_step(d):
        return {k: {"ms_per_step": v / 1000 / steps, "share": v / total}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])}

    out = {"preset": preset, "model": cfg.model, "batch": cfg.batch_size, "steps": steps,
           "threads": torch.get_num_threads(), "amp": cfg.amp, "wall_seconds": wall,
           "ms_per_step": wall / steps * 1000, "img_s_under_profiler": steps * cfg.batch_size / wall,
           "profiled_ms_per_step": total / 1000 / steps, "kinds": per_step(kinds), "phases": per_step(phases)}
    log.info(f"profile of {steps} {preset} training steps (batch {cfg.batch_size}): {wall / steps * 1000:.1f} ms/step, "
             f"{out['img_s_under_profiler']:.0f} img/s under the profiler")
    for k, r in {**out["phases"], **out["kinds"]}.items():
        log.info(f"  {k:>30}: {r['share']:6.1%}  {r['ms_per_step']:6.1f} ms/step")
    return out


# ---------------------------------------------------------------------------- photos

def photos(n: int = 2000, checkpoint_path=None, seed: int = 0, figure: Path | None = None) -> dict:
    """Test images rendered as product photos (photos.py), run through the whole preprocessing
    pipeline: accuracy against the same images at 28x28."""
    import numpy as np

    from fmnist import data
    from fmnist.photos import render_listing, render_product_photo
    from fmnist.inference.predict import Predictor

    ds = data.load()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds.test_images), size=n, replace=False)
    imgs, labels = ds.test_images[idx].numpy(), ds.test_labels[idx].numpy()
    pred = Predictor(checkpoint_path)
    p28 = pred.probabilities(imgs).argmax(1)
    t = time.perf_counter()
    shots = [render_product_photo(im, rng) for im in imgs]
    t_render = time.perf_counter() - t
    t = time.perf_counter()
    res = pred.predict(shots, top_k=1)
    t_pred = time.perf_counter() - t
    errors = [r.error for r in res if not r.ok]
    classes = pred.class_names
    pp = np.array([classes.index(r.top[0][0]) if r.ok else -1 for r in res])
    # The same photos as shop listings (a brand line, a price badge, a text banner around them);
    # its own generator, so the product photos above stay what earlier calls measured.
    lrng = np.random.default_rng(seed + 1)
    listed = pred.predict([render_listing(s, lrng) for s in shots], top_k=1)
    pl = np.array([classes.index(r.top[0][0]) if r.ok else -1 for r in listed])
    out = {"n": n, "seed": seed, "model": pred.meta.get("model"), "checkpoint": pred.meta.get("checkpoint"),
           "acc_28x28": float((p28 == labels).mean()), "acc_photos": float((pp == labels).mean()),
           "agreement": float((pp == p28).mean()), "errors": len(errors),
           "acc_listings": float((pl == labels).mean()), "listing_agreement": float((pl == pp).mean()),
           "photo_px_mean": float(np.mean([len(s) for s in shots])),
           "seconds_per_photo_predict": t_pred / n, "seconds_render": t_render}
    out["gap_points"] = (out["acc_28x28"] - out["acc_photos"]) * 100
    if figure is not None:
        from fmnist.evaluation.plots import photo_pipeline

        # one photo of each of five classes, for the README
        pick = [int(np.flatnonzero(labels == c)[0]) for c in (0, 1, 5, 8, 9) if (labels == c).any()]
        top3 = pred.predict([shots[i] for i in pick], top_k=3)
        photo_pipeline([shots[i] for i in pick], [r.image for r in top3], [r.top for r in top3],
                       [classes[labels[i]] for i in pick], figure)
    log.info(f"photos: 28x28 accuracy {out['acc_28x28']:.4f}, as product photos {out['acc_photos']:.4f} "
             f"(gap {out['gap_points']:.2f} points, same prediction for {out['agreement']:.1%}), "
             f"{out['seconds_per_photo_predict'] * 1000:.1f} ms per photo end to end; as shop listings "
             f"{out['acc_listings']:.4f} (same prediction as the plain photo for {out['listing_agreement']:.1%})")
    return out


ABLATION = {  # name -> robust.RobustOptions overrides; each drops one step of the robust pipeline
    "robust": {}, "robust - GrabCut": {"grabcut": False}, "robust - main component": {"main_component": False},
    "robust - zero background": {"zero_background": False}, "robust - polarity": {"polarity": False},
    "robust - rectangle prior": {"rect_prior": False}, "robust, strict seed (2x border spread)": {"seed_k": 2.0},
    "robust + contrast stretch": {"normalize": True},
    "robust, thumbnail + subsampling": {"downscale": "thumb", "sharpen": 1.0},
    "robust - antialiasing": {"downscale": "nearest", "sharpen": 1.0},
}


def photos_real(root, checkpoint_path=None, out: Path | None = None, ablation: bool = False,
                nonclothing=None, limit: int | None = None, test_n: int | None = None) -> dict:
    """Real labelled photos (realphotos.py): paper vs robust conversion (and, with ablation, the
    robust pipeline with each step dropped), per split, kind and class, with confusion matrices.
    limit: the first N photos of each split only; test_n: the first N test images only (--dry-run)."""
    import hashlib

    from fmnist.photos import realphotos
    from fmnist.photos import sets
    from fmnist.inference.predict import Predictor
    from fmnist.photos.robust import RobustOptions

    photos_ = realphotos.read_manifest(root)
    manifest = sets.resolve(str(root)).manifest
    variants = {"paper": ("paper", None)}
    for name, kw in (ABLATION if ablation else {"robust": {}}).items():
        variants[name] = ("robust", RobustOptions(**kw))
    res = {"root": str(root), "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
           "n_photos": len(photos_), "variants": {}}
    for name, (pipeline, opts) in variants.items():
        pred = Predictor(checkpoint_path, pipeline=pipeline, robust_options=opts)
        res["model"], res["checkpoint"] = pred.meta.get("model"), pred.meta.get("checkpoint")
        res["variants"][name] = {}
        for split in ("dev", "heldout"):
            sel = realphotos.select(photos_, split)[:limit]
            if not sel:
                continue
            r = realphotos.evaluate(pred, sel)
            res["variants"][name][split] = r
            log.info("photos --real: " + realphotos.summary_line(f"{name} [{split}]", r))
            if out is not None and name in ("paper", "robust"):
                from fmnist.evaluation.plots import confusion_matrix

                confusion_matrix(np.array(r["confusion"]), out / f"real_confusion_{name}_{split}.png",
                                 title=f"real photos, {split}, {name} conversion")
    pred = Predictor(checkpoint_path)
    res["calibration"] = pred.meta.get("calibration")
    from fmnist import data

    ds = data.load()   # the model's own 28x28 test accuracy, beside its photo figures
    x, y = ds.test_images[:test_n].numpy(), ds.test_labels[:test_n].numpy()
    res["test_acc_28x28"] = float((pred.probabilities(x).argmax(1) == y).mean())
    if nonclothing:
        res["nonclothing"] = {}
        for split in ("dev", "heldout"):
            sel = realphotos.select(realphotos.read_manifests(nonclothing), split)[:limit]
            r = realphotos.unsure_rate(pred, sel)
            res["nonclothing"][split] = r
            kinds = "; ".join(f"{k} {v['unsure']}/{v['n']}" for k, v in r["per_kind"].items())
            log.info(f"photos --nonclothing [{split}]: {r['unsure']}/{r['n']} unsure ({kinds}; {r['reasons']})")
    return res


def scaled_jpegs(root, n: int = 12, megapixels: float = 1.0) -> list[bytes]:
    """Every len//n-th real photo of the set `root`, scaled (bicubic) to `megapixels` and
    re-encoded at JPEG quality 90: the inputs conversion timings are quoted for."""
    import io

    from PIL import Image

    from fmnist.photos import realphotos

    allp = realphotos.read_manifest(root, verify=False)
    blobs = []
    for p in allp[:: max(1, len(allp) // n)][:n]:
        im = Image.open(p.path).convert("RGB")
        s = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
        im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def conversion_speed(root, n: int = 12, reps: int = 5, megapixels: float = 1.0) -> dict:
    """ms to convert a 1-megapixel JPEG on one core (decode included): real photos scaled up to
    1 MP and re-encoded (quality 90), each converted `reps` times; median and 90th percentile."""
    import cv2

    from fmnist.photos.preprocess import preprocess

    blobs = scaled_jpegs(root, n, megapixels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    out = {"megapixels": megapixels, "photos": len(blobs), "reps": reps, "threads": 1}
    for pipeline in ("robust", "paper"):
        ts = []
        for b in blobs:
            preprocess(b, pipeline=pipeline)                    # warm-up
            for _ in range(reps):
                t = time.perf_counter()
                preprocess(b, pipeline=pipeline)
                ts.append((time.perf_counter() - t) * 1000)
        out[pipeline] = {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90))}
        log.info(f"conversion of a {megapixels:g}-MP JPEG, one core, {pipeline}: median {out[pipeline]['median_ms']:.1f} ms, "
                 f"p90 {out[pipeline]['p90_ms']:.1f} ms")
    torch.set_num_threads(threads)
    return out


# ---------------------------------------------------------------------------- onnx

def onnx_backends(checkpoint_path=None, batch: int = 256, test_n: int | None = None, reps: int = 20,
                  latency_n: int = 200, calib_n: int = 1024) -> dict:
    """Images/s at `batch` and single-image latency (`latency_n` images) for PyTorch eager, ORT fp32
    and ORT int8, with the test accuracy of each (the first `test_n` test images; None = all).
    All three run the same function: with flip TTA where the model was trained with it (export's
    default), so an image costs two forward passes."""
    import tempfile

    import numpy as np

    from fmnist import data
    from fmnist.models import checkpoint
    from fmnist.inference.export import export
    from fmnist.models.networks import FlipTTA
    from fmnist.inference.onnx_backend import OnnxModel
    from fmnist.inference.predict import default_checkpoint

    src = checkpoint_path or default_checkpoint()
    ds = data.load()
    x_all = ds.test_images[:test_n].numpy()[:, None].astype(np.float32) / 255
    y = ds.test_labels[:test_n].numpy()
    model, ckpt = checkpoint.load_model(src)
    tta = checkpoint.trained_with_tta(ckpt)
    model = (FlipTTA(model, shifts=checkpoint.trained_with_shift_tta(ckpt)) if tta else model
             ).to(memory_format=torch.channels_last)

    @torch.no_grad()
    def torch_logits(x):
        return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    out = {"batch": batch, "checkpoint": str(src), "tta_flip": tta, "backends": {}}
    with tempfile.TemporaryDirectory() as d:
        fp32 = export(src, Path(d) / "m.onnx")
        int8 = export(src, Path(d) / "m.int8.onnx", int8=True, calib_n=calib_n)
        engines = {"pytorch-eager-fp32": torch_logits, "onnxruntime-fp32": OnnxModel(fp32).logits,
                   "onnxruntime-int8": OnnxModel(int8).logits}
        for name, fn in engines.items():
            logits = np.concatenate([fn(x_all[i:i + 1000]) for i in range(0, len(x_all), 1000)])
            acc = float((logits.argmax(1) == y).mean())
            xb = x_all[:batch]
            for _ in range(3):
                fn(xb)
            t = time.perf_counter()
            for _ in range(reps):
                fn(xb)
            ips = batch * reps / (time.perf_counter() - t)
            lat = []
            for i in range(latency_n):
                t = time.perf_counter()
                fn(x_all[i:i + 1])
                lat.append(time.perf_counter() - t)
            lat.sort()
            p50, p99 = lat[latency_n // 2], lat[max(0, round(0.99 * latency_n) - 1)]  # [100], [197] of 200
            out["backends"][name] = {"test_acc": acc, "img_s_batch": ips, "latency_ms_p50": p50 * 1000,
                                     "latency_ms_p99": p99 * 1000}
            log.info(f"{name:>20}: test acc {acc:.4f}  {ips:8.0f} img/s at batch {batch}  "
                     f"single image p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms")
    return out
