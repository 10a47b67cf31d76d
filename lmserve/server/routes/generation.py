"""POST /chat/completions and /completions: plan the request, run it, answer JSON or SSE."""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import Response

from lmserve.server.errors import CLIENT_CLOSED_REQUEST, APIError
from lmserve.server.middleware.access import TokenCountingEngine, access_record
from lmserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from lmserve.server.requests.plan import chat_plan, completion_plan
from lmserve.server.responses import event_stream, json_body
from lmserve.server.responses.choices import ResponseMeta, collect_results
from lmserve.server.routes.disconnect import until_disconnected
from lmserve.server.state import ServerState, State, json_response

# Generation routes answer JSON, or SSE chunks when the request says "stream": true.
STREAMABLE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}

router = APIRouter()


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMABLE)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    return await _generate(body, request, state, "chatcmpl", chat_plan, event_stream.chat_events,
                           json_body.chat_response)


@router.post("/completions", response_model=CompletionResponse, responses=STREAMABLE)
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    return await _generate(body, request, state, "cmpl", completion_plan, event_stream.completion_events,
                           json_body.completion_response)


async def _generate(body, request: Request, state: ServerState, id_prefix: str, make_plan, stream_events,
                    make_response) -> Response:
    """The shared shape of both generation routes: plan, then stream SSE or gather one response.
    The request holds its model (a lease) until its last byte is sent, so the model is not
    unloaded under it."""
    if state.embeddings_only:
        raise APIError(501, "This server serves embeddings only (it was started with --embedding); use "
                            "/v1/embeddings.", type="not_supported_error", code="embeddings_only")
    lease = await state.chat_model(body.model, body.keep_alive)
    try:
        # A model's default max_tokens is a cap, as llama-server's -n: it ends at the context's end.
        defaulted_max_tokens = "max_tokens" in lease.entry.defaults and not (
            {"max_tokens", "max_completion_tokens"} & body.model_fields_set)
        body = with_model_defaults(body, lease.entry.defaults)
        engine = lease.model.engine
        meta = ResponseMeta(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), lease.entry.id)
        # In a worker thread: compiling a constraint can take seconds (a long maxLength), and the
        # event loop must keep serving the other requests' streams meanwhile.
        plan = await anyio.to_thread.run_sync(partial(make_plan, clip_max_tokens=defaulted_max_tokens), body, meta.id,
                                              engine.tokenizer, engine.max_model_len, engine.grammar)
        engine = _counting_tokens(engine, request, plan)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(engine, plan, meta, include_usage)
            response = event_stream.EventStreamResponse(event_stream.with_done(events), on_close=lease.release)
            lease = None  # the response releases it once the stream ends
            return response
        gathered = await until_disconnected(request.receive, collect_results(engine, plan))
        if gathered is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return json_response(make_response(meta, plan, gathered, engine.tokenizer))
    finally:
        if lease is not None:
            lease.release()


def with_model_defaults(body, defaults: dict[str, Any]):
    """`body` with its model's sampling defaults (--config) for the fields the request left out."""
    missing = {key: value for key, value in defaults.items() if key not in body.model_fields_set}
    return body.model_copy(update=missing) if missing else body


def _counting_tokens(engine, request: Request, plan):
    """Tell the access log this request's token counts; prompts count once each, as in usage."""
    record = access_record(request)
    if record is None:
        return engine
    record.prompt_tokens = sum(len(ids) for ids in plan.prompts)
    record.completion_tokens = 0
    return TokenCountingEngine(engine, record)
