"""Load test for `fmnist serve`, loopback only and bounded in time.

Starts a real server process per setting and drives it with `wrk` (Debian package `wrk`,
`make` installs it; one thread, keep-alive connections) where installed, else with a small
client on raw asyncio streams (a full HTTP client library would spend the CPU the server
needs: both share this machine's cores). Payloads: the 28x28 PNG of a test image and a real
12.8 KB JPEG product photo, as multipart field `files` and as a raw body. Reports requests/s,
p50/p90/p99 latency and errors per payload and connection count, then a soak: many
connections for a minute, with the server's RSS before and after.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_log = logging.getLogger(__name__).info   # progress lines; the CLI's handler shows them

HOST = "127.0.0.1"  # never anything but loopback
BOUNDARY = "fmnistloadtestboundary"
PHOTO = "pullover-clean-002.jpg"  # a clean product photo of the `real` photo set, 400x534
PHOTO_BYTES = 12_800              # re-encoded to about the size of a product photo on a web page


@dataclass
class Payload:
    name: str
    content_type: str   # of the whole request body
    body: bytes
    about: str          # what it is, for the report
    sha256: str         # of the image inside


def multipart(name: str, image: bytes, filename: str, image_type: str, about: str) -> Payload:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {image_type}\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    return Payload(name, f"multipart/form-data; boundary={BOUNDARY}", body, about, hashlib.sha256(image).hexdigest())


def raw(name: str, image: bytes, image_type: str, about: str) -> Payload:
    return Payload(name, image_type, image, about, hashlib.sha256(image).hexdigest())


def sample_png() -> bytes:
    from PIL import Image

    from fmnist.serving.app import load_samples

    imgs, _ = load_samples()
    buf = io.BytesIO()
    Image.fromarray(imgs[0]).save(buf, format="PNG")
    return buf.getvalue()


def bench_photo(root: Path) -> tuple[bytes, str]:
    """PHOTO of the `real` photo set re-encoded at the JPEG quality that lands closest to PHOTO_BYTES."""
    from PIL import Image

    im = Image.open(root / PHOTO).convert("RGB")

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        return buf.getvalue()

    q = min(range(50, 96), key=lambda q: abs(len(encode(q)) - PHOTO_BYTES))
    data = encode(q)
    return data, f"{PHOTO} ({im.width}x{im.height}) re-encoded at JPEG quality {q}: {len(data):,} bytes"


def payloads(photo_root: Path | None, log=_log) -> list[Payload]:
    png = sample_png()
    out = [multipart("png28", png, "x.png", "image/png", f"28x28 PNG test image ({len(png)} bytes), multipart")]
    root = photo_root
    if root is None:
        from fmnist.photos import sets

        try:
            root = sets.resolve("real").folder
        except sets.PhotoSetError:
            root = Path("real")
    if (root / PHOTO).is_file():
        photo, about = bench_photo(root)
        out += [multipart("photo", photo, "photo.jpg", "image/jpeg", about + ", multipart"),
                raw("photo-raw", photo, "image/jpeg", about + ", raw body (Content-Type: image/jpeg)")]
    else:
        log(f"skipping the photo payloads: {root / PHOTO} not found (`fmnist photos fetch real` brings it)")
    return out


# ---------------------------------------------------------------------------- wrk

# wrk's own summary is rounded (ms with two decimals, requests/s with two): the script's done()
# hook writes the exact counts and percentiles as one JSON line instead.
WRK_SCRIPT = r"""
local f = assert(io.open(os.getenv("FMNIST_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("FMNIST_CTYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('FMNIST-WRK {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}}\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write,
    e.status, e.timeout))
end
"""


def parse_wrk(stdout: str) -> dict:
    """The JSON line WRK_SCRIPT's done() writes -> requests/s, latency in ms, errors.
    wrk counts a non-2xx/3xx answer under errors.status; every kind counts as an error here."""
    for line in stdout.splitlines():
        if line.startswith("FMNIST-WRK "):
            r = json.loads(line.removeprefix("FMNIST-WRK "))
            break
    else:
        raise ValueError(f"no FMNIST-WRK line in wrk's output (was it run with the fmnist script?): {stdout[-500:]!r}")
    seconds = r["duration_us"] / 1e6
    return {"requests": r["requests"], "seconds": seconds, "rps": r["requests"] / seconds,
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "errors": sum(r["errors"].values()), "error_kinds": r["errors"]}


def wrk_version() -> str | None:
    if not shutil.which("wrk"):
        return None
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout  # exits 1 after printing
    return out.split(" Copyright")[0].strip() or "wrk"


def run_wrk(port: int, payload: Payload, connections: int, seconds: float, timeout_s: float = 5.0) -> dict:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "body").write_bytes(payload.body)
        (Path(d) / "post.lua").write_text(WRK_SCRIPT)
        env = dict(os.environ, FMNIST_BODY=str(Path(d) / "body"), FMNIST_CTYPE=payload.content_type)
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                              f"--timeout={max(1, round(timeout_s))}s", "-s", str(Path(d) / "post.lua"),
                              f"http://{HOST}:{port}/v1/predict"], capture_output=True, text=True, env=env,
                             timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-500:]}")
    return parse_wrk(out.stdout)


# ---------------------------------------------------------------------------- Python client (fallback)

def _request_bytes(port: int, payload: Payload) -> bytes:
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {payload.content_type}\r\n"
            f"Content-Length: {len(payload.body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + payload.body


async def _client(port: int, req: bytes, deadline: float, lat: list, errors: list):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            writer.write(req)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            if not 200 <= status < 400:
                errors.append(status)
    finally:
        writer.close()


async def _drive(port: int, req: bytes, connections: int, seconds: float) -> dict:
    lat, errors = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, req, t0 + seconds, lat, errors) for _ in range(connections)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "seconds": wall, "rps": len(lat) / wall,
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}, "max_ms": float(ms.max()),
            "errors": len(errors)}


def run_python(port: int, payload: Payload, connections: int, seconds: float) -> dict:
    return asyncio.run(_drive(port, _request_bytes(port, payload), connections, seconds))


# ---------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(port: int, extra=(), env: dict | None = None, python: str = sys.executable) -> subprocess.Popen:
    import httpx

    cmd = [python, "-m", "fmnist", "serve", "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 60 s")


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (worker processes, with `fmnist serve --workers`)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for task in Path(f"/proc/{p}/task").iterdir()
                    for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.append(p)
        todo += kids
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MiB."""
    total = 0
    for p in process_tree(pid):
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue   # gone, or a zombie (no VmRSS)
    return total / 1024


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process and its live descendants have used so far."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle, not waiting for I/O) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------- the bench

def measure(port: int, payload: Payload, connections: int, seconds: float, tool: str, pid: int | None = None) -> dict:
    """One load level. With the server's pid, also the cores it kept busy and the cores the whole
    machine did: on a shared machine, anything else running shows as the difference less the
    load generator's share."""
    run = run_wrk if tool == "wrk" else run_python
    cpu0, busy0, t0 = cpu_seconds(pid) if pid else 0.0, machine_busy_seconds(), time.perf_counter()
    r = {"payload": payload.name, "connections": connections, **run(port, payload, connections, seconds)}
    wall = time.perf_counter() - t0
    if pid:
        r["server_cores"] = (cpu_seconds(pid) - cpu0) / wall
    r["machine_cores"] = (machine_busy_seconds() - busy0) / wall
    return r


def bench_setting(label: str, extra, loads: list[Payload], levels, seconds: float, warmup: float, tool: str,
                  soak: tuple[int, float] | None = None, env=None, python: str = sys.executable, log=_log) -> dict:
    """One server process: each payload at each connection count after a warm-up, then the soak
    (connections, seconds) if asked, with the server's RSS around it."""
    port = free_port()
    proc = start_server(port, extra, env=env, python=python)
    rows, out = [], {"args": list(extra)}
    try:
        for p in loads:
            if warmup > 0:   # warm-up: threads, allocator, batch sizes (a dry run has none: wrk runs >= 1 s)
                measure(port, p, max(levels), warmup, tool)
            for c in levels:
                r = measure(port, p, c, seconds, tool, proc.pid)
                rows.append(r)
                log(f"{label:>12} {p.name:>9} c={c:>2}: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                    f"p99 {r['p99_ms']:6.1f} ms  ({r['requests']} requests, {r['errors']} errors; cores busy: "
                    f"server {r['server_cores']:.2f}, machine {r['machine_cores']:.2f})")
        out["rows"] = rows
        if soak:
            c, s = soak
            before = rss_mb(proc.pid)
            load = next((p for p in loads if p.name == "photo"), loads[0])  # the issue's: the photo, multipart
            r = measure(port, load, c, s, tool, proc.pid)
            r.update(rss_mb_before=before, rss_mb_after=rss_mb(proc.pid))
            out["soak"] = r
            log(f"{label:>12} soak {r['payload']} c={c} {s:g} s: {r['rps']:.1f} req/s, p99 {r['p99_ms']:.1f} ms, "
                f"{r['errors']} errors, RSS {before:.0f} -> {r['rss_mb_after']:.0f} MiB")
    finally:
        stop_server(proc)
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fastapi", "starlette", "uvicorn", "httptools", "uvloop", "python-multipart", "onnxruntime",
                "Pillow", "opencv-python-headless"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["wrk"] = wrk_version()
    return out


def run_all(checkpoint=None, photo_root: Path | None = None, levels=(1, 32), seconds: float = 15.0,
            warmup: float = 5.0, soak: tuple[int, float] = (64, 60.0), onnx: bool = True, tool: str = "auto",
            workers: int = 2, log=_log) -> dict:
    """One benchmark call: the shipped defaults with PyTorch (and the soak), then ONNX Runtime fp32 and
    int8 (where onnxruntime is installed), then ONNX fp32 (else PyTorch) with `workers` worker
    processes (1: not measured; tests/test_serve_workers.py covers that path), each setting in
    its own server."""
    tool = ("wrk" if shutil.which("wrk") else "python") if tool == "auto" else tool
    if tool == "python":
        log("wrk not found: measuring with the Python client (install wrk for comparable figures: make)")
    loads = payloads(photo_root, log)
    ck = ["--checkpoint", str(checkpoint)] if checkpoint else []
    out = {"tool": tool, "versions": versions(), "seconds_per_level": seconds, "warmup_seconds": warmup,
           "runs": 1, "payloads": {p.name: {"about": p.about, "bytes": len(p.body), "image_sha256": p.sha256}
                                   for p in loads}, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        settings = [("torch", ck, soak)]
        if onnx:
            try:
                from fmnist.inference.export import export
                from fmnist.inference.predict import default_checkpoint

                src = checkpoint or default_checkpoint()
                fp32 = export(src, f"{tmp}/model.onnx")
                int8 = export(src, f"{tmp}/model.int8.onnx", int8=True)
                settings += [("onnx", ["--backend", "onnx", "--checkpoint", str(fp32)], None),
                             ("onnx-int8", ["--backend", "onnx", "--checkpoint", str(int8)], None)]
            except ImportError as e:  # the optional extra is missing: measure the rest
                log(f"skipping the ONNX Runtime settings: {e}")
        if workers > 1 and (os.cpu_count() or 1) > 1:
            # One process keeps ~1.5 cores busy (the interpreter lock): the fastest backend again,
            # as several worker processes.
            label, extra, _ = settings[1] if len(settings) > 1 else settings[0]
            settings.append((f"{label}-{workers}-workers", [*extra, "--workers", str(workers)], None))
        for label, extra, sk in settings:
            out["settings"][label] = bench_setting(label, extra, loads, levels, seconds, warmup, tool, sk, log=log)
    return out
