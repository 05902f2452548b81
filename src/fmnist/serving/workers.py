"""`fmnist serve --workers N`: the supervisor that starts N server processes on one port, replaces
one that dies and stops them together. It imports neither torch nor the app (each worker does):
the supervisor stays a small process that only watches."""

from __future__ import annotations

import logging
import signal
import sys
import time

from fmnist.serving.httpserver import listen_socket

log = logging.getLogger(__name__)


def run_worker(args, port: int, log_level: int, ready=None, listen_now: bool = True) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, no inherited threads).
    listen_now: listen before the model loads (the first workers: connections made at once,
    a load test's, wait in each one's queue and so reach all of them); a replacement listens
    only once it serves, or the kernel would hand it new connections to wait out its loading."""
    from fmnist.utils.logsetup import setup_logging

    setup_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    from fmnist.models.checkpoint import CheckpointError

    try:
        sock = listen_socket(args.host, port)
        if listen_now:
            sock.listen(2048)
        from fmnist.serving.app import _serve   # torch, the app, the model: in the worker only

        _serve(args, sock, worker=True, ready=ready)  # uvicorn listens on it if we did not
    except (CheckpointError, ValueError, ImportError, OSError) as e:  # as the CLI reports them: one line
        log.error(str(e))
        sys.exit(1)


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = " (as the kernel's out-of-memory killer does)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{why}"
    return f"exit code {code}"


def supervise(args) -> int:
    """--workers N: N processes, each with its own model, batcher and event loop (one Python
    process keeps at most ~1.6 cores busy: the interpreter lock). Each listens on the port with
    SO_REUSEPORT. A worker that dies once it has served is replaced, as gunicorn does, while the
    others serve on; past `--worker-restarts` replacements within a minute the server stops
    with an error rather than die and restart for ever. A worker that dies before it serves
    (the model does not load) stops the server at once: its replacement would too."""
    import multiprocessing as mp

    if not sys.platform.startswith("linux"):
        # Elsewhere SO_REUSEPORT is missing (Windows) or hands every connection to one socket (macOS).
        raise ValueError(f"--workers {args.workers} needs Linux, where the kernel spreads connections "
                         f"over the workers (SO_REUSEPORT); this is {sys.platform}: use --workers 1, or run "
                         f"several servers behind a reverse proxy")
    # Held, bound and never listening, so the port is ours and known (--port 0) before any
    # worker starts; a socket that does not listen is given no connections.
    holder = listen_socket(args.host, args.port)
    port = holder.getsockname()[1]
    ctx = mp.get_context("spawn")
    level = logging.getLogger("fmnist").getEffectiveLevel()

    def start(i: int, listen_now: bool = True):
        ready = ctx.Event()
        p = ctx.Process(target=run_worker, args=(args, port, level, ready, listen_now), name=f"fmnist-serve-{i}")
        p.start()
        return p, ready

    workers = [start(i) for i in range(args.workers)]
    restarts: list[float] = []   # when workers were replaced, for the bound per minute
    stop = {"signal": None}
    failure = None

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info(f"{args.workers} worker processes on http://{args.host}:{port}/")
        while stop["signal"] is None and failure is None:
            time.sleep(0.2)
            for i, (p, ready) in enumerate(workers):
                if p.is_alive() or stop["signal"] is not None:
                    continue
                p.join()
                dead = f"worker {p.name} (pid {p.pid}) {exit_reason(p.exitcode)}"
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60]
                if not ready.is_set():
                    failure = f"{dead} before it could serve; stopped the others"
                elif len(restarts) >= args.worker_restarts:
                    failure = (f"{dead}, and {len(restarts)} worker(s) were already replaced within the last minute "
                               f"(--worker-restarts {args.worker_restarts}): something keeps killing them (memory? "
                               f"see the kernel log, dmesg); stopped the others")
                else:
                    restarts.append(now)
                    log.error(f"{dead}; starting another, the others serve on")
                    workers[i] = start(i, listen_now=False)
                if failure:
                    break
    finally:
        for p, _ in workers:
            if p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
        for p, _ in workers:
            p.join(15)
            if p.is_alive():
                p.kill()
                p.join()
        holder.close()
        for s, h in old.items():
            signal.signal(s, h)
    if failure is None:
        return 0
    log.error(f"a worker process stopped: {failure}")
    return 1
