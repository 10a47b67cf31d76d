"""Stopping with requests in flight: the server's graceful shutdown, on the app's side.

`stop_serving` is the one path a stop takes (a signal, through lmserve/server/graceful.py, or the
app's lifespan ending): new requests answer 503; those in flight get up to the shutdown timeout
to finish; then the fleet closes, which ends the requests still decoding with the engine's abort
(a stream: an error event, then [DONE]; a whole answer: a 503), and the requests doing other work
(compiling a grammar, waiting for a load, embedding) are cancelled and answered 503 here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.fleet.fleet import Fleet
from lmserve.server.errors import error_body

log = logging.getLogger("lmserve")

# After the fleet has ended the decoding requests: how long their last bytes may take to go out
# before whatever is left is cancelled.
ENDING_SECONDS = 2.0
_SHUTTING_DOWN = "The server is shutting down; retry the request."


@dataclass(eq=False)
class _Request:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    started: bool = False  # its response has begun: it can no longer be answered 503


class InFlight:
    """The HTTP requests being answered now, and whether new ones are still taken."""

    def __init__(self) -> None:
        self.stopping = False  # new requests answer 503
        self._requests: set[_Request] = set()

    def __len__(self) -> int:
        return len(self._requests)

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight; False if some still are after `timeout` seconds."""
        with anyio.move_on_after(timeout):
            while self._requests:
                await anyio.sleep(0.05)  # polled: no event bound to one loop (the app outlives test clients' loops)
        return not self._requests

    def cancel(self, unstarted_only: bool) -> int:
        """Cancel the requests in flight (only those whose response has not begun); how many."""
        chosen = [r for r in self._requests if not (unstarted_only and r.started)]
        for request in chosen:
            request.scope.cancel()
        return len(chosen)

    def _add(self, request: _Request) -> None:
        self._requests.add(request)

    def _discard(self, request: _Request) -> None:
        self._requests.discard(request)


async def stop_serving(requests: InFlight, fleet: Fleet, timeout: float) -> None:
    """Refuse new requests, give those in flight `timeout` seconds, then end the rest and unload
    every model."""
    requests.stopping = True
    if requests:
        log.info("stopping: %d requests in flight have up to %g s to finish", len(requests), timeout)
    if not await requests.wait_idle(timeout):
        log.warning("stopping: ending %d requests still running after %g s", len(requests), timeout)
    await fleet.close(drain_timeout=0)  # the decoding requests end with the engine's abort
    requests.cancel(unstarted_only=True)  # the others answer 503
    if not await requests.wait_idle(ENDING_SECONDS):
        requests.cancel(unstarted_only=False)


class DrainingMiddleware:
    """Counts the requests in flight in `requests`; once it is stopping, answers new ones 503, and
    answers 503 to a request cancelled by `InFlight.cancel` before its response began."""

    def __init__(self, app: ASGIApp, requests: InFlight) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.requests.stopping:
            await shutting_down_response()(scope, receive, send)
            return
        request = _Request()

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.started = True
            await send(message)

        self.requests._add(request)
        try:
            with request.scope:
                await self.app(scope, receive, tracked_send)
            if request.scope.cancelled_caught and not request.started:
                await shutting_down_response()(scope, receive, send)
        finally:
            self.requests._discard(request)


def shutting_down_response() -> JSONResponse:
    body = error_body(_SHUTTING_DOWN, "server_error", code="server_shutting_down")
    return JSONResponse(body, status_code=503, headers={"Connection": "close"})
