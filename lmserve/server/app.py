"""The HTTP routes. Validation lives in protocol.py, conversion in convert.py, streaming in sse.py.

Every route exists under /v1 (OpenAI) and without the prefix (as llama.cpp offers them).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import JSONResponse, Response

from lmserve.server import convert, embeddings, ops, results, sse
from lmserve.server.access import (
    CLIENT_CLOSED_REQUEST,
    AccessMiddleware,
    TokenCountingEngine,
    access_record,
    log_access,
)
from lmserve.server.auth import ApiKeyMiddleware
from lmserve.server.cors import LmserveCORSMiddleware
from lmserve.server.errors import APIError, install_error_handlers
from lmserve.server.fanout import until_disconnected
from lmserve.server.limits import BodyLimitMiddleware
from lmserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from lmserve.server.state import ServerState, State, json_response

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
    _add_middleware(app, state)
    app.include_router(router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(router, include_in_schema=False)  # llama.cpp-style paths, same handlers
    app.include_router(ops.token_router, prefix="/v1", responses=ERROR_RESPONSES)
    app.include_router(ops.token_router, include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], tags=["server"])
    app.add_api_route("/props", ops.props, methods=["GET"], tags=["server"], responses=ERROR_RESPONSES)
    app.add_api_route("/metrics", ops.metrics, methods=["GET"], tags=["server"])
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


async def health(state: State) -> JSONResponse:
    if not state.ready:  # 200 only once every served model (chat and embedding) can answer
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ok", **state.engine.snapshot()})


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> Response:
    return json_response(ModelList(data=_model_cards(state)))


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: State) -> Response:
    for card in _model_cards(state):
        if card.id == model_id:
            return json_response(card)
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


def _model_cards(state: ServerState) -> list[ModelCard]:
    """The chat model first, then the embedding model if one is served."""
    max_model_len = state.engine.max_model_len if state.engine is not None else None
    cards = [ModelCard(id=state.model_id, created=state.created, max_model_len=max_model_len)]
    if state.embedding_model_id is not None:
        max_input = state.embedder.embedder.max_input_tokens if state.embedder is not None else None
        cards.append(ModelCard(id=state.embedding_model_id, created=state.created, max_model_len=max_input,
                               kind="embedding"))
    return cards


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
    # In a worker thread: compiling a constraint can take seconds (a long maxLength), and the
    # event loop must keep serving the other requests' streams meanwhile.
    plan = await anyio.to_thread.run_sync(make_plan, body, meta.id, engine.tokenizer, engine.max_model_len,
                                          engine.grammar)
    engine = _counting_tokens(engine, request, plan)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStreamResponse(sse.with_done(stream_events(engine, plan, meta, include_usage)))
    gathered = await until_disconnected(request.receive, results.collect_results(engine, plan))
    if gathered is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return json_response(make_response(meta, plan, gathered, engine.tokenizer))


def _counting_tokens(engine, request: Request, plan):
    """Tell the access log this request's token counts; prompts count once each, as in usage."""
    record = access_record(request)
    if record is None:
        return engine
    record.prompt_tokens = sum(len(ids) for ids in plan.prompts)
    record.completion_tokens = 0
    return TokenCountingEngine(engine, record)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def create_embeddings(body: EmbeddingRequest, request: Request, state: State) -> Response:
    worker = state.embedder_for(body.model)
    # In a worker thread, as generation plans are: up to 2048 texts to tokenize.
    batch = await anyio.to_thread.run_sync(embeddings.embedding_inputs, body, worker.embedder)
    vectors = await until_disconnected(request.receive, worker.embed(batch))
    if vectors is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    model_id = body.model or state.default_embedding_model
    num_tokens = sum(len(ids) for ids in batch)
    return json_response(embeddings.embedding_response(model_id, vectors, num_tokens, body.encoding_format))
