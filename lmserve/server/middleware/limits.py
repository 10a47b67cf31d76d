"""A cap on request body size: 413 before reading a body whose Content-Length is too big, and
413 as soon as a chunked body crosses the cap (what was read so far is all that is held)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.server.errors import error_body

DEFAULT_MAX_REQUEST_BODY = 16 * 2**20


class RequestTooLarge(HTTPException):
    """Raised from `receive` when the body crosses the cap. An HTTPException, so FastAPI's body
    reader lets it through rather than turning it into a 400."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def too_large_response(max_bytes: int) -> JSONResponse:
    body = error_body(f"The request body is larger than the server's limit of {max_bytes} bytes.",
                      "invalid_request_error", code="request_too_large")
    # The unread rest of the body would be taken as the next request: end the connection.
    return JSONResponse(body, status_code=413, headers={"Connection": "close"})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.max_bytes:
            await too_large_response(self.max_bytes)(scope, receive, send)
            return
        guard = _BodyGuard(receive, send, self.max_bytes)
        try:
            await self.app(scope, guard.receive, guard.send)
        except RequestTooLarge:
            pass  # answered below
        if guard.tripped and not guard.started:
            await too_large_response(self.max_bytes)(scope, receive, send)


def _declared_length(scope: Scope) -> int:
    try:
        return int(Headers(scope=scope).get("content-length", "0"))
    except ValueError:
        return 0  # malformed: the HTTP server refuses it before us


class _BodyGuard:
    """Counts body bytes as the app reads them; past the cap, `receive` raises and whatever
    the app would answer is dropped for the 413."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int) -> None:
        self._receive, self._send, self.max_bytes = receive, send, max_bytes
        self.num_bytes = 0
        self.tripped = False
        self.started = False

    async def receive(self) -> Message:
        if self.tripped:
            raise RequestTooLarge()
        message = await self._receive()
        if message["type"] == "http.request":
            self.num_bytes += len(message.get("body", b""))
            if self.num_bytes > self.max_bytes:
                self.tripped = True
                raise RequestTooLarge()
        return message

    async def send(self, message: Message) -> None:
        if self.tripped:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)
