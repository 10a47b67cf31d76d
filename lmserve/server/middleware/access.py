"""One record per HTTP request, handed to sinks when its response has been sent in full.

The outermost middleware makes an `AccessRecord`, puts it on `request.state.access`, and once
the last body byte is sent (a stream's end, for SSE) fills in status and latency and passes the
record to its sinks: the JSON access log and the metrics. A generation route tells the record
its token counts through `TokenCountingEngine`; nothing here reaches into the engine.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.routing import replace_params
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.server.errors import CLIENT_CLOSED_REQUEST

if TYPE_CHECKING:
    from lmserve.request import RequestOutput, SamplingParams

access_logger = logging.getLogger("lmserve.access")

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID_LENGTH = 128


@dataclass
class AccessRecord:
    """What the access log says about one HTTP request. Token counts stay None where unknown."""

    request_id: str
    method: str
    path: str
    route: str = "unmatched"  # the route's template ("/v1/models/{model_id}"); "unmatched" if none ran
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))


def log_access(record: AccessRecord) -> None:
    """The access-log sink: one JSON object per line on the `lmserve.access` logger."""
    access_logger.info(record.to_json())


def access_record(request: Request) -> AccessRecord | None:
    """The record of `request`, if the access middleware is installed."""
    return getattr(request.state, "access", None)


class AccessMiddleware:
    """Outermost: sees every response, including 401, 413 and CORS preflights."""

    def __init__(self, app: ASGIApp, sinks: Sequence[Callable[[AccessRecord], None]]) -> None:
        self.app = app
        self.sinks = tuple(sinks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = self._new_record(scope)
        scope.setdefault("state", {})["access"] = record
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, record.request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            record.status = record.status or 500  # Starlette's outer error middleware answers 500
            raise
        finally:
            record.route = route_template(scope)
            record.status = record.status or CLIENT_CLOSED_REQUEST
            record.latency_ms = round((time.perf_counter() - started) * 1000, 3)
            self._emit(record)

    def _new_record(self, scope: Scope) -> AccessRecord:
        return AccessRecord(_request_id(Headers(scope=scope)), scope["method"], scope["path"])

    def _emit(self, record: AccessRecord) -> None:
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:
                logging.getLogger(__name__).exception("access sink %r failed", sink)


def _request_id(headers: Headers) -> str:
    """The client's X-Request-Id when it is a sane token, otherwise a fresh one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    if 0 < len(given) <= _MAX_REQUEST_ID_LENGTH and given.isprintable() and " " not in given:
        return given
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The path of the route that handled `scope` with its parameters named, so metrics labels
    stay few: "/v1/models/{model_id}". Requests answered before routing (401, 413, CORS
    preflights) and unknown paths are "unmatched".

    Built from the route's own template, never by searching the path for parameter values: a
    value may be empty (GET /v1/models/) or occur elsewhere in the path. The route knows its
    path without the prefix it was included under ("/models/{model_id}"); the prefix is what
    of the path comes before the route's part."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if not isinstance(template, str) or not template:
        return "unmatched"
    try:
        own, _ = replace_params(template, route.param_convertors, dict(scope.get("path_params", {})))
    except (AttributeError, KeyError, TypeError, ValueError):
        return template
    path = scope["path"]
    return path[: len(path) - len(own)] + template if path.endswith(own) else template


@dataclass
class TokenCountingEngine:
    """The engine as one generation route sees it: every output's tokens are added to `record`.

    Attributes other than `generate` are the engine's own. Handing this to the streaming and
    gathering code keeps token counting out of them and out of the engine.
    """

    engine: Any
    record: AccessRecord

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        # aclosing: closing this generator must close the engine's at once (that aborts the request).
        async with aclosing(self.engine.generate(request_id, prompt_ids, params)) as outputs:
            async for output in outputs:
                self.record.completion_tokens = (self.record.completion_tokens or 0) + len(output.new_token_ids)
                yield output
