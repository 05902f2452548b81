"""`fmnist serve --workers 2`: two server processes share the port, connections reach both,
SIGTERM stops them all, a worker that dies is replaced while the other serves on, and one that
keeps dying takes the server down with an error."""

import logging
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from conftest import photo_dir
from fmnist.bench import loadtest
from test_serve import check_answers_beside_idle_connections, many_open_files  # noqa: F401 (a fixture)



def workers(pid: int) -> list[int]:
    return [p for p in loadtest.process_tree(pid)[1:]
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return b"State:\tZ" not in Path(f"/proc/{pid}/status").read_bytes()
    except FileNotFoundError:
        return False


@pytest.fixture
def server(request):
    port = loadtest.free_port()
    proc = loadtest.start_server(port, ["--workers", "2", *getattr(request, "param", ())])
    yield port, proc
    loadtest.stop_server(proc)


def fresh(port: int, method: str, path: str, **kw) -> httpx.Response:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:  # a new connection each time
        return c.request(method, path, **kw)


def test_two_workers_share_the_connections_and_stop_together(server, many_open_files):
    port, proc = server
    pids = workers(proc.pid)
    assert len(pids) == 2, pids
    for _ in range(20):
        r = fresh(port, "POST", "/v1/predict", content=(photo_dir("real") / "pullover-clean-002.jpg").read_bytes(), headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"], r.text
    seen = {}
    for _ in range(60):
        h = fresh(port, "GET", "/healthz").json()
        seen[h["pid"]] = h["batcher"]["items"]
        if len(seen) == 2:
            break
    # The kernel spreads connections over the two (SO_REUSEPORT): each converted and classified some.
    assert set(seen) == set(pids) and all(n > 0 for n in seen.values()) and sum(seen.values()) == 20, seen
    check_answers_beside_idle_connections(f"http://127.0.0.1:{port}")  # requests counted in each, as in one

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not any(running(p) for p in pids)


@pytest.mark.parametrize("server", [("--worker-restarts", "1")], indirect=True)
def test_a_dead_worker_is_replaced_and_one_that_keeps_dying_stops_the_server(server):
    """Before: one worker killed (kill -9, as the OOM killer does) stopped the whole service."""
    port, proc = server
    pids = workers(proc.pid)
    deadline = time.monotonic() + 60
    # Both serving first: a worker killed while its model loads stops the server (it never served).
    while {fresh(port, "GET", "/healthz").json()["pid"] for _ in range(20)} != set(pids):
        assert time.monotonic() < deadline, "the two workers did not both serve within 60 s"
    first, other = pids
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{first}").exists():  # until it is gone, the kernel may hand it connections (reset)
        time.sleep(0.01)
    while True:  # the other serves all along; the replacement within 10 s
        assert running(other) and proc.poll() is None
        h = fresh(port, "GET", "/healthz")
        assert h.status_code == 200, h.text
        if h.json()["pid"] not in (first, other):
            break
        assert time.monotonic() < deadline, "no new worker served within 10 s"
        time.sleep(0.05)
    replacement = h.json()["pid"]
    print(f"a replacement served {time.monotonic() - deadline + 10:.1f} s after the kill")
    assert sorted(workers(proc.pid)) == sorted([other, replacement])

    os.kill(replacement, signal.SIGKILL)  # a second death within the minute: past --worker-restarts 1
    assert proc.wait(30) == 1
    err = proc.stderr.read().decode()
    assert "killed by SIGKILL" in err and "starting another" in err, err[-2000:]
    assert "already replaced within the last minute (--worker-restarts 1)" in err, err[-2000:]
    deadline = time.time() + 10
    while running(other):
        assert time.time() < deadline, "the other worker is still running"
        time.sleep(0.1)


def test_workers_must_be_at_least_one(cli):
    r = cli("serve", "--workers", "0")
    assert r.returncode == 2 and "--workers" in r.stderr


def test_a_port_in_use_is_a_clear_error(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = cli("serve", "--workers", "2", "--port", taken.getsockname()[1])
    assert r.returncode == 1 and "cannot listen on 127.0.0.1:" in r.stderr and "--port" in r.stderr, r.stderr


def test_workers_elsewhere_than_linux_say_why(cli, monkeypatch):
    monkeypatch.setattr("sys.platform", "darwin")
    r = cli("serve", "--workers", "2")
    assert r.returncode == 1 and "needs Linux" in r.stderr and "--workers 1" in r.stderr, r.stderr


def test_a_worker_that_cannot_load_the_model_says_why(tmp_path, capsys):
    """What a worker process runs (workers.run_worker), here in the test's process: one error line,
    exit code 1, which the parent then reports (test above)."""
    from fmnist.serving import workers
    from fmnist.cli import build_parser

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    args = build_parser().parse_args(["serve", "--workers", "2", "--checkpoint", str(bad)])
    sigint = signal.getsignal(signal.SIGINT)   # run_worker ignores Ctrl-C, as a worker should; this process not
    try:
        with pytest.raises(SystemExit) as e:
            workers.run_worker(args, loadtest.free_port(), logging.INFO)
    finally:
        signal.signal(signal.SIGINT, sigint)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "error:" in err and "model.pt" in err and "Traceback" not in err, err
