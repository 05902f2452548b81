"""Attacks on `fmnist serve` (issue 12), each against a real server process on loopback,
bounded in bytes and seconds."""

import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from test_serve import free_port, png, start_server

LIMIT_MB = 1
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n%%EndComments\n"
       b"newpath 0 0 moveto 28 28 lineto stroke\nshowpage\n%%EOF\n")


@pytest.fixture(scope="module")
def fake_ghostscript(tmp_path_factory):
    """A `gs` first on PATH that records every call: Pillow's EPS plugin would run it."""
    d = tmp_path_factory.mktemp("gs")
    marker = d / "calls.txt"
    gs = d / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {marker}\n[ "$1" = "--version" ] && echo 10.0 && exit 0\nexit 1\n')
    gs.chmod(0o755)
    return d, marker


@pytest.fixture(scope="module")
def server(fake_ghostscript):
    env = dict(os.environ, PATH=f"{fake_ghostscript[0]}{os.pathsep}{os.environ['PATH']}")
    proc, url = start_server("--max-upload-mb", str(LIMIT_MB), env=env)
    yield url
    proc.terminate()
    proc.wait(10)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class RawReader(threading.Thread):
    """Reads a raw socket until EOF or error, so a response sent mid-upload is not lost."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.data, self.closed_at = sock, b"", None

    def run(self):
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass
        self.closed_at = time.monotonic()

    def response(self) -> tuple[int, dict]:
        head, _, body = self.data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


def test_chunked_body_is_counted_not_trusted(server):
    """Transfer-Encoding: chunked plus a small Content-Length: the header lies, the bytes count.
    Before the fix the whole body was read into memory and answered 415 after the fact."""
    sock = socket.create_connection(("127.0.0.1", _port(server)), timeout=5)
    reader = RawReader(sock)
    reader.start()
    boundary = b"b0undary"
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n")
    part = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunk = b"\0" * 65536
    sent, cap = 0, 64 << 20  # 64x the limit at most
    try:
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        while sent < cap and reader.closed_at is None:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except OSError:  # the server hung up on us: what it should do
        pass
    reader.join(5)
    sock.close()
    assert reader.data, f"no answer after {sent:,} bytes: the server is still reading"
    status, body = reader.response()
    assert status == 413 and body["error"]["code"] == "payload_too_large", reader.data[:300]
    assert sent < cap / 2, f"the server kept reading: {sent:,} bytes sent"
    assert httpx.get(server + "/healthz").status_code == 200


def test_eps_upload_never_reaches_ghostscript(server, fake_ghostscript):
    """Before the fix Pillow identified the EPS and ran `gs` on the uploaded PostScript."""
    r = httpx.post(server + "/v1/predict", files={"files": ("x.png", EPS, "image/png")}, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert "accepted format" in r.json()["error"]["message"]
    assert not fake_ghostscript[1].exists(), "Ghostscript was run: " + fake_ghostscript[1].read_text()


def test_open_image_tries_only_accepted_formats(fake_ghostscript, monkeypatch):
    """The same for the CLI and Python API, which open files through preprocess.open_image."""
    from fmnist.preprocess import PreprocessError, open_image

    monkeypatch.setenv("PATH", f"{fake_ghostscript[0]}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PreprocessError, match="accepted format"):
        open_image(EPS)
    assert not fake_ghostscript[1].exists()


@pytest.fixture
def inprocess_server():
    """The app on a real uvicorn server in a thread, so a test can reach into its batcher."""
    import uvicorn

    from fmnist.serve import create_app

    app = create_app()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "in-process server did not start in 30 s"
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


def test_dead_batcher_shows_in_healthz_and_requests_fail_fast(inprocess_server):
    """Before: the worker died silently, /healthz said ok and every prediction hung."""
    app, url = inprocess_server
    assert httpx.get(url + "/healthz").json()["batcher"]["alive"] is True
    task = app.state.batcher.task
    task.get_loop().call_soon_threadsafe(task.cancel)
    time.sleep(0.2)
    h = httpx.get(url + "/healthz")
    assert h.status_code == 503 and h.json()["batcher"]["alive"] is False and h.json()["batcher"]["error"]
    t = time.monotonic()
    r = httpx.post(url + "/v1/predict", files={"files": ("a.png", png(np.zeros((28, 28), np.uint8)), "image/png")},
                   timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "inference_unavailable", r.text
    assert r.headers["retry-after"] and time.monotonic() - t < 2
