"""A cap on request body size, and a deadline for reading it.

Size: 413 before reading a body whose Content-Length is too big, and 413 as soon as a chunked
body crosses the cap (what was read so far is all that is held).

Time: a body that trickles in would hold its connection (and what it sent) indefinitely. It
must arrive within `read_timeout` seconds plus one second per MIN_BODY_BYTES_PER_SECOND bytes
received so far, so a client sending at least that fast is never cut off, whatever the body's
size; a slower one gets a 408. Once the body is in, `receive` waits for a disconnect as long as
the response takes, unlimited.
"""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.server.errors import error_body

DEFAULT_MAX_REQUEST_BODY = 16 * 2**20
# --read-timeout: seconds for a request head (connections.py) and for a body, before the
# allowance for the bytes received
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 512  # --max-connections (connections.py)
DEFAULT_WRITE_TIMEOUT = 600.0  # --write-timeout (connections.py): llama-server's --timeout default
MIN_BODY_BYTES_PER_SECOND = 16 * 2**10  # 128 kbit/s


class RequestTooLarge(HTTPException):
    """Raised from `receive` when the body crosses the cap. An HTTPException, so FastAPI's body
    reader lets it through rather than turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyTimedOut(HTTPException):
    """Raised from `receive` when the body is late; as RequestTooLarge, an HTTPException."""

    def __init__(self) -> None:
        super().__init__(408, "request body timed out")


def too_large_response(max_bytes: int) -> JSONResponse:
    body = error_body(f"The request body is larger than the server's limit of {max_bytes} bytes.",
                      "invalid_request_error", code="request_too_large")
    # The unread rest of the body would be taken as the next request: end the connection.
    return JSONResponse(body, status_code=413, headers={"Connection": "close"})


def timed_out_response(timeout: float) -> JSONResponse:
    body = error_body(f"The request body arrived too slowly: it must come within {timeout:g} seconds plus one "
                      f"second per {MIN_BODY_BYTES_PER_SECOND} bytes.", "invalid_request_error",
                      code="request_timeout")
    return JSONResponse(body, status_code=408, headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await too_large_response(self.max_bytes)(scope, receive, send)
            return
        guard = _BodyGuard(receive, send, self.max_bytes, self.timeout)
        try:
            await self.app(scope, guard.receive, guard.send)
        except (RequestTooLarge, BodyTimedOut):
            pass  # answered below
        if guard.refusal is not None and not guard.started:
            await guard.refusal(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    try:
        return int(Headers(scope=scope).get("content-length", "0"))
    except ValueError:
        return 0  # malformed: the HTTP server refuses it before us


class _BodyGuard:
    """Counts body bytes and time as the app reads them; past the cap or the deadline, `receive`
    raises and whatever the app would answer is dropped for the refusal."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int, timeout: float) -> None:
        self._receive, self._send, self.max_bytes, self.timeout = receive, send, max_bytes, timeout
        self.num_bytes = 0
        self.refusal: JSONResponse | None = None
        self.started = False
        self.body_done = False
        self._first_read: float | None = None

    async def receive(self) -> Message:
        if self.refusal is not None:
            raise RequestTooLarge() if self.refusal.status_code == 413 else BodyTimedOut()
        message = await (self._receive() if self.body_done else self._receive_in_time())
        if message["type"] == "http.request":
            self.num_bytes += len(message.get("body", b""))
            self.body_done = not message.get("more_body", False)
            if self.num_bytes > self.max_bytes:
                self.refusal = too_large_response(self.max_bytes)
                raise RequestTooLarge()
        else:
            self.body_done = True  # a disconnect: nothing more will come
        return message

    async def _receive_in_time(self) -> Message:
        now = time.monotonic()
        self._first_read = self._first_read if self._first_read is not None else now
        deadline = self._first_read + self.timeout + self.num_bytes / MIN_BODY_BYTES_PER_SECOND
        try:
            return await asyncio.wait_for(self._receive(), max(deadline - now, 0.0))
        except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11
            self.refusal = timed_out_response(self.timeout)
            raise BodyTimedOut() from None

    async def send(self, message: Message) -> None:
        if self.refusal is not None:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)
