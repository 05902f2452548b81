"""Where a served request's CPU time goes: `fmnist serve` under wrk load, sampled with py-spy.

    python scripts/profile_serve.py --out bench/cpu/serve                 # this tree
    git worktree add /tmp/base COMMIT                                     # an older server, to compare
    python scripts/profile_serve.py --out bench/cpu/serve --before /tmp/base/src

For each payload (the 12.8 KB product photo and the 28x28 PNG, multipart, as `fmnist bench
serve` sends them) a server process runs at 32 wrk connections; py-spy samples its threads
(on-CPU samples only) for `--seconds` in the middle of the run. Each sample is put in one part
by the first frame, from the innermost out, that a rule in PARTS matches. Also recorded: the
server's and wrk's CPU seconds per request (/proc and rusage), which is what bounds requests/s
on a machine whose cores the two share. Each thread's exact CPU time (/proc/PID/task) is split
over the parts in proportion to that thread's samples: py-spy also counts a thread that is
runnable but waiting for a core, which on 2 busy cores would overstate the waits. Adds an
entry to OUT/profile.json (earlier entries stay; see bench/README.md) and writes every entry
into OUT/profile.md.
Needs wrk (make wrk) and py-spy (pip install py-spy; in the dev extra).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from fmnist.bench import loadtest
from fmnist.utils.atomic import append_sitting, write_text  # noqa: E402
from fmnist.utils.runinfo import environment  # noqa: E402

# (part, substrings of a frame's "function (file:line)"): the first rule that matches the
# innermost frame wins, else the next frame out is tried.
PARTS = [
    ("photo conversion (robust.py: border model, GrabCut, masks, resize)", ("fmnist/robust.py",)),
    ("decode + orient (Pillow, preprocess.py)", ("fmnist/preprocess.py", "PIL/")),
    ("inference (model forward, flip TTA, softmax)", ("torch/", "onnxruntime", "fmnist/inference.py",
                                                      "fmnist/onnx_backend.py", "Predictor.probabilities")),
    ("multipart parsing (python-multipart, starlette forms)", ("multipart/", "formparsers.py",
                                                              "datastructures.py")),
    ("HTTP/1.1 parsing and writing (uvicorn's h11 / httptools protocol)", ("h11/", "h11_impl.py",
                                                                           "httptools_impl.py", "flow_control.py")),
    ("JSON encoding (response)", ("json/", "encoders.py")),
    ("dynamic batcher (queue, futures)", ("fmnist/batcher.py",)),
    ("app: routing, validation, middleware (FastAPI, Starlette, guards.py, serve.py)",
     ("fastapi/", "starlette/", "pydantic", "fmnist/guards.py", "fmnist/serve.py", "anyio/")),
    ("event loop and thread hand-offs (asyncio, uvloop, concurrent.futures)",
     ("asyncio/", "uvloop", "threading.py", "concurrent/futures", "selectors.py", "uvicorn/")),
]
OTHER = "other (numpy glue, imports, logging)"


def pyspy() -> str | None:
    """py-spy on PATH, or beside this Python (a venv's bin, not on PATH when not activated)."""
    here = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(here) if here.exists() else None)


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for name, keys in PARTS:
            if any(k in frame for k in keys):
                return name
    return OTHER


def thread_kind(name: str) -> str:
    if "convert" in name or "AnyIO worker" in name:
        return "conversion threads"
    if "infer" in name:
        return "inference thread"
    if "MainThread" in name:
        return "event loop (main thread)"
    return "other threads"


# Innermost frames of a thread that is waiting, not computing: py-spy counts a thread woken
# and waiting for a core or the GIL as active, so these are left out of the shares.
WAITING = ("_worker (concurrent/futures/thread.py:81)", "Condition.wait (threading.py", "EpollSelector.select")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread id so far."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        fields = (t / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(t.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def profile_one(label: str, payload: loadtest.Payload, seconds: float, rate: int, extra, env) -> dict:
    port = loadtest.free_port()
    proc = loadtest.start_server(port, extra, env=env)
    try:
        loadtest.measure(port, payload, 32, 3, "wrk")  # warm-up
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "body").write_bytes(payload.body)
            (Path(d) / "post.lua").write_text(loadtest.WRK_SCRIPT)
            wenv = dict(os.environ, FMNIST_BODY=str(Path(d) / "body"), FMNIST_CTYPE=payload.content_type)
            cpu0, threads0, busy0 = loadtest.cpu_seconds(proc.pid), thread_cpu(proc.pid), loadtest.machine_busy_seconds()
            t0 = time.perf_counter()
            wrk = subprocess.Popen(["wrk", "-t1", "-c32", f"-d{round(seconds + 4)}s", "-s", str(Path(d) / "post.lua"),
                                    f"http://127.0.0.1:{port}/v1/predict"], stdout=subprocess.PIPE, text=True, env=wenv)
            time.sleep(2)
            raw = Path(d) / "profile.raw"
            subprocess.run([pyspy(), "record", "-p", str(proc.pid), "-d", str(round(seconds)), "-r", str(rate),
                            "--threads", "--nonblocking", "-f", "raw", "-o", str(raw)], check=True,
                           capture_output=True)
            out = wrk.stdout.read()
            _, status, usage = os.wait4(wrk.pid, 0)  # wrk's own CPU time, from its rusage
            wrk.returncode = os.waitstatus_to_exitcode(status)
            server_cpu, wall = loadtest.cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
            threads1, busy = thread_cpu(proc.pid), loadtest.machine_busy_seconds() - busy0
            stacks = raw.read_text().splitlines()
        r = loadtest.parse_wrk(out)
    finally:
        loadtest.stop_server(proc)
    # Per thread: its exact CPU seconds (/proc), split over parts in proportion to its samples.
    samples, names = collections.defaultdict(collections.Counter), {}
    leaves = collections.Counter()
    for line in stacks:
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        tid, name = frames[0].removeprefix("thread (").split("): ", 1)  # "thread (TID): name"
        names[int(tid)] = name
        if not any(frames[-1].startswith(w) for w in WAITING):
            samples[int(tid)][part_of(frames[1:])] += int(n)
            leaves[frames[-1]] += int(n)
    parts, by_thread = collections.Counter(), collections.Counter()
    for tid, name in names.items():
        cpu = threads1.get(tid, 0.0) - threads0.get(tid, 0.0)
        by_thread[thread_kind(name)] += cpu
        total = sum(samples[tid].values())
        for part, n in samples[tid].items():
            parts[part] += cpu * n / total
    unsampled = server_cpu - sum(by_thread.values())  # threads py-spy never saw on a CPU
    if unsampled > 0.005 * server_cpu:
        parts["threads without samples (unattributed)"] += unsampled
    n_req, n_leaves = r["requests"], sum(leaves.values())
    return {"setting": label, "payload": payload.name, "about": payload.about, "args": list(extra),
            "connections": 32, "wrk": r, "sampled_seconds": seconds, "rate_hz": rate,
            "server_cpu_ms_per_request": server_cpu / n_req * 1000,
            "wrk_cpu_ms_per_request": (usage.ru_utime + usage.ru_stime) / n_req * 1000,
            "server_cores_busy": server_cpu / wall, "machine_cores_busy": busy / wall,
            "parts": [{"part": p, "percent": 100 * c / server_cpu, "cpu_ms_per_request": c / n_req * 1000}
                      for p, c in parts.most_common()],
            "threads": [{"thread": t, "percent": 100 * c / server_cpu} for t, c in by_thread.most_common()],
            "top_functions": [{"frame": f, "percent_of_samples": 100 * n / n_leaves} for f, n in leaves.most_common(12)]}


def render(profiles: list[dict], env: dict, run: int = 1) -> str:
    lines = [f"# Where a served request's CPU time goes: run {run}", "",
             f"`python scripts/profile_serve.py` ({env['cpu']}, {env['cpu_count']} cores; torch {env['torch']}, "
             f"Python {env['python']}; fmnist commit `{(env['git_commit'] or '?')[:12]}`; {env['time']}). "
             "While wrk keeps 32 connections busy, each server thread's CPU time is read from /proc and "
             "split over the parts below in proportion to py-spy's samples of that thread (samples of a "
             "thread waiting for work are left out). One run per section; percentages are of the server "
             "process's CPU time, ms are CPU ms per request.", ""]
    for p in profiles:
        w = p["wrk"]
        lines += [f"## {p['setting']}: {p['about']}", "",
                  f"{w['rps']:.0f} requests/s, p50 {w['p50_ms']:.0f} ms, p99 {w['p99_ms']:.0f} ms, {w['errors']} errors; "
                  f"CPU ms per request: server {p['server_cpu_ms_per_request']:.2f}, wrk "
                  f"{p['wrk_cpu_ms_per_request']:.2f}. Cores busy: the server {p['server_cores_busy']:.2f}, the "
                  f"whole machine {p['machine_cores_busy']:.2f} of {os.cpu_count()} (wrk, py-spy, the kernel, "
                  "anything else running).", "",
                  "| part | share | CPU ms / request |", "|---|---:|---:|"]
        lines += [f"| {x['part']} | {x['percent']:.1f} % | {x['cpu_ms_per_request']:.2f} |" for x in p["parts"]]
        lines += ["", "By thread: " + ", ".join(f"{t['thread']} {t['percent']:.0f} %" for t in p["threads"]), ""]
    return "\n".join(lines) + "\n"


def wait_for_quiet(limit_s: float = 180, idle_cores: float = 0.2) -> float:
    """Wait (up to limit_s) until the machine is nearly idle for a second: on a shared machine a
    setting measured beside someone else's job would be compared with one that was not.
    -> the cores that were busy when it went on."""
    deadline = time.monotonic() + limit_s
    while True:
        b0 = loadtest.machine_busy_seconds()
        time.sleep(1)
        busy = loadtest.machine_busy_seconds() - b0
        if busy < idle_cores or time.monotonic() > deadline:
            return busy
        print(f"machine busy ({busy:.2f} cores) with other work: waiting", flush=True)
        time.sleep(4)


def before_env(src: str) -> dict:
    """Environment to run the server from another src folder (an older version of it). uvloop is
    hidden, so uvicorn picks asyncio, as servers from before uvloop was a dependency did."""
    shim = Path(tempfile.mkdtemp(prefix="no-uvloop-")) / "uvloop"
    shim.mkdir()
    (shim / "__init__.py").write_text('raise ImportError("hidden: the server being compared ran without uvloop")\n')
    return dict(os.environ, PYTHONPATH=f"{shim.parent}{os.pathsep}{src}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/cpu/serve", help="output folder (default: bench/cpu/serve)")
    ap.add_argument("--seconds", type=float, default=12, help="py-spy sampling time per profile (default: 12)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default: 250)")
    ap.add_argument("--before", metavar="SRC", default=None,
                    help="also profile the server from this src folder, labelled 'before' (default: off)")
    args = ap.parse_args()
    if not shutil.which("wrk") or not pyspy():
        raise SystemExit("error: needs wrk and py-spy (make wrk; pip install py-spy)")
    loads = {p.name: p for p in loadtest.payloads(None)}
    here = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    runs = [("after", here)]
    if args.before:
        runs.insert(0, ("before", before_env(args.before)))
    profiles = []
    for label, env in runs:
        for name in ("photo", "png28"):
            wait_for_quiet()
            p = profile_one(label, loads[name], args.seconds, args.rate, [], env)
            profiles.append(p)
            print(f"{label} {name}: {p['wrk']['rps']:.0f} req/s, server {p['server_cpu_ms_per_request']:.2f} CPU ms "
                  f"per request; " + "; ".join(f"{x['part'].split(' (')[0]} {x['percent']:.0f}%" for x in p["parts"][:4]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "profile.json"
    n = append_sitting(record, {"environment": environment("cpu"), "command": " ".join(sys.argv),
                                "profiles": profiles})
    sittings = json.loads(record.read_text())["sittings"]
    write_text(out / "profile.md", "\n".join(render(s["profiles"], s["environment"], i + 1)
                                             for i, s in enumerate(sittings)))
    print(f"added entry {n} to {record}; wrote {out / 'profile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
