"""uvicorn, plus the two limits on a request head it lacks: a deadline and a size; and the
listening socket it serves on.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`), but a client that
connects and sends nothing, or one header line a second, holds its connection forever.
`HeadDeadline` gives every request head `header_timeout_s` from its first byte (from the
connection's start for the first request), then answers 408 and closes. Nor does httptools
bound a head's size: a fast client's 100 MiB header line was buffered whole. `HeadDeadline`
counts a head's bytes as they arrive and past `max_head_bytes` answers 431 and closes, before
the parser sees them. The body's deadline and size are RequestGuard's (guards.py), which works
under any ASGI server.

Closing is gentler than uvicorn's: where the client may still be sending (an answer given before
its body all arrived, a head cut off), the answer goes out with a FIN and what follows is read
and dropped for a few seconds (nginx's lingering close), since closing a socket with unread
data sends a reset, which can destroy the answer before the client reads it. Nor does a write
to a connection that is already closing raise (uvloop does): a client that resets while an
answer is streaming leaves no traceback.

It is a mixin over either of uvicorn's HTTP/1.1 protocols: httptools (a C parser, the
default where installed) or h11 (pure Python, always installed with uvicorn). Parsing and
writing took 60-150 CPU us per request with h11 and 40 with httptools, uvicorn's protocol
code included (bench/cpu/serve/profile.md). Why not another server: hypercorn and
granian have read timeouts but are one more dependency and behave differently under load;
this is ~60 lines on uvicorn's own protocols.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fmnist.serving.guards import WarningSummary

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


# Where a request head ends (its blank line), as h11 finds it; httptools agrees or refuses the
# request. Bytes after it (a body, the next request) share the read but are not head bytes.
_HEAD_END = re.compile(rb"\n\r?\n")


# After closing with client bytes maybe still on their way: read and drop them until the
# client's EOF, at most this long (nginx lingers 5 s after the last byte, 30 s in all) and
# this many bytes (enough for the rest of any upload the body limit lets through).
LINGER_S = 5.0
LINGER_MAX_BYTES = 64 << 20


def _431(max_head_bytes: int) -> bytes:
    return _answer(b"431 Request Header Fields Too Large", "headers_too_large",
                   f"the request head is over {max_head_bytes >> 10} KiB: refused unread; send fewer or "
                   f"smaller headers (cookies, tokens)")


def httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


class _Transport:
    """A connection's transport as uvicorn's protocol and the app see it; the rest passes
    through. close() is the protocol's `_close`, which may linger; write() once the connection
    is closing does nothing. (uvloop raises from a write to a closed handle, and uvicorn's
    httptools protocol marks only the newest of pipelined requests as disconnected, so an older
    one still being answered when its client reset wrote on and logged a traceback.)"""

    def __init__(self, transport: asyncio.Transport, protocol: HeadDeadline):
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def write(self, data) -> None:
        if not self.is_closing():
            self._transport.write(data)

    def pause_reading(self) -> None:
        if not self.is_closing():  # a lingering connection reads on, to the client's EOF
            self._transport.pause_reading()

    def close(self) -> None:
        self._protocol._close()


class HeadDeadline:
    """Mixin for a uvicorn HTTP protocol class (it uses their `cycle`, `loop`, `transport`).
    Also answers what the parser refuses (uvicorn: a text/plain 400) with the app's JSON error,
    and closes a connection by lingering where the client may still be sending."""
    header_timeout_s: float = 10.0  # set per server by `protocol_with_head_deadline`
    # Ditto. 64 KiB: room for big cookies (nginx allows 4 x 8 KiB, Node.js 16 KiB), held by a
    # connection for at most header_timeout_s.
    max_head_bytes: int = 64 << 10
    summaries: dict[str, WarningSummary] = {}  # ditto: "slow" and "large", each server its own

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_bytes = 0
        # httptools: the request being answered, older than `cycle` when the next is pipelined.
        self._running = None
        super().connection_made(_Transport(transport, self))
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0      # of the request head now arriving
        self._head_tail = b""     # its last 2 bytes: a blank line may straddle two reads
        self._head_after = None   # the request before the head being counted (uvicorn's cycle)
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

    def _head_fits(self, data: bytes) -> bool:
        """Counts `data`'s request-head bytes: False once a head is over `max_head_bytes`.
        Counted while no request is open or the open one's body has all arrived (a pipelined
        next request: httptools parses it while the app is busy), not in a body."""
        if self.cycle is not self._head_after:  # the parser made a request of the last head
            self._head_after, self._head_bytes, self._head_tail = self.cycle, 0, b""
        if self.cycle is not None and self.cycle.more_body:
            return True  # a body's bytes: RequestGuard counts those
        end = _HEAD_END.search(self._head_tail + data[:2])  # a blank line across the two reads
        if end:
            n = max(0, end.end() - len(self._head_tail))
        else:
            end = _HEAD_END.search(data)
            n = end.end() if end else len(data)
        self._head_bytes += n
        self._head_tail = (self._head_tail + data[-2:])[-2:]
        return self._head_bytes <= self.max_head_bytes

    def _in_body(self) -> bool:
        """The last request's body has not all arrived (also when it was answered early)."""
        return self.cycle is not None and self.cycle.more_body

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the answer has gone out: what the client still sends is dropped
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_MAX_BYTES:
                self._raw.close()
            return
        if not self._head_fits(data):
            self._refuse_head()
            return
        super().data_received(data)
        if self.cycle is not self._head_after:  # a head ended in this read: the next starts at 0
            self._head_after, self._head_bytes, self._head_tail = self.cycle, 0, b""
        if self._app_busy() or self._in_body():  # the app's time, or the rest of a body
            self._disarm()
        else:
            self._arm()  # bytes of a next request head: its deadline starts at the first one

    def _start_asgi_task(self, cycle, app) -> None:  # httptools only: h11 runs one at a time
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        cycle = self._running or self.cycle
        super().on_response_complete()
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body all arrived (an early 4xx) and kept open: the parser
            # would read the rest, slowly if the client is slow, and the head deadline then
            # answer a request never sent. RequestGuard asks for this close in the answer.
            self.transport.close()

    def _close(self) -> None:
        """Close now, or linger (see LINGER_S) where the client may still be sending."""
        raw = self._raw
        if self._lingering or raw.is_closing():
            return
        if not (self._in_body() or self._head_bytes) or not raw.can_write_eof():
            raw.close()
            return
        self._lingering = True
        self._disarm()
        self._unset_keepalive_if_required()
        raw.resume_reading()
        raw.write_eof()  # after the answer already buffered: the client reads it, then EOF
        self._linger_timer = self.loop.call_later(LINGER_S, raw.close)

    def eof_received(self) -> bool | None:
        if self._lingering:
            self._raw.close()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            # uvicorn marks only `cycle`, the pipelined request still queued: the one being
            # answered would otherwise write on, and wait for ever for a disconnect message.
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:  # uvicorn has logged it
        self.transport.write(_400)
        self.transport.close()

    def _may_answer(self) -> bool:
        """No response has been started on this connection since the last one finished."""
        return not self._app_busy()

    def _refuse_head(self) -> None:
        """431 and close, the head unread: the parser never buffers it."""
        self._disarm()
        if self.transport.is_closing():
            return
        self.summaries["large"].warn("%s: request head over %d bytes: closing",
                                     "%s:%d" % self.client if self.client else "client", self.max_head_bytes)
        if self._may_answer():
            self.transport.write(_431(self.max_head_bytes))
        self.transport.close()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._app_busy() or self.transport.is_closing():
            return
        self.summaries["slow"].warn("%s: no complete request within %.1f s: closing",
                                    "%s:%d" % self.client if self.client else "client", self.header_timeout_s)
        if self._may_answer():  # else a response already went out: just close
            self.transport.write(_408)
        self.transport.close()


class HeadDeadlineH11(HeadDeadline, H11Protocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # h11's own cap on an unfinished head (16 KiB) would refuse heads under ours with a 400.
        # Ours counts the bytes before h11 sees them, so it applies first; the margin is for
        # the start of a pipelined request that shared a read with the one before.
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=2 * self.max_head_bytes)

    def _may_answer(self) -> bool:
        return self.conn.their_state is h11.IDLE


def protocol_with_head_deadline(header_timeout_s: float, http: str = "auto", max_head_bytes: int = 64 << 10) -> type:
    """The protocol class to give uvicorn: http = 'httptools', 'h11' or 'auto' (httptools
    where installed); request heads get `header_timeout_s` and at most `max_head_bytes`."""
    if header_timeout_s <= 0:
        raise ValueError(f"header timeout must be > 0 s, got {header_timeout_s}")
    if max_head_bytes < 1024:  # a browser's ordinary request head is 0.5-2 KB
        raise ValueError(f"request head limit must be >= 1 KiB, got {max_head_bytes} bytes")
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
    # One count per server of the warnings an idle or hostile crowd raises per connection.
    summaries = {"slow": WarningSummary("connections closed without a complete request head (408)", logger=log),
                 "large": WarningSummary("request heads too large (431)", logger=log)}
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s, "max_head_bytes": max_head_bytes,
                                         "implementation": http, "summaries": summaries})


def listen_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A bound TCP socket. reuse_port: one of the group of worker processes' sockets on the
    same port (SO_REUSEPORT), among which the kernel spreads new connections evenly. A single
    server goes without, so that a second one on its port fails rather than shares it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # the port is taken, or the host is no address of ours (socket.gaierror)
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}; "
                               f"choose another --port or --host") from None
    return sock
