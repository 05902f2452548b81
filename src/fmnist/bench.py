"""`fmnist bench`: hardware efficiency and time-to-accuracy, measured in one run on one machine.

  throughput  fp32 matmul peak; per model: training and inference images/s, FLOPs per image
              (counted by torch.utils.flop_counter), achieved GFLOP/s and its share of the peak;
              eager vs torch.compile (compile time included)
  accuracy    trains each preset for each seed, evaluating the *test* set after every epoch for
              reporting only (nothing is chosen on it), and reports wall time to 92/93/94%

Writes bench.json and time_to_accuracy.png into --out.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .atomic import atomic_path, write_json
from .models import REGISTRY, count_parameters, create_model
from .runinfo import environment

THRESHOLDS = (0.92, 0.93, 0.94)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Achieved fp32 GFLOP/s of a large square matmul: the practical ceiling for conv nets here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best / 1e9


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


def time_train_steps(model, batch: int, steps: int = 12, warmup: int = 3, channels_last: bool = True) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t)


@torch.no_grad()
def time_inference(model, batch: int, steps: int = 20, warmup: int = 3, channels_last: bool = True) -> float:
    model.eval()
    x = torch.rand(batch, 1, 28, 28)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        model(x)
    return batch * steps / (time.perf_counter() - t)


def throughput(models=None, batch: int = 256, compile_check: bool = True, log=print) -> dict:
    peak = matmul_peak()
    log(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    out = {"matmul_peak_gflops": peak, "batch": batch, "models": {}}
    for name in models or list(REGISTRY):
        torch.manual_seed(0)
        m = create_model(name)
        tf, inf = train_flops_per_image(m)
        m = m.to(memory_format=torch.channels_last)
        tr = time_train_steps(m, batch)
        ev = time_inference(m, batch)
        r = {"params": count_parameters(m), "train_mflop_per_image": tf / 1e6, "infer_mflop_per_image": inf / 1e6,
             "train_img_s": tr, "infer_img_s": ev, "train_gflops": tr * tf / 1e9, "infer_gflops": ev * inf / 1e9}
        r["train_peak_ratio"] = r["train_gflops"] / peak
        r["infer_peak_ratio"] = r["infer_gflops"] / peak
        log(f"{name:>6}: {r['params']:>9,} params  train {tr:7.0f} img/s {r['train_gflops']:6.1f} GFLOP/s "
            f"({r['train_peak_ratio']:.0%} of peak)  infer {ev:7.0f} img/s ({r['infer_peak_ratio']:.0%})")
        out["models"][name] = r
    if compile_check:
        out["compile"] = compile_comparison(batch, log=log)
    return out


def compile_comparison(batch: int, steps: int = 200, log=print) -> dict:
    """Eager vs torch.compile on `fast` for `steps` training steps, compile time included."""
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
            log(f"  {mode}: failed ({type(e).__name__})")
            continue
        total = time.perf_counter() - t0
        res[mode] = {"steady_img_s": rate, "total_seconds_for_steps": total, "steps": steps + 1}
        log(f"  fast {mode:>7}: {rate:7.0f} img/s steady, {total:6.1f} s for {steps + 1} steps incl. compile")
    return res


def accuracy_runs(presets, seeds, out_dir: Path, epochs: dict | None = None, log=print) -> dict:
    from . import config
    from .train import train

    results = {}
    for spec in presets:
        # "fast@8" = the fast preset with an 8-epoch schedule (a shorter budget, not a cut-off run)
        preset, _, n_epochs = spec.partition("@")
        runs = []
        for seed in seeds:
            overrides = {"seed": seed, "out_dir": str(out_dir / "runs"), "report_test": True}
            if n_epochs:
                overrides["epochs"] = int(n_epochs)
            elif epochs and preset in epochs:
                overrides["epochs"] = epochs[preset]
            cfg = config.resolve(preset, overrides)
            log(f"training {spec} seed {seed} ({cfg.epochs} epochs)...")
            run_dir = train(cfg, quiet=True, evaluate_at_end=False)
            hist = _read_history(run_dir / "history.csv")
            wall, curve = 0.0, []
            for h in hist:
                wall += h["seconds"] + h["eval_seconds"]  # training + validation; the test pass is reporting only
                curve.append((wall, h["test_acc"]))
            reach = {f"{t:.2f}": next((w for w, a in curve if a >= t), None) for t in THRESHOLDS}
            runs.append({"seed": seed, "run_dir": str(run_dir), "curve": curve, "final_test_acc": curve[-1][1],
                         "wall_seconds": wall, "time_to": reach})
            log(f"  final test acc {curve[-1][1]:.4f} in {wall:.0f} s; time to " +
                ", ".join(f"{k}: {'-' if v is None else f'{v:.0f}s'}" for k, v in reach.items()))
        results[spec] = {"runs": runs, "summary": _summarise(runs)}
        write_json(out_dir / "accuracy_partial.json", results)  # a long benchmark keeps what it measured
    return results


def _summarise(runs) -> dict:
    accs = [r["final_test_acc"] for r in runs]
    s = {"n": len(runs), "final_test_acc_median": statistics.median(accs),
         "final_test_acc_mean": statistics.mean(accs),
         "final_test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
         "wall_seconds_median": statistics.median(r["wall_seconds"] for r in runs)}
    for t in THRESHOLDS:
        k = f"{t:.2f}"
        times = [r["time_to"][k] for r in runs]
        reached = [x for x in times if x is not None]
        # Median over seeds; a seed that never reached the threshold counts as infinitely slow.
        s[f"time_to_{k}_median"] = statistics.median([x if x is not None else float("inf") for x in times])
        s[f"time_to_{k}_reached"] = f"{len(reached)}/{len(times)}"
    return s


def _read_history(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def plot(results: dict, path: Path) -> None:
    from .plots import _plt, _save

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


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment("cpu" if args.device == "auto" else args.device)}
    if args.threads:
        torch.set_num_threads(args.threads)
    if "throughput" in args.parts:
        report["throughput"] = throughput(compile_check=not args.no_compile_check)
        write_json(out / "bench.json", report)
    if "accuracy" in args.parts:
        seeds = list(range(args.seeds))
        epochs = dict(kv.split("=") for kv in args.epochs.split(",")) if args.epochs else {}
        report["accuracy"] = accuracy_runs(args.presets.split(","), seeds, out,
                                           {k: int(v) for k, v in epochs.items()})
        plot(report["accuracy"], out / "time_to_accuracy.png")
    write_json(out / "bench.json", report)
    print(f"wrote {out / 'bench.json'}" + (f" and {out / 'time_to_accuracy.png'}" if "accuracy" in args.parts else ""))
    return 0
