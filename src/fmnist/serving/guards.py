"""Limits that keep one client from taking the server down, independent of the HTTP server.

`RequestGuard` (ASGI middleware) caps each request body by the bytes actually received, not
by the Content-Length header (chunked framing ignores it), and by time, so a body sent at
1 byte/s cannot hold a worker forever; it closes the connection after an answer given before
the body all arrived, and a client that leaves mid-request costs one log line, no traceback.
`RequestLimit` bounds the requests in progress, answering the rest 503 with Retry-After at
once. `ConversionSlots` bounds how many uploaded images are converted at once across all
requests: a conversion can cost a second of CPU and hundreds of MB, so past the bound a
request waits briefly and then gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)

CLOSE = (b"connection", b"close")


class _Refused(Exception):
    """Raised from `receive` to stop the app reading a body the guard has refused."""


def _json_response(status: int, code: str, message: str, extra_headers=()) -> tuple[dict, dict]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    # connection: close, so the server drops the rest of the body instead of reading it.
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               CLOSE, *extra_headers]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class WarningSummary:
    """A warning that a flood of clients can raise thousands of times a second (requests
    refused, heads timed out): the first after a quiet spell is logged as it comes, the rest
    as one count per `every_s` while they last."""

    def __init__(self, what: str, every_s: float = 10.0, logger: logging.Logger = log):
        self.what = what          # "requests answered 503 ...": what the count line counts
        self.every_s = every_s
        self.log = logger
        self.count = 0            # since the server started
        self._unlogged = 0
        self._timer: asyncio.TimerHandle | None = None

    def warn(self, msg: str, *args) -> None:
        self.count += 1
        if self._timer is None:
            self.log.warning(msg, *args)
            self._timer = asyncio.get_running_loop().call_later(self.every_s, self._flush)
        else:
            self._unlogged += 1

    def _flush(self) -> None:
        if not self._unlogged:
            self._timer = None
            return
        self.log.warning("%d more %s in the last %g s", self._unlogged, self.what, self.every_s)
        self._unlogged = 0
        self._timer = asyncio.get_running_loop().call_later(self.every_s, self._flush)


def _client(scope) -> str:
    return "%s:%d" % tuple(scope["client"]) if scope.get("client") else "a client"


class RequestGuard:
    """ASGI middleware: 413 once a body passes `max_body_bytes`, 408 once it has taken longer
    than `body_timeout_s` to arrive. Either way the answer goes out at once with
    `connection: close`, and the rest of the body is never read. The app's own answers given
    before the body all arrived (an early 4xx) get `connection: close` too: the rest of the
    body is no next request. A client that leaves mid-request is one INFO line."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self._slow = WarningSummary("request bodies too slow (408)")
        self._large = WarningSummary("request bodies too large (413)")

    def _too_large(self, size: str) -> tuple[dict, dict]:
        return _json_response(413, "payload_too_large", f"request body is {size} bytes; the limit is "
                                                        f"{self.max_body_bytes:,} bytes: send fewer or smaller images")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        has_body = (length is not None and length.strip(b"0") != b"") or b"transfer-encoding" in headers
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            for msg in self._too_large(length.decode("latin-1")):  # declared too large: refuse unread
                await send(msg)


            return

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        received = 0
        body_done = False
        refusal: tuple[dict, dict] | None = None
        started = False

        async def guarded_receive():
            nonlocal received, body_done, refusal
            if refusal:
                raise _Refused
            if body_done:  # later calls only wait for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                self._slow.warn("%s: request body not received within %.1f s (%d bytes so far): answering 408",
                                _client(scope), self.body_timeout_s, received)
                refusal = _json_response(408, "request_timeout",
                                         f"the request body did not arrive within {self.body_timeout_s:g} s "
                                         f"({received:,} bytes received); send it faster or send less")
                raise _Refused from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > self.max_body_bytes:
                    self._large.warn("%s: request body passed %d bytes: answering 413", _client(scope),
                                     self.max_body_bytes)
                    refusal = self._too_large(f"over {self.max_body_bytes:,}")
                    raise _Refused
            return msg

        async def guarded_send(msg):
            nonlocal started
            if refusal:  # the app's answer to a body it could not read: ours replaces it
                return
            if not started and has_body and not body_done and CLOSE not in msg.get("headers", ()):
                msg = {**msg, "headers": [*msg.get("headers", ()), CLOSE]}
            started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except ClientDisconnect:  # raised by starlette where the app reads a body whose client left
            got = f" ({received:,} bytes of its body received)" if has_body else ""
            log.info("%s left during %s %s%s: request dropped", _client(scope), scope["method"], scope["path"], got)
            return
        except Exception:
            if not refusal:
                raise
        if refusal and not started:
            for msg in refusal:
                await send(msg)


class RequestCount:
    """Requests in progress against a limit, and those refused; shared by `RequestLimit` and
    /healthz."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"request limit must be >= 1, got {limit}")
        self.limit = limit
        self.in_progress = 0
        self.refusals = WarningSummary("requests answered 503 (too many in progress)")

    def state(self) -> dict:
        return {"in_progress": self.in_progress, "limit": self.limit, "refused": self.refusals.count}


class RequestLimit:
    """ASGI middleware: at most `count.limit` requests in progress (head received, answer not
    yet finished); past it, 503 with Retry-After at once. It counts requests, not connections:
    an idle connection costs a socket and a few KB but no work, and counting those let a few
    hundred silent connections refuse every request. Paths in `exempt` (the liveness check,
    microseconds each) are never refused, so a busy server is not taken for a dead one."""

    def __init__(self, app, count: RequestCount, exempt: tuple[str, ...] = (), retry_after_s: int = 1):
        self.app = app
        self.count = count
        self.exempt = frozenset(exempt)
        self.retry_after_s = retry_after_s

    async def __call__(self, scope, receive, send):
        count = self.count
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if count.in_progress >= count.limit:
            count.refusals.warn("%d requests in progress, the limit: answering more with 503", count.in_progress)
            for msg in _json_response(503, "busy", f"{count.limit} requests are in progress, the most this server "
                                                   f"takes at once: retry in {self.retry_after_s} s",
                                      [(b"retry-after", str(self.retry_after_s).encode())]):
                await send(msg)
            return
        count.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            count.in_progress -= 1


class Busy(Exception):
    """Every conversion slot stayed taken for the whole wait."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"busy: retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ConversionSlots:
    """At most `limit` image conversions at once across all requests. A caller waits up to
    `wait_s` for a slot, then gets `Busy`. Counters feed /healthz."""

    def __init__(self, limit: int, wait_s: float):
        if limit < 1:
            raise ValueError(f"conversion limit must be >= 1, got {limit}")
        if wait_s < 0:
            raise ValueError(f"conversion wait must be >= 0 s, got {wait_s}")
        self.limit = limit
        self.wait_s = wait_s
        self._sem = asyncio.Semaphore(limit)
        self.running = 0
        self.refused = 0   # requests answered 503 because every slot was taken
        self.dropped = 0   # conversions skipped because the client had left

    @asynccontextmanager
    async def slot(self):
        if self._sem.locked():
            try:
                if self.wait_s <= 0:
                    raise TimeoutError
                async with asyncio.timeout(self.wait_s):
                    await self._sem.acquire()
            except TimeoutError:
                self.refused += 1
                raise Busy(max(1, round(self.wait_s))) from None
        else:
            await self._sem.acquire()
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()

    def state(self) -> dict:
        return {"running": self.running, "limit": self.limit, "refused": self.refused, "dropped": self.dropped}
