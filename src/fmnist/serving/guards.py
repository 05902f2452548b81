"""Limits that keep one client from taking the server down, independent of the HTTP server.

`RequestGuard` (ASGI middleware) caps each request body by the bytes actually received, not
by the Content-Length header (chunked framing ignores it), and by time, so a body sent at
1 byte/s cannot hold a worker forever. `ConversionSlots` bounds how many uploaded images are
converted at once across all requests: a conversion can cost a second of CPU and hundreds of
MB, so past the bound a request waits briefly and then gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

log = logging.getLogger(__name__)


class _Refused(Exception):
    """Raised from `receive` to stop the app reading a body the guard has refused."""


def _json_response(status: int, code: str, message: str, extra_headers=()) -> tuple[dict, dict]:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    # connection: close, so the server drops the rest of the body instead of reading it.
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *extra_headers]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class RequestGuard:
    """ASGI middleware: 413 once a body passes `max_body_bytes`, 408 once it has taken longer
    than `body_timeout_s` to arrive. Either way the answer goes out at once with
    `connection: close`, and the rest of the body is never read."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def _too_large(self, size: str) -> tuple[dict, dict]:
        return _json_response(413, "payload_too_large", f"request body is {size} bytes; the limit is "
                                                        f"{self.max_body_bytes:,} bytes: send fewer or smaller images")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
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
                log.warning("request body not received within %.1f s (%d bytes so far): answering 408",
                            self.body_timeout_s, received)
                refusal = _json_response(408, "request_timeout",
                                         f"the request body did not arrive within {self.body_timeout_s:g} s "
                                         f"({received:,} bytes received); send it faster or send less")
                raise _Refused from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > self.max_body_bytes:
                    log.warning("request body passed %d bytes: answering 413", self.max_body_bytes)
                    refusal = self._too_large(f"over {self.max_body_bytes:,}")
                    raise _Refused
            return msg

        async def guarded_send(msg):
            nonlocal started
            if refusal:  # the app's answer to a body it could not read: ours replaces it
                return
            started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refusal:
                raise
        if refusal and not started:
            for msg in refusal:
                await send(msg)


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
