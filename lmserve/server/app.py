"""The HTTP routes. Validation lives in protocol.py, conversion in convert.py, streaming in sse.py.

Every route exists under /v1 (OpenAI) and without the prefix (as llama.cpp offers them).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import JSONResponse, Response

from lmserve.server import convert, results, sse
from lmserve.server.auth import ApiKeyMiddleware
from lmserve.server.errors import APIError, install_error_handlers
from lmserve.server.fanout import until_disconnected
from lmserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from lmserve.server.state import ServerState

# A client that hung up gets no answer; 499 is what the access log shows.
CLIENT_CLOSED_REQUEST = 499

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 500, 503)
}

# Generation routes answer JSON, or SSE chunks when the request says "stream": true.
STREAMABLE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

router = APIRouter()


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app serving `state`; the caller owns loading the engine into it."""
    app = FastAPI(title="lmserve", summary="Local LLMs behind the OpenAI API")
    app.state.lmserve = state
    install_error_handlers(app)
    app.add_middleware(ApiKeyMiddleware, state=state)
    app.include_router(router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(router, include_in_schema=False)  # llama.cpp-style paths, same handlers
    app.add_api_route("/health", health, methods=["GET"], tags=["server"])
    app.openapi = lambda: _openapi_schema(app)  # type: ignore[method-assign]
    return app


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without the 422 it documents by default: invalid bodies answer 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation["responses"].pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def server_state(request: Request) -> ServerState:
    return request.app.state.lmserve


State = Annotated[ServerState, Depends(server_state)]


def json_response(body: Any) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def health(state: State) -> JSONResponse:
    if state.engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", **state.engine.snapshot()})


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> Response:
    return json_response(ModelList(data=[_model_card(state)]))


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: State) -> Response:
    if model_id != state.model_id:
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return json_response(_model_card(state))


def _model_card(state: ServerState) -> ModelCard:
    max_model_len = state.engine.max_model_len if state.engine is not None else None
    return ModelCard(id=state.model_id, created=state.created, max_model_len=max_model_len)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMABLE)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    return await _generate(body, request, state, "chatcmpl", convert.chat_plan, sse.chat_events,
                           results.chat_response)


@router.post("/completions", response_model=CompletionResponse, responses=STREAMABLE)
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    return await _generate(body, request, state, "cmpl", convert.completion_plan, sse.completion_events,
                           results.completion_response)


async def _generate(body, request: Request, state: ServerState, id_prefix: str, make_plan, stream_events,
                    make_response) -> Response:
    """The shared shape of both generation routes: plan, then stream SSE or gather one response."""
    engine = state.engine_for(body.model)
    meta = results.ResponseMeta(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), state.model_id)
    plan = make_plan(body, meta.id, engine.tokenizer, engine.max_model_len)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStreamResponse(sse.with_done(stream_events(engine, plan, meta, include_usage)))
    gathered = await until_disconnected(request.receive, results.collect_results(engine, plan))
    if gathered is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return json_response(make_response(meta, plan, gathered, engine.tokenizer))
