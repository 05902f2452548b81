"""The server before and after issue 12's performance work, measured in one sitting.

    git worktree add /tmp/base b1bae97        # the server before the work
    python scripts/serve_before_after.py --before /tmp/base/src --out bench/cpu-serve
    python scripts/serve_before_after.py --render bench/cpu-serve/before_after.json   # the table again

Each setting is its own server process driven by wrk as `fmnist bench serve` drives it (one
thread, keep-alive), PyTorch and ONNX Runtime fp32, each at shipped defaults; the raw-body
payload only after (the route is new). The code before ran without uvloop (hidden here, see
profile_serve.before_env). Before each setting it waits for the machine to be idle (other jobs
on a shared machine), and every load level records the cores the server and the whole machine
kept busy. Appends a sitting to OUT/before_after.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fmnist.bench import loadtest
from fmnist.utils.atomic import append_sitting  # noqa: E402
from fmnist.inference.export import export  # noqa: E402
from fmnist.inference.predict import default_checkpoint  # noqa: E402
from fmnist.utils.runinfo import environment  # noqa: E402
from profile_serve import before_env, wait_for_quiet  # noqa: E402


def table(settings: dict) -> str:
    lines = ["| setting | payload | connections | requests/s | p50 | p99 | errors | cores busy: server / machine |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, s in settings.items():
        for r in s["rows"]:
            lines.append(f"| {label} | {r['payload']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.1f} ms | "
                         f"{r['p99_ms']:.1f} ms | {r['errors']} | {r['server_cores']:.2f} / {r['machine_cores']:.2f} |")
    for label, s in settings.items():  # fmnist bench serve's serve.json has a soak
        if k := s.get("soak"):
            lines.append(f"\nSoak ({label}, {k['payload']}): {k['connections']} connections for {k['seconds']:.0f} s, "
                         f"{k['requests']:,} requests, {k['rps']:.0f} requests/s, p99 {k['p99_ms']:.0f} ms, "
                         f"{k['errors']} errors; server RSS {k['rss_mb_before']:.0f} MiB before, "
                         f"{k['rss_mb_after']:.0f} MiB after.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", metavar="SRC", help="src folder of the code before (required to measure)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only print the table of the last sitting in this before_after.json or fmnist bench "
                         "serve's serve.json (default: measure)")
    ap.add_argument("--out", default="bench/cpu-serve", help="output folder (default: bench/cpu-serve)")
    ap.add_argument("--seconds", type=float, default=10, help="per load level (default: 10)")
    ap.add_argument("--warmup", type=float, default=3, help="per payload (default: 3)")
    args = ap.parse_args()
    if args.render:
        print(table(json.loads(Path(args.render).read_text())["sittings"][-1]["settings"]))
        return 0
    if not args.before:
        ap.error("--before SRC is required to measure")
    if not shutil.which("wrk"):
        raise SystemExit("error: needs wrk (make wrk)")
    loads = loadtest.payloads(None)
    old_loads = [p for p in loads if p.name != "photo-raw"]
    before, after = before_env(args.before), dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        onnx = ["--backend", "onnx", "--checkpoint", str(export(default_checkpoint(), f"{tmp}/m.onnx", quiet=True))]
        runs = [("before torch", [], before, old_loads), ("after torch", [], after, loads),
                ("before onnx", onnx, before, old_loads), ("after onnx", onnx, after, loads)]
        settings = {}
        for label, extra, env, ld in runs:
            idle = wait_for_quiet()
            settings[label] = loadtest.bench_setting(label, extra, ld, (1, 32), args.seconds, args.warmup, "wrk", env=env)
            settings[label]["busy_cores_before"] = idle
    for s in settings.values():
        s["args"] = [a if not a.endswith(".onnx") else "<exported fp32 .onnx>" for a in s["args"]]
    sitting = {"environment": environment("cpu"), "command": " ".join(sys.argv), "before_src": args.before,
               "versions": loadtest.versions(), "seconds_per_level": args.seconds, "runs": 1,
               "payloads": {p.name: {"about": p.about, "bytes": len(p.body), "image_sha256": p.sha256} for p in loads},
               "settings": settings}
    n = append_sitting(Path(args.out) / "before_after.json", sitting)
    print(table(settings))
    print(f"added sitting {n} to {Path(args.out) / 'before_after.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
