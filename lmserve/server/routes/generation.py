"""POST /chat/completions and /v1/completions (OpenAI's shapes) and llama.cpp's POST /completion
(its own shape, also at /completions without /v1, as llama.cpp routes it): plan the request,
run it, answer JSON or SSE."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from lmserve.fleet.catalogue import defaults_left_out
from lmserve.sampling.grammar import GrammarCompiler, RequestCompiler
from lmserve.fleet.fleet import Lease
from lmserve.server.admission import SeatedEngine, Ticket
from lmserve.server.errors import CLIENT_CLOSED_REQUEST, APIError, bad_request
from lmserve.server.middleware.access import TokenCountingEngine, access_record
from lmserve.server.middleware.auth import presented_key
from lmserve.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    InfillRequest,
    LlamaCompletionRequest,
)
from lmserve.server.requests.peer_sampling import defaults_for_order
from lmserve.server.requests.plan import (
    GenerationPlan,
    chat_plan,
    chat_prompt_text,
    completion_plan,
    count_chat_tokens,
    infill_plan,
)
from lmserve.server.responses import event_stream, json_body
from lmserve.server.responses.choices import ChoiceResult, ResponseMeta, collect_results, timings
from lmserve.server.responses.llama_native import NativeSettings, native_body, native_events
from lmserve.server.routes.disconnect import until_disconnected
from lmserve.server.slots import SlottedEngine, SlotTable
from lmserve.server.state import ServerState, State, json_response

# Generation routes answer JSON, or SSE chunks when the request says "stream": true; a server
# started with --embedding answers them 501.
STREAMABLE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}},
                                               501: {"model": ErrorResponse, "description": "Not Implemented"}}

router = APIRouter()  # served with and without /v1
v1_router = APIRouter()  # served under /v1 only: without it, /completions is llama.cpp's
llama_router = APIRouter(tags=["llama.cpp"])


@dataclass(frozen=True)
class Shape:
    """How one route answers: its plan, its SSE stream and its whole body."""

    id_prefix: str
    make_plan: Callable[..., GenerationPlan]
    stream: Callable[[Any, GenerationPlan, ResponseMeta, Any], AsyncIterator[str]]  # (engine, plan, meta, body)
    whole: Callable[[ResponseMeta, GenerationPlan, dict[int, ChoiceResult], Any, Any], Awaitable[Response]]


def _openai_stream(events):
    def stream(engine, plan, meta, body):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream.with_done(events(engine, plan, meta, include_usage, body.timings_per_token))
    return stream


def _openai_whole(make_response):
    async def whole(meta, plan, results, engine, body):
        response = make_response(meta, plan, results, engine.tokenizer)
        if body.timings_per_token:
            response.timings = timings(results[plan.choices[0].index])
        return json_response(response)
    return whole


def _native_settings(plan: GenerationPlan, engine, body) -> NativeSettings:
    return NativeSettings(return_tokens=body.return_tokens, timings_per_token=body.timings_per_token,
                          n_ctx=engine.max_model_len, id_slots=engine.id_slots)


def _native_stream(engine, plan, meta, body):
    return event_stream.with_errors(native_events(engine, plan, meta, _native_settings(plan, engine, body)))


async def _native_whole(meta, plan, results, engine, body):
    return JSONResponse(native_body(meta, plan, results, engine.tokenizer, _native_settings(plan, engine, body)))


CHAT = Shape("chatcmpl", chat_plan, _openai_stream(event_stream.chat_events), _openai_whole(json_body.chat_response))
COMPLETION = Shape("cmpl", completion_plan, _openai_stream(event_stream.completion_events),
                   _openai_whole(json_body.completion_response))
NATIVE = Shape("cmpl", completion_plan, _native_stream, _native_whole)
INFILL = Shape("cmpl", infill_plan, _native_stream, _native_whole)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMABLE)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    return await generate(body, request, state, CHAT)


@router.post("/chat/completions/input_tokens")
async def chat_input_tokens(body: ChatCompletionRequest, state: State) -> JSONResponse:
    """llama.cpp's token count of a chat completion body: what its prompt would take."""
    lease = await state.chat_model(body.model, body.keep_alive)
    lease.release()  # a tokenizer outlives its engine's unloading
    count = await anyio.to_thread.run_sync(count_chat_tokens, body, lease.model.engine.tokenizer,
                                           abandon_on_cancel=True)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": count})


@llama_router.post("/apply-template")
async def apply_template(body: ChatCompletionRequest, state: State) -> JSONResponse:
    """llama.cpp's POST /apply-template: the prompt text the chat template makes of a chat body."""
    lease = await state.chat_model(body.model, body.keep_alive)
    lease.release()  # a tokenizer outlives its engine's unloading
    text = await anyio.to_thread.run_sync(chat_prompt_text, body, lease.model.engine.tokenizer, abandon_on_cancel=True)
    return JSONResponse({"prompt": text})


@v1_router.post("/completions", response_model=CompletionResponse, responses=STREAMABLE)
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    return await generate(body, request, state, COMPLETION)


@llama_router.post("/completion", responses=STREAMABLE)
@llama_router.post("/completions", responses=STREAMABLE, include_in_schema=False)
async def llama_completion(body: LlamaCompletionRequest, request: Request, state: State) -> Response:
    """llama.cpp's native completion: its prompt forms and samplers, its answer's shape."""
    return await generate(body, request, state, NATIVE)


@llama_router.post("/infill", responses=STREAMABLE)
async def llama_infill(body: InfillRequest, request: Request, state: State) -> Response:
    """llama.cpp's fill-in-the-middle, for models with FIM tokens; its answer's shape."""
    return await generate(body, request, state, INFILL)


async def generate(body, request: Request, state: ServerState, shape: Shape) -> Response:
    """The shared shape of the generation routes: plan, wait for a turn on the engine, then stream
    SSE or gather one response. The request holds its model (a lease) until its last byte is sent,
    so the model is not unloaded under it, and each of its sequences a seat on the engine (its
    ticket) while it runs."""
    if state.embeddings_only:
        raise APIError(501, "This server serves embeddings only (it was started with --embedding); use "
                            "/v1/embeddings.", type="not_supported_error", code="embeddings_only")
    lease = await state.chat_model(body.model, body.keep_alive)
    ticket = None
    try:
        state.refuse_if_full(lease, client_key(request, state))
        # A model's default max_tokens is a cap, as llama-server's -n: it ends at the context's end.
        defaulted_max_tokens = "max_tokens" in defaults_left_out(lease.entry.defaults, body.model_fields_set)
        body = with_model_defaults(body, lease.entry.defaults)
        engine = lease.model.engine
        meta = ResponseMeta(f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time()), lease.entry.id)
        plan = await _plan(request, partial(shape.make_plan, body, meta.id, engine.tokenizer, engine.max_model_len,
                                            clip_max_tokens=defaulted_max_tokens), engine.grammar)
        if plan is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        ticket = await until_disconnected(request.receive,
                                          state.admit(lease, client_key(request, state), len(plan.choices)))
        if ticket is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        engine = SeatedEngine(_counting_tokens(_slotted(engine, state.slot_table(lease), body.id_slot, plan),
                                               request, plan), ticket)
        if body.stream:
            response = event_stream.EventStreamResponse(shape.stream(engine, plan, meta, body),
                                                        on_close=partial(_release, ticket, lease))
            lease = ticket = None  # the response releases them once the stream ends
            return response
        gathered = await until_disconnected(request.receive, collect_results(engine, plan))
        if gathered is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return await shape.whole(meta, plan, gathered, engine, body)
    finally:
        _release(ticket, lease)


def _release(ticket: Ticket | None, lease: Lease | None) -> None:
    if ticket is not None:
        ticket.release()
    if lease is not None:
        lease.release()


def client_key(request: Request, state: ServerState) -> str:
    """Whose line a request waits in: its API key when the server checks keys, else its address
    (behind a proxy every client has the proxy's)."""
    key = presented_key(request.headers) if state.api_keys else None
    if key is not None:
        return f"key:{key}"
    return f"address:{request.client.host if request.client else ''}"


async def _plan(request: Request, make_plan: Callable[..., GenerationPlan],
                compiler: GrammarCompiler | None) -> GenerationPlan | None:
    """`make_plan(compiler)` in a worker thread, or None if the client disconnects first: compiling a
    constraint can take seconds, and the event loop must keep serving the other requests meanwhile.
    A compile still running when the client leaves is stopped (its worker process killed)."""
    abandoned = threading.Event()
    compiles = None if compiler is None else RequestCompiler(compiler, abandoned)
    try:
        return await until_disconnected(request.receive, anyio.to_thread.run_sync(make_plan, compiles,
                                                                                   abandon_on_cancel=True))
    finally:
        abandoned.set()


def with_model_defaults(body, defaults: dict[str, Any]):
    """`body` with its model's sampling defaults (--config, over the server's) for the settings the
    request left out under every name (a default n_predict does not meet the request's max_tokens),
    squared with the request's own sampler order and penalties."""
    missing = defaults_for_order(defaults_left_out(defaults, body.model_fields_set), body)
    return body.model_copy(update=missing) if missing else body


def _slotted(engine, table: SlotTable, id_slot: int | None, plan: GenerationPlan) -> SlottedEngine:
    """Each sequence runs in a slot; `id_slot` names the one of a single-sequence request."""
    if id_slot is not None and id_slot >= 0:
        if id_slot >= len(table.slots):
            raise bad_request(f"id_slot {id_slot} does not exist: slots are 0 to {len(table.slots) - 1}",
                              param="id_slot")
        if len(plan.choices) > 1:
            raise bad_request("id_slot names one slot, and this request runs several sequences", param="id_slot")
    return SlottedEngine(engine, table, id_slot)


def _counting_tokens(engine, request: Request, plan):
    """Tell the access log this request's token counts; prompts count once each, as in usage."""
    record = access_record(request)
    if record is None:
        return engine
    record.prompt_tokens = sum(len(ids) for ids in plan.prompts)
    record.completion_tokens = 0
    return TokenCountingEngine(engine, record)
