"""Attacks on `fmnist serve`, each against a real server process on loopback,
bounded in bytes and seconds."""

import concurrent.futures
import io
import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from test_serve import free_port, png, start_server

LIMIT_MB = 1
CONNECTIONS = 8
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


class ServerUrl(str):
    """The base URL, and which HTTP parser the server runs."""

    def __new__(cls, url: str, http: str):
        self = super().__new__(cls, url)
        self.http = http
        return self


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request, fake_ghostscript):
    """Every attack against both HTTP parsers the server can run on."""
    env = dict(os.environ, PATH=f"{fake_ghostscript[0]}{os.pathsep}{os.environ['PATH']}")
    # Short limits so each attack is cut off in about a second.
    proc, url = start_server("--max-upload-mb", str(LIMIT_MB), "--max-conversions", "1", "--conversion-wait", "0",
                             "--header-timeout", "1", "--keep-alive-timeout", "1", "--body-timeout", "1.5",
                             "--limit-concurrency", str(CONNECTIONS), "--http", request.param, env=env)
    yield ServerUrl(url, request.param)
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


def read_until_closed(sock, limit_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit_s} s; got {data[:200]!r}") from None
    except OSError:
        pass
    return data, time.monotonic() - t


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", _port(url)), timeout=5)


def small_upload(name: str = "a.png", body: bytes | None = None):
    return {"files": (name, body or png(np.zeros((28, 28), np.uint8)), "image/png")}


def send_chunked_upload(url: str, head_extra: bytes = b"") -> tuple[RawReader, int, int]:
    """A multipart body sent chunked until the server answers or 64x the limit has gone out:
    (reader holding the answer, bytes sent, the cap)."""
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=5)
    reader = RawReader(sock)
    reader.start()
    boundary = b"b0undary"
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n" + head_extra + b"Transfer-Encoding: chunked\r\n"
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
    return reader, sent, cap


def test_chunked_body_is_counted_not_trusted(server):
    """Transfer-Encoding: chunked plus a small Content-Length: the header lies, the bytes count.
    Before the fix the whole body was read into memory and answered 415 after the fact. h11
    reads it chunked and the byte count stops it (413); httptools refuses the head outright."""
    reader, sent, cap = send_chunked_upload(server, b"Content-Length: 100\r\n")
    status, body = reader.response()
    expected = (413, "payload_too_large") if server.http == "h11" else (400, "invalid_http")
    assert (status, body["error"]["code"]) == expected, reader.data[:300]
    assert sent < cap / 2, f"the server kept reading: {sent:,} bytes sent"
    assert httpx.get(server + "/healthz").status_code == 200


def test_chunked_body_without_length_is_counted(server):
    reader, sent, cap = send_chunked_upload(server)
    status, body = reader.response()
    assert status == 413 and body["error"]["code"] == "payload_too_large", reader.data[:300]
    assert sent < cap / 2, f"the server kept reading: {sent:,} bytes sent"


def test_eps_upload_never_reaches_ghostscript(server, fake_ghostscript):
    """Before the fix Pillow identified the EPS and ran `gs` on the uploaded PostScript."""
    r = httpx.post(server + "/v1/predict", files={"files": ("x.png", EPS, "image/png")}, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert "accepted format" in r.json()["error"]["message"]
    assert not fake_ghostscript[1].exists(), "Ghostscript was run: " + fake_ghostscript[1].read_text()


def test_open_image_tries_only_accepted_formats(fake_ghostscript, monkeypatch):
    """The same for the CLI and Python API, which open files through preprocess.open_image."""
    from fmnist.photos.preprocess import PreprocessError, open_image

    monkeypatch.setenv("PATH", f"{fake_ghostscript[0]}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(PreprocessError, match="accepted format"):
        open_image(EPS)
    assert not fake_ghostscript[1].exists()


@pytest.fixture
def inprocess_server():
    """The app on a real uvicorn server in a thread, so a test can reach into its batcher."""
    import uvicorn

    from fmnist.serving.app import create_app

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


def test_silent_connection_is_closed(server):
    """Before: a connection that sent nothing was held for as long as the client liked."""
    with connect(server) as sock:
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and took < 3


def test_header_sent_a_line_at_a_time_is_cut_off(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t = time.monotonic()
        try:
            for i in range(20):  # a line every 0.25 s: 5 s at most
                time.sleep(0.25)
                sock.sendall(b"X-Slow-%d: 1\r\n" % i)
        except OSError:
            pass
        data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - t < 3, data[:200]


def test_body_at_a_trickle_gets_408(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                     b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n')
        t = time.monotonic()
        try:
            for _ in range(25):  # 5 bytes/s for 5 s at most
                sock.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            pass
        data, _ = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout", data[:300]
    assert time.monotonic() - t < 3.5


def send_endless_header(url: str, before: bytes = b"") -> tuple[RawReader, int, int]:
    """One header line of 'a's (after the requests in `before`) sent until the server closes
    the connection or 64 MiB has gone out: (reader holding the answer, bytes sent, the cap)."""
    sock = connect(url)
    reader = RawReader(sock)
    reader.start()
    chunk = b"a" * 65536
    sent, cap = 0, 64 << 20
    try:
        sock.sendall(before + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        while sent < cap and reader.closed_at is None:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:  # the server hung up on us: what it should do
        pass
    reader.join(5)
    sock.close()
    assert reader.closed_at is not None, f"still open after {sent:,} bytes: the server is still reading"
    return reader, sent, cap


def test_oversized_head_is_refused_unread(server):
    """Before: only time bounded a request head, so a 100 MiB header line arriving fast was
    buffered whole (~230 MB more memory) and answered 200 (httptools); h11 stopped at its own
    16 KiB with a 400. Now either parser answers 431 once the head passes 64 KiB."""
    reader, sent, cap = send_endless_header(server)
    status, body = reader.response()
    assert (status, body["error"]["code"]) == (431, "headers_too_large"), reader.data[:300]
    assert "64 KiB" in body["error"]["message"]
    assert sent < cap / 2, f"the server kept reading: {sent:,} bytes sent"
    assert httpx.get(server + "/healthz").status_code == 200


def test_oversized_pipelined_head_is_refused(server):
    """The same head pipelined behind a request still being answered: httptools parses it while
    the app works, so it is counted then too. The connection is closed mid-answer: no 431."""
    body = slow_image()
    first = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s"
             % (len(body), body))
    _, sent, cap = send_endless_header(server, before=first)
    assert sent < cap / 2, f"the server kept reading: {sent:,} bytes sent"
    wait_for_health(server, lambda h: h["conversions"]["running"] == 0)  # the slot, for the next test


@pytest.mark.parametrize("ending", [b"\r\n\r\n", b"\n\n"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_head_count_stops_at_a_blank_line_split_across_reads(ending, split):
    """The blank line that ends a head may arrive in two reads; the body after it is not counted."""
    from fmnist.serving.httpserver import HeadDeadline

    class Counter(HeadDeadline):
        cycle, max_head_bytes = None, 1024

        def __init__(self):
            self._head_bytes, self._head_tail, self._head_after = 0, b"", None

    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 4096" + ending
    split = min(split, len(ending))
    c = Counter()
    assert c._head_fits(head[:-split]) and c._head_fits(head[-split:] + b"x" * 4096)
    assert c._head_bytes == len(head)


def test_head_under_the_cap_is_served(server):
    """A 60 KB header (big cookies) is within the cap under both parsers."""
    r = httpx.get(server + "/healthz", headers={"x-a": "a" * 60_000}, timeout=5)
    assert r.status_code == 200, r.text


def test_body_is_not_counted_as_head(server):
    """A small head and a 512 KiB body in one write: only the head counts towards the cap."""
    body = b"\0" * (512 << 10)
    with connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        data, _ = read_until_closed(sock)
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 415") and b"unsupported_media_type" in answer, data[:300]


def test_idle_keep_alive_connection_is_closed(server):
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200") and took < 3


def test_connection_cap_then_recovery(server):
    """Before: 1000 half-sent connections were all held, with no cap and no timeout."""
    socks = [connect(server) for _ in range(CONNECTIONS)]
    try:
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request each
        time.sleep(0.1)
        assert httpx.get(server + "/healthz", timeout=5).status_code == 503  # over the cap
        for s in socks:  # each is dropped by the head deadline (1 s)
            data, took = read_until_closed(s)
            assert data.startswith(b"HTTP/1.1 408") and took < 3
    finally:
        for s in socks:
            s.close()
    assert httpx.get(server + "/healthz", timeout=5).status_code == 200


def slow_image() -> bytes:
    """A 4999x4999 1-bit PNG, 13 KB on the wire, just under the 25 M-pixel cap: ~0.1 s to
    convert on one core, many times what a client needs to see it start and hang up (a 2000 px
    one now converts in ~15 ms, too fast to leave the others waiting)."""
    im = Image.new("1", (4999, 4999), 1)
    ImageDraw.Draw(im).rectangle([1250, 1250, 3750, 3750], fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wait_for_health(server, pred, limit_s: float = 5.0) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        h = httpx.get(server + "/healthz", timeout=5).json()
        if pred(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"/healthz never matched in {limit_s} s: {h}")


def test_conversions_are_bounded_503_with_retry_after(server):
    """One conversion slot, no waiting: a second upload while the first converts gets 503."""
    files = [("files", (f"big{i}.png", slow_image(), "image/png")) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        first = ex.submit(httpx.post, server + "/v1/predict", files=files, timeout=10)
        wait_for_health(server, lambda h: h["conversions"]["running"] == 1)
        r = httpx.post(server + "/v1/predict", files=small_upload(), timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy", r.text
        assert int(r.headers["retry-after"]) >= 1
        assert first.result().status_code == 200
    assert httpx.post(server + "/v1/predict", files=small_upload(), timeout=5).status_code == 200


def test_work_for_a_client_that_left_is_dropped(server):
    """Eight slow images, the client hangs up during the first: the other seven are skipped
    and nothing reaches the model."""
    boundary = b"b0undary"
    parts = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="b%d.png"\r\n'
                     b"Content-Type: image/png\r\n\r\n" % i + slow_image() + b"\r\n" for i in range(8))
    body = parts + b"--" + boundary + b"--\r\n"
    before = httpx.get(server + "/healthz").json()
    with connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Content-Type: multipart/form-data; boundary=%s\r\n\r\n%s" % (len(body), boundary, body))
        wait_for_health(server, lambda h: h["conversions"]["running"] == 1)
    after = wait_for_health(server, lambda h: h["conversions"]["dropped"] > before["conversions"]["dropped"]
                            and h["conversions"]["running"] == 0)
    assert after["conversions"]["dropped"] - before["conversions"]["dropped"] >= 6
    assert after["batcher"]["items"] == before["batcher"]["items"]


@pytest.mark.parametrize("content_type,body", [
    ("multipart/form-data", b"--x\r\nnonsense"),                    # no boundary parameter
    ("multipart/form-data; boundary=x", b"--x\r\nno colon in this header\r\n\r\nabc\r\n--x--\r\n"),
])
def test_broken_multipart_gets_its_own_code(server, content_type, body):
    r = httpx.post(server + "/v1/predict", content=body, headers={"content-type": content_type}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart", r.text
    assert "files" in r.json()["error"]["message"]


def test_negative_max_wait_is_refused_by_the_cli():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fmnist", "serve", "--max-wait-ms", "-1"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "--max-wait-ms: must be >= 0, got -1" in r.stderr
