"""The ASGI app: middleware around the routes, OpenAI-shaped errors, the OpenAPI schema.

One chat completion, hop by hop:

1. middleware/: access.py opens the request's access record (outermost), cors.py answers
   browser preflights, auth.py checks the API key, limits.py caps the body size.
2. routes/generation.py: FastAPI validates the body against protocol.py (a bad one is a 400
   from errors.py); state.py gives the engine serving the requested model.
3. requests/plan.py turns the request into a GenerationPlan: the prompt from
   requests/chat_prompt.py, a grammar from requests/tools.py or requests/constraints.py, one
   SamplingParams per choice.
4. The engine runs each choice (AsyncEngine.generate); responses/fanout.py merges their outputs.
5. responses/json_body.py answers one JSON body, or responses/event_stream.py streams SSE
   chunks; lmserve/parsing/reply.py splits the reply into reasoning, content and tool calls.

Every route exists under /v1 (OpenAI) and without the prefix (as llama.cpp offers them), except
/health, /props and /metrics, which are served at the root only.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lmserve.server.errors import ERROR_RESPONSES, install_error_handlers
from lmserve.server.middleware.access import AccessMiddleware, log_access
from lmserve.server.middleware.auth import ApiKeyMiddleware
from lmserve.server.middleware.cors import LmserveCORSMiddleware
from lmserve.server.middleware.limits import BodyLimitMiddleware
from lmserve.server.routes import embeddings, generation, models, ops
from lmserve.server.state import ServerState

# Mounted with and without /v1, in this order (it is the order of the OpenAPI schema's paths).
PREFIXED_ROUTERS = (models.router, generation.router, embeddings.router, ops.token_router)


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app serving `state`; the caller owns loading the engine into it."""
    app = FastAPI(title="lmserve", summary="Local LLMs behind the OpenAI API")
    app.state.lmserve = state
    install_error_handlers(app)
    _add_middleware(app, state)
    for router in PREFIXED_ROUTERS:
        app.include_router(router, prefix="/v1", responses=ERROR_RESPONSES)
        app.include_router(router, include_in_schema=False)  # llama.cpp-style paths, same handlers
    app.include_router(ops.server_router)
    app.openapi = lambda: _openapi_schema(app)  # type: ignore[method-assign]
    return app


def _add_middleware(app: FastAPI, state: ServerState) -> None:
    """Outermost last. The access log sees every answer; CORS comes before the key check so
    preflights need no key and a 401 still carries CORS headers; the body cap is checked only
    for requests with a valid key."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_request_body)
    app.add_middleware(ApiKeyMiddleware, state=state)
    if state.allowed_origins:
        app.add_middleware(LmserveCORSMiddleware, allowed_origins=state.allowed_origins)
    app.add_middleware(AccessMiddleware, sinks=[log_access, state.metrics.request_done])


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 it documents by default: invalid bodies answer 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema
