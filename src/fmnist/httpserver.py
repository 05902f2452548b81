"""uvicorn, plus the one timeout it lacks: a deadline on the request head.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`) and caps connections
(`limit_concurrency`), but a client that connects and sends nothing, or one header line a
second, holds its connection forever. `HeadDeadline` gives every request head
`header_timeout_s` from its first byte (from the connection's start for the first request),
then answers 408 and closes. The body's deadline is RequestGuard's (guards.py), which works
under any ASGI server.

It is a mixin over either of uvicorn's HTTP/1.1 protocols: httptools (a C parser, the
default where installed) or h11 (pure Python, always installed with uvicorn). Parsing and
writing took 60-150 CPU us per request with h11 and 40 with httptools, uvicorn's protocol
code included (bench/cpu-serve/profile.md). Why not another server: hypercorn and
granian have read timeouts but are one more dependency and behave differently under load;
this is ~60 lines on uvicorn's own protocols.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def _answer(status: bytes, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with the app's JSON error body, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(body), body))


_408 = _answer(b"408 Request Timeout", "request_timeout", "the request head did not arrive in time")
# Either parser refuses a malformed head, and httptools one with both Content-Length and
# Transfer-Encoding (request smuggling), before the app sees it.
_400 = _answer(b"400 Bad Request", "invalid_http", "not a valid HTTP/1.1 request (a malformed head, or both "
                                                   "Content-Length and Transfer-Encoding): refused unread")


def httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


class HeadDeadline:
    """Mixin for a uvicorn HTTP protocol class (it uses their `cycle`, `loop`, `transport`).
    Also answers what the parser refuses (uvicorn: a text/plain 400) with the app's JSON error."""
    header_timeout_s: float = 10.0  # set per server by `protocol_with_head_deadline`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm()  # a connection that sends nothing at all

    def _app_busy(self) -> bool:
        """A request head has arrived and its response is not finished: the app's time, not ours."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._app_busy():
            self._disarm()
        else:
            self._arm()  # bytes of a next request head: its deadline starts at the first one

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # uvicorn has logged it
        self.transport.write(_400)
        self.transport.close()

    def _may_answer(self) -> bool:
        """No response has been started on this connection since the last one finished."""
        return True

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._app_busy() or self.transport.is_closing():
            return
        log.warning("%s: no complete request within %.1f s: closing",
                    "%s:%d" % self.client if self.client else "client", self.header_timeout_s)
        if self._may_answer():  # else a response already went out: just close
            self.transport.write(_408)
        self.transport.close()


class HeadDeadlineH11(HeadDeadline, H11Protocol):
    def _may_answer(self) -> bool:
        return self.conn.their_state is h11.IDLE


def protocol_with_head_deadline(header_timeout_s: float, http: str = "auto") -> type:
    """The protocol class to give uvicorn: http = 'httptools', 'h11' or 'auto' (httptools
    where installed)."""
    if header_timeout_s <= 0:
        raise ValueError(f"header timeout must be > 0 s, got {header_timeout_s}")
    if http == "auto":
        http = "httptools" if httptools_available() else "h11"
    if http == "httptools":
        if not httptools_available():
            raise ImportError("--http httptools needs the httptools package: pip install httptools (or --http h11)")
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type = type("HeadDeadlineHttpTools", (HeadDeadline, HttpToolsProtocol), {})
    elif http == "h11":
        base = HeadDeadlineH11
    else:
        raise ValueError(f"unknown HTTP implementation {http!r}; use httptools, h11 or auto")
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s, "implementation": http})
