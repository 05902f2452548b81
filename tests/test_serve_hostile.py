"""Attacks on `fmnist serve`, each against a real server process on loopback,
bounded in bytes and seconds."""

import concurrent.futures
import io
import json
import os
import re
import socket
import struct
import threading
import time
import zlib

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
    """The base URL, which HTTP parser the server runs, and its log file."""

    def __new__(cls, url: str, http: str, log):
        self = super().__new__(cls, url)
        self.http, self.log = http, log
        return self

    def log_since(self, offset: int) -> str:
        return self.log.read_text()[offset:]


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request, fake_ghostscript, tmp_path_factory):
    """Every attack against both HTTP parsers the server can run on."""
    env = dict(os.environ, PATH=f"{fake_ghostscript[0]}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path_factory.mktemp("log") / "serve.log"
    # Short limits so each attack is cut off in about a second.
    with open(log, "w") as out:
        proc, url = start_server("--max-upload-mb", str(LIMIT_MB), "--max-conversions", "1", "--conversion-wait", "0",
                                 "--header-timeout", "1", "--keep-alive-timeout", "1", "--body-timeout", "1.5",
                                 "--limit-concurrency", str(CONNECTIONS), "--http", request.param,
                                 "--log-level", "info", env=env, stdout=out)
    yield ServerUrl(url, request.param, log)
    proc.terminate()
    proc.wait(10)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class RawReader(threading.Thread):
    """Reads a raw socket until EOF or error, so a response sent mid-upload is not lost."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock, self.data, self.answered_at, self.closed_at = sock, b"", None, None

    def run(self):
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
                self.answered_at = self.answered_at or time.monotonic()
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
    """Before: a connection that sent nothing was held for as long as the client liked. And a
    crowd of them is one log line and then a count, not a line each."""
    offset = len(server.log.read_text())
    socks = [connect(server) for _ in range(20)]
    try:
        for sock in socks:
            data, took = read_until_closed(sock)
            assert data.startswith(b"HTTP/1.1 408") and took < 3
    finally:
        for sock in socks:
            sock.close()
    lines = [line for line in server.log_since(offset).splitlines() if "no complete request" in line]
    assert len(lines) <= 1, lines


def trickle(url: str, first: bytes, piece: bytes, every_s: float, times: int) -> tuple[bytes, float]:
    """Sends `first`, then `piece` every `every_s` s until the server answers (`times` at most):
    (everything it sent until it closed, seconds from the first piece to its answer)."""
    with connect(url) as sock:
        reader = RawReader(sock)
        reader.start()
        sock.sendall(first)
        t = time.monotonic()
        try:
            for _ in range(times):
                time.sleep(every_s)
                if reader.answered_at or reader.closed_at:
                    break
                sock.sendall(piece)
        except OSError:
            pass
        reader.join(5)
        assert reader.closed_at, f"still open 5 s after the answer; got {reader.data[:200]!r}"
    return reader.data, (reader.answered_at or reader.closed_at) - t


def test_header_sent_a_line_at_a_time_is_cut_off(server):
    data, took = trickle(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n", 0.25, 20)
    assert data.startswith(b"HTTP/1.1 408") and took < 3, data[:200]


def test_body_at_a_trickle_gets_408(server):
    data, took = trickle(server, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                                 b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                                 b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n',
                         b"x", 0.2, 25)  # 5 bytes/s for 5 s at most
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout", data[:300]
    assert took < 3.5


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


def hold_requests(url: str, n: int) -> list[socket.socket]:
    """n requests in progress: each a head and part of its body, the app waiting for the rest
    (until the body deadline, 1.5 s)."""
    socks = [connect(url) for _ in range(n)]
    for s in socks:
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\nab")
    return socks


def test_requests_in_progress_are_capped_not_connections(server):
    """Before: uvicorn's limit counted connections, so CONNECTIONS half-sent heads made every
    request 503, with its plain-text page and no Retry-After, and each refusal logged a line."""
    heads = [connect(server) for _ in range(CONNECTIONS)]
    try:
        for s in heads:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a head each: no request yet
        time.sleep(0.1)
        assert httpx.post(server + "/v1/predict", files=small_upload(), timeout=5).status_code == 200
    finally:
        for s in heads:
            s.close()

    offset = len(server.log.read_text())
    held = hold_requests(server, CONNECTIONS)
    try:
        wait_for_health(server, lambda h: h["requests"]["in_progress"] == CONNECTIONS)
        with httpx.Client(timeout=5) as client:  # one client: httpx.post makes one each time (~30 ms)
            for _ in range(30):
                r = client.post(server + "/v1/predict", files=small_upload())
                assert r.status_code == 503 and r.json()["error"]["code"] == "busy", r.text
                assert r.headers["retry-after"] == "1" and f"{CONNECTIONS} requests are in progress" in r.text
        h = httpx.get(server + "/healthz", timeout=5)  # the liveness check is never refused
        assert h.status_code == 200 and h.json()["requests"]["refused"] >= 30
    finally:
        for s in held:
            s.close()
    wait_for_health(server, lambda h: h["requests"]["in_progress"] == 0)
    assert httpx.post(server + "/v1/predict", files=small_upload(), timeout=5).status_code == 200
    # \b: the status 503, not a client's port such as 127.0.0.1:55030 in another line
    refusals = [line for line in server.log_since(offset).splitlines() if re.search(r"\b503\b", line)]
    assert len(refusals) <= 1, refusals  # a count every 10 s at most, not a line each


def rst(sock: socket.socket) -> None:
    """Close with a reset, as a client that crashes or loses its network does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_that_reset_leave_no_traceback(server):
    """Before: a reset mid-upload logged "Exception in ASGI application" with a ClientDisconnect
    traceback every time, and a reset while pipelined downloads were being answered, uvloop's
    RuntimeError (uvicorn marked only the queued request as disconnected)."""
    offset = len(server.log.read_text())
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    heads = [b"Content-Type: image/png\r\n", b"Content-Type: multipart/form-data; boundary=b\r\n"]
    for i in range(100):
        with connect(server) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n%s\r\n%s"
                      % (heads[i % 2], part + b"\0" * 5000))
            time.sleep(0.002)
            rst(s)
    get = b"GET /docs-assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n"  # 1 MB
    for _ in range(100):
        with connect(server) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(get * 2)
            s.recv(4096)
            rst(s)
    wait_for_health(server, lambda h: h["requests"]["in_progress"] == 0)
    log = server.log_since(offset)
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert log.count("request dropped") <= 100, log[-3000:]  # one INFO line per upload at most


def test_early_answer_closes_and_is_received(server):
    """Before: an answer given before the body arrived left the connection open, the rest of
    the body was taken for the next request head, and its deadline answered 408 to a request
    never sent. Now the answer says connection: close and the server closes after it."""
    with connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        time.sleep(0.2)
        try:
            sock.sendall(b"x" * 2000)  # more of the body, after the answer
        except OSError:
            pass
        data, took = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 415") and data.count(b"HTTP/1.1") == 1, data[:600]
    assert b"connection: close" in data.lower() and took < 0.5, (data[:300], took)


def test_early_answer_reaches_a_client_still_sending(server):
    """A body declared over the limit, sent whole before the client reads: the 413 goes out at
    once, and the server reads and drops the rest (a lingering close) instead of closing on
    unread data, whose reset can reach the client before it reads the answer."""
    body = b"\0" * (16 * LIMIT_MB << 20)  # more than loopback's socket buffers take: still sending when answered
    for _ in range(3):
        with connect(server) as sock:
            try:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError as e:
                raise AssertionError(f"the server reset the connection while the body was sent: {e}") from None
            data, _ = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 413") and b"payload_too_large" in data, data[:300]


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


def test_head_on_the_page_and_healthz(server):
    """Before: 405, and uptime monitors ask with HEAD."""
    for path in ("/", "/healthz"):
        r = httpx.head(server + path, timeout=5)
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0, (path, r)


def test_trailing_slash_redirect_names_no_host(server):
    """Before: the Location was built from the client's Host header, a link to any site."""
    for path, where in [("/static", "/static/"), ("/healthz/?a=1", "/healthz?a=1")]:
        r = httpx.get(server + path, headers={"host": "evil.example"}, timeout=5)
        assert r.status_code == 307 and r.headers["location"] == where, (path, r.headers)
    r = httpx.get(server + "//evil.example", timeout=5)  # no route either way: 404, no link off-site
    assert r.status_code == 404 and "location" not in r.headers, r.headers


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.parametrize("chunk", [png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"a" * (2 << 20))),
                                   png_chunk(b"iCCP", b"profile\0\0" + zlib.compress(b"a" * (2 << 20)))],
                         ids=["text", "colour-profile"])
def test_png_with_huge_metadata_says_so(server, chunk):
    """Before: "truncated or corrupt image data (Decompressed data too large for
    PngImagePlugin.MAX_TEXT_CHUNK)", of a picture that is neither."""
    ok = png(np.zeros((28, 28), np.uint8))
    body = ok[:33] + chunk + ok[33:]  # after the signature and IHDR
    r = httpx.post(server + "/v1/predict", files=small_upload(body=body), timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image", r.text
    msg = r.json()["error"]["message"]
    assert "metadata" in msg and "without metadata" in msg and "MAX_TEXT" not in msg and "corrupt" not in msg, msg


def test_unclosed_multipart_part_is_named(server):
    """Before: a body cut off inside its part lost that part without a word: "files: field required"."""
    body = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + small_upload()["files"][1]
    r = httpx.post(server + "/v1/predict", content=body,
                   headers={"content-type": "multipart/form-data; boundary=b"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart", r.text
    assert "closing boundary" in r.json()["error"]["message"]


def test_http10_post_without_length_gets_411(server):
    """Before: an HTTP/1.0 body without Content-Length was read as none: "the file is empty"."""
    with connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.0\r\nContent-Type: image/png\r\n\r\n" + small_upload()["files"][1])
        data, _ = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411") and json.loads(body)["error"]["code"] == "length_required", data[:300]


def tiff(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, "F").save(buf, format="TIFF")
    return buf.getvalue()


def test_tiff_of_nans_prints_no_warning(server):
    """Before: numpy's "invalid value encountered in cast" on the server's stderr."""
    offset = len(server.log.read_text())
    nan = np.full((28, 28), np.nan, np.float32)
    r = httpx.post(server + "/v1/predict", files=small_upload("nan.tif", tiff(nan)), timeout=5)
    assert r.status_code == 422 and "NaN" in r.json()["error"]["message"], r.text
    some = nan.copy()
    some[5:20, 8:18], some[0, 0] = 1.0, np.inf
    r = httpx.post(server + "/v1/predict", files=small_upload("some.tif", tiff(some)), timeout=5)
    assert r.status_code == 200, r.text
    assert "Warning" not in server.log_since(offset), server.log_since(offset)
