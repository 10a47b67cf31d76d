"""Connections that cannot be held open for nothing: uvicorn's HTTP/1.1 protocol (h11) with a
deadline on every request head, a cap on open connections, and OpenAI-shaped refusals.

uvicorn closes an idle keep-alive connection, but a connection that sends a request head slowly
(a byte every few seconds: "slowloris") is never closed, and each one holds a descriptor and a
buffer. Here each head (the request line and headers) must arrive whole within `read_timeout`
seconds of the connection opening or the previous response ending; the body that follows has
its own deadline (middleware/limits.py). Past `max_connections` open connections a new one is
answered 503 and closed, before the process runs out of descriptors.

A client that stops reading a response fills its socket's buffers; uvicorn then holds the
response's sender until it reads again, and with it the request's turn on the model and its
model. If it reads nothing more for `write_timeout` seconds the connection is dropped, which
ends its request as a disconnect does.

A refusal (408, 503, a 400 for bytes that are not HTTP) is followed by a lingering close: the
server stops sending, then reads and drops whatever the client still sends until it has been
quiet for LINGER_QUIET seconds (at most LINGER_MAX), and only then closes. Closing a socket with
unread bytes in it makes the kernel reset the connection, and a reset can discard the refusal
before the client has read it (a slow client is by definition still sending).
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmserve.server.errors import error_body
from lmserve.server.middleware.limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, DEFAULT_WRITE_TIMEOUT
KEEP_ALIVE_SECONDS = 5  # uvicorn's default, stated: an idle connection is closed after this
MAX_HEAD_BYTES = 64 * 2**10  # a longer request line and headers: a 400 (h11's default is 16 KiB)
LINGER_QUIET = 1.0  # seconds without a byte from the client before a refused connection is closed
LINGER_MAX = 5.0  # seconds a refused connection is kept at most, however the client goes on sending


@dataclass(frozen=True)
class ConnectionLimits:
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds a request head may take to arrive
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open at once; past it: 503 and closed
    write_timeout: float = DEFAULT_WRITE_TIMEOUT  # seconds a client may leave a response unread


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """uvicorn.run's keyword arguments for these limits."""
    return {"http": functools.partial(GuardedH11Protocol, limits=limits), "timeout_keep_alive": KEEP_ALIVE_SECONDS,
            "h11_max_incomplete_event_size": MAX_HEAD_BYTES}


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline per request head, one on reading what it is sent,
    and a cap on connections."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._linger_ends: float | None = None  # loop time a refused connection is closed by, at the latest
        self._linger_close: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.logger.warning("refusing a connection: %d are open (the limit)", self.limits.max_connections)
            self._refuse(503, "Service Unavailable", "The server has too many open connections; retry shortly.",
                         "too_many_connections")
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._linger_ends is not None:  # refused: what it still sends is dropped
            self._linger()
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in (or the connection is done)
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_head()  # the next request's head gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._stop_write_deadline()
        if self._linger_close is not None:
            self._linger_close.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The socket's buffers are full: the client has that long to read some of it."""
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.limits.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        self._stop_write_deadline()
        super().resume_writing()

    def _stop_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        if self.transport.is_closing():
            return
        prefix = "%s:%d - " % self.client if self.client else ""
        self.logger.warning("%sclosing a connection whose client read nothing of its response for %g seconds",
                            prefix, self.limits.write_timeout)
        self.transport.abort()  # close() would wait for the unread bytes to go first

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are no HTTP request (h11 also refuses a head over
        MAX_HEAD_BYTES so), OpenAI-shaped."""
        self._refuse(400, "Bad Request", f"The request is not valid HTTP/1.1, or its head is longer than "
                                         f"{MAX_HEAD_BYTES} bytes.", "invalid_http_request")

    def _await_head(self) -> None:
        self._stop_waiting()
        self._head_deadline = self.loop.call_later(self.limits.read_timeout, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # no response under way: say why before closing
            self._refuse(408, "Request Timeout", f"The request head did not arrive within "
                                                 f"{self.limits.read_timeout:g} seconds.", "request_timeout")
        else:
            self.transport.close()

    def _refuse(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer `status` and close, whatever h11 thinks of the connection's state."""
        self._stop_waiting()
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = json.dumps(error_body(message, kind, code=code)).encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the refusal, then the end of what this side sends
            self._linger_ends = self.loop.time() + LINGER_MAX
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """(Re)start the quiet period after which a refused connection is closed (see the module's
        docstring); the client's own end of the connection closes it sooner (eof_received)."""
        if self._linger_close is not None:
            self._linger_close.cancel()
        self._linger_close = self.loop.call_at(min(self.loop.time() + LINGER_QUIET, self._linger_ends),
                                               self.transport.close)
