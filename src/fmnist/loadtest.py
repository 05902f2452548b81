"""Load test for `fmnist serve`, loopback only and bounded in requests and time.

Starts a real server process per setting (dynamic batching on / off), then drives it with C
concurrent keep-alive clients written on raw asyncio streams (a full HTTP client library
would spend the CPU the server needs: both share this machine's cores). Reports requests/s
and p50/p99 latency per concurrency level.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import subprocess
import sys
import time

import numpy as np

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # never anything but loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _request_bytes(port: int, payload: bytes, filename: str, ctype: str) -> bytes:
    boundary = "fmnistloadtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head + body


async def _client(port: int, req: bytes, deadline: float, budget: list, lat: list, errors: list):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
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
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def _drive(port: int, req: bytes, concurrency: int, max_requests: int, max_seconds: float) -> dict:
    lat, errors, budget = [], [], [max_requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, req, t0 + max_seconds, budget, lat, errors) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"concurrency": concurrency, "requests": len(lat), "seconds": wall, "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors)}


def start_server(port: int, checkpoint=None, extra=()) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "fmnist", "serve", "--port", str(port), "--log-level", "warning", *extra]
    if checkpoint:
        cmd += ["--checkpoint", str(checkpoint)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


def sample_png() -> bytes:
    from PIL import Image

    from .serve import load_samples

    imgs, _ = load_samples()
    buf = io.BytesIO()
    Image.fromarray(imgs[0]).save(buf, format="PNG")
    return buf.getvalue()


def run_all(checkpoint=None, levels=(1, 8, 32), max_requests: int = 3000, max_seconds: float = 10.0,
            onnx: bool = True, warmup: int = 200) -> dict:
    """Each setting in its own server process: PyTorch with and without dynamic batching, and
    (where onnxruntime is installed) the same model exported to ONNX, batched."""
    import tempfile

    payload = sample_png()
    out = {"payload": f"28x28 PNG test image ({len(payload)} bytes), one image per request",
           "max_requests": max_requests, "max_seconds": max_seconds, "settings": {}}
    batching = ["--max-batch", "32", "--max-wait-ms", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        settings = [("batching", checkpoint, batching), ("no-batching", checkpoint, ["--max-batch", "1"])]
        if onnx:
            try:
                from .export import export
                from .predict import default_checkpoint

                onnx_path = export(checkpoint or default_checkpoint(), f"{tmp}/model.onnx")
                settings.append(("onnx-batching", onnx_path, ["--backend", "onnx", *batching]))
            except ImportError as e:  # the optional extra is missing: measure the rest
                log.warning(f"skipping the ONNX Runtime setting: {e}")
        for label, ckpt, extra in settings:
            port = _free_port()
            proc = start_server(port, ckpt, extra)
            try:
                req = _request_bytes(port, payload, "x.png", "image/png")
                asyncio.run(_drive(port, req, 8, warmup, 5))  # warm-up: threads, allocator, first batches
                rows = []
                for c in levels:
                    r = asyncio.run(_drive(port, req, c, max_requests, max_seconds))
                    rows.append(r)
                    log.info(f"{label:>13} c={c:>2}: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                             f"p99 {r['p99_ms']:6.1f} ms  ({r['requests']} requests, {r['errors']} errors)")
                out["settings"][label] = rows
            finally:
                proc.terminate()
                proc.wait(10)
    return out
