"""The ASGI app: middleware around the routes, OpenAI-shaped errors, the OpenAPI schema.

One chat completion, hop by hop:

1. middleware/: access.py opens the request's access record (outermost), hosts.py checks the
   Host header, cors.py answers browser preflights, auth.py checks the API key, limits.py caps
   the body size.
2. routes/generation.py: FastAPI validates the body against protocol.py (a bad one is a 400
   from errors.py); state.py leases the requested model from the fleet (lmserve/fleet/),
   which loads it first if it is not loaded, and holds it until the response is sent.
3. requests/plan/ turns the request into a GenerationPlan, within requests/cost.py's limits:
   the prompt from requests/chat_prompt.py, a grammar from requests/tools.py or
   requests/constraints.py, one SamplingParams per choice.
4. admission.py gives the request a turn on its model's engine (clients take turns; a full queue
   answers 429, a long wait 503). The engine runs each choice (AsyncEngine.generate);
   responses/fanout.py merges their outputs.
5. responses/json_body.py answers one JSON body, or responses/event_stream.py streams SSE
   chunks; lmserve/parsing/reply.py splits the reply into reasoning, content and tool calls.

Every route exists under /v1 (OpenAI) and without the prefix (as llama.cpp offers them), except
/health, /props and /metrics, which are served at the root only (as is the web chat page at /,
server/web/), and /completions: under /v1 it is OpenAI's, without it llama.cpp's native one
(also at /completion), as llama.cpp routes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from http import HTTPStatus
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from lmserve.fleet.fleet import ModelStatus
from lmserve.server.errors import ERROR_RESPONSES, install_error_handlers
from lmserve.server.middleware.access import AccessMiddleware, log_access
from lmserve.server.middleware.auth import PUBLIC_PATHS, ApiKeyMiddleware
from lmserve.server.middleware.cors import LmserveCORSMiddleware
from lmserve.server.middleware.draining import DrainingMiddleware
from lmserve.server.middleware.hosts import HostCheckMiddleware
from lmserve.server.middleware.limits import BodyLimitMiddleware
from lmserve.server import web
from lmserve.server.requests.body_text import check_json_body
from lmserve.server.routes import conversations, embeddings, generation, interactive, models, ops, responses, slots
from lmserve.server.state import ServerState

logger = logging.getLogger("lmserve")

# Mounted with and without /v1, in this order (it is the order of the OpenAPI schema's paths).
PREFIXED_ROUTERS = (models.router, generation.router, embeddings.router, ops.token_router)


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app serving `state`'s fleet of models. While the app runs (its lifespan), the
    pinned models load in the background and idle ones are unloaded after their ttl."""
    app = FastAPI(title="lmserve", summary="Local LLMs behind the OpenAI API", lifespan=_lifespan,
                  dependencies=[Depends(check_json_body)])
    app.state.lmserve = state
    install_error_handlers(app)
    _add_middleware(app, state)
    for router in PREFIXED_ROUTERS:
        app.include_router(router, prefix="/v1", responses=ERROR_RESPONSES)
        app.include_router(router, include_in_schema=False)  # llama.cpp-style paths, same handlers
    app.include_router(generation.v1_router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(responses.router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(conversations.router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(interactive.router, responses=ERROR_RESPONSES)
    app.include_router(generation.llama_router, responses=ERROR_RESPONSES)
    app.include_router(slots.router)
    app.include_router(ops.server_router)
    app.mount(web.UI_PREFIX, web.static_files(), name="ui")
    app.openapi = lambda: _openapi_schema(app)  # type: ignore[method-assign]
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.lmserve
    tasks = [asyncio.create_task(_load_pinned(state)), asyncio.create_task(state.fleet.reap_forever())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.stop()  # begun already when a signal stopped the server (graceful.py)


async def _load_pinned(state: ServerState) -> None:
    """Load the models served from start-up; /health answers 503 until they are in. When a failed
    one leaves nothing to serve (`state.exit_if_pinned_fails`), the process ends: as a single
    model that cannot load always did, with the reason and no traceback."""
    await state.fleet.load_pinned()
    failed = [slot for slot in state.fleet.slots() if slot.entry.pinned and slot.status is ModelStatus.FAILED]
    for slot in failed:
        logger.error("cannot serve %s: %s", slot.entry.source, slot.error)
    if failed and state.exit_if_pinned_fails:
        os._exit(2)


def _add_middleware(app: FastAPI, state: ServerState) -> None:
    """Outermost last. The access log sees every answer; a Host this server does not answer to
    is refused before anything else looks at the request; CORS comes before the key check so
    preflights need no key and a 401 still carries CORS headers; the body cap is checked only
    for requests with a valid key; innermost, the count of requests in flight that a stop waits on."""
    app.add_middleware(DrainingMiddleware, requests=state.requests)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_request_body, timeout=state.read_timeout)
    app.add_middleware(ApiKeyMiddleware, state=state)
    if state.allowed_origins:
        app.add_middleware(LmserveCORSMiddleware, allowed_origins=state.allowed_origins)
    app.add_middleware(HostCheckMiddleware, allowed_hosts=state.allowed_hosts)
    app.add_middleware(AccessMiddleware, sinks=[log_access, state.metrics.request_done])


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 it documents by default (invalid bodies answer 400),
    and with the answers the middleware gives any operation (see _middleware_errors)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                for status in _middleware_errors(path, operation):
                    operation["responses"].setdefault(str(status), {
                        "description": HTTPStatus(status).phrase,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    })
        app.openapi_schema = schema
    return app.openapi_schema


def _middleware_errors(path: str, operation: dict[str, Any]) -> list[int]:
    """What any operation may answer before (or around) its route: 403 for a Host not served,
    401 without a valid key (where keys are checked), 400 for parameters or a body that do not
    validate, 408 and 413 for a body too slow or too large, 500 for a failure."""
    statuses = [403, 500] + ([] if path in PUBLIC_PATHS else [401])
    if operation.get("parameters"):
        statuses.append(400)
    if "requestBody" in operation:
        statuses += [400, 408, 413]
    return statuses
