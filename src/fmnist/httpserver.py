"""uvicorn, plus the one timeout it lacks: a deadline on the request head.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`) and caps connections
(`limit_concurrency`), but a client that connects and sends nothing, or one header line a
second, holds its connection forever. `HeadDeadlineH11Protocol` gives every request head
`header_timeout_s` from its first byte (from the connection's start for the first request),
then answers 408 and closes. The body's deadline is RequestGuard's (guards.py), which works
under any ASGI server.

Why not another server: hypercorn and granian have read timeouts but are one more dependency
and behave differently under load; this subclass is ~50 lines on uvicorn's own h11 protocol
(h11 is pure Python and always installed with uvicorn). It always uses h11, never httptools.
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_BODY = json.dumps({"error": {"code": "request_timeout",
                              "message": "the request head did not arrive in time"}}).encode()
_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY))


class HeadDeadlineH11Protocol(H11Protocol):
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

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._app_busy() or self.transport.is_closing():
            return
        log.warning("%s: no complete request within %.1f s: closing",
                    "%s:%d" % self.client if self.client else "client", self.header_timeout_s)
        if self.conn.their_state is h11.IDLE:  # else a response already went out: just close
            self.transport.write(_408)
        self.transport.close()


def protocol_with_head_deadline(header_timeout_s: float) -> type[HeadDeadlineH11Protocol]:
    if header_timeout_s <= 0:
        raise ValueError(f"header timeout must be > 0 s, got {header_timeout_s}")
    return type("HeadDeadlineH11Protocol", (HeadDeadlineH11Protocol,), {"header_timeout_s": header_timeout_s})
