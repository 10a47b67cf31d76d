"""Server-sent events: the chunk streams of chat and text completions.

Framing is `data: {json}\\n\\n` per chunk and `data: [DONE]\\n\\n` at the end. An error after
the stream has started is sent as `data: {"error": {...}}` before [DONE]. Closing the stream
(client gone) closes the engine generators, which aborts their requests.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

from lmserve.parsing import ReplyParser
from lmserve.request import FinishReason, RequestOutput
from lmserve.server.errors import APIError, internal_error
from lmserve.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
)
from lmserve.server.requests.plan import GenerationPlan
from lmserve.server.responses.choices import (
    ResponseMeta,
    chat_finish_name,
    finish_name,
    new_results,
    recorded_outputs,
    timings,
    usage,
)
from lmserve.server.responses.logprobs import chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its event generator, however sending ends.

    Starlette leaves the generator suspended when `send` fails on a dropped connection;
    closing it here aborts the engine requests now rather than at garbage collection.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close  # called once the stream has ended, however it ended

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                self.on_close()


def frame(chunk: BaseModel, include_usage: bool) -> str:
    """One SSE event; chunks carry a `usage` key only when the client asked for usage."""
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`, then [DONE]; an error raised on the way becomes an error event first."""
    async with aclosing(with_errors(events)) as framed:
        async for event in framed:
            yield event
    yield DONE


async def with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """`events`; an error raised on the way becomes a last error event (llama.cpp's native
    streams end there, with no [DONE])."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except APIError as exc:
        yield _error_event(exc)
    except Exception:
        error_id = uuid.uuid4().hex  # the response has begun: this id ties the event to the log line
        logger.exception("error while streaming (error id %s)", error_id)
        yield _error_event(internal_error(f"error id {error_id}"))


def _error_event(error: APIError) -> str:
    return f"data: {json.dumps(error.body(), ensure_ascii=False)}\n\n"


def _chunk_events(chunk_type: type[ChatCompletionChunk] | type[CompletionResponse], meta: ResponseMeta,
                  include_usage: bool) -> Callable[..., str]:
    """`event(choices, **fields)`: one SSE event, a `chunk_type` chunk labelled as `meta` says."""

    def event(choices: list, **fields: object) -> str:
        chunk = chunk_type(id=meta.id, created=meta.created, model=meta.model, choices=choices, **fields)
        return frame(chunk, include_usage)

    return event


# ---------------------------------------------------------------- chat


async def chat_events(
    engine: AsyncEngine, plan: GenerationPlan, meta: ResponseMeta, include_usage: bool, with_timings: bool = False
) -> AsyncIterator[str]:
    """Role chunk per choice, content chunks as produced, a finish chunk per choice, usage.
    `with_timings`: each chunk carries llama.cpp's timings of its choice."""
    event = _chunk_events(ChatCompletionChunk, meta, include_usage)
    for choice in plan.choices:
        yield event([ChatChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))])
    results = new_results(plan)
    parsers = {choice.index: ReplyParser(plan.reply) for choice in plan.choices} if plan.reply else {}
    async with aclosing(recorded_outputs(engine, plan, results)) as outputs:
        async for index, output in outputs:
            for chunk_choice in _chat_choices(engine, plan, index, output, parsers.get(index)):
                yield event([chunk_choice], timings=timings(results[index]) if with_timings else None)
    if include_usage:
        yield event([], usage=usage(plan, results))


def _chat_choices(
    engine: AsyncEngine, plan: GenerationPlan, index: int, output: RequestOutput, parser: ReplyParser | None
) -> list[ChatChunkChoice]:
    choices = []
    logprobs = None
    if plan.want_logprobs and output.new_logprobs:
        logprobs = chat_logprobs(engine.tokenizer, output.new_logprobs)
    delta = _delta(output, parser)
    if delta.content or delta.reasoning_content or delta.tool_calls or logprobs:
        choices.append(ChatChunkChoice(index=index, delta=delta, logprobs=logprobs))
    if output.finish_reason is not None:
        has_calls = parser is not None and parser.num_tool_calls > 0
        reason = chat_finish_name(plan.tools, output.finish_reason, has_calls)
        choices.append(ChatChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason))
    return choices


def _delta(output: RequestOutput, parser: ReplyParser | None) -> DeltaMessage:
    """The output's text as a message delta; through the reply parser when the plan has one."""
    if parser is None:
        return DeltaMessage(content=output.text_delta or None)
    parts = parser.feed(output.text_delta, final=output.finish_reason is not None,
                        truncated=output.finish_reason == FinishReason.LENGTH)
    calls = [DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                           function=DeltaFunction(name=c.name, arguments=c.arguments))
             for c in parts.tool_calls]
    return DeltaMessage(content=parts.content or None, reasoning_content=parts.reasoning or None,
                        tool_calls=calls or None)


# ---------------------------------------------------------------- text completions


async def completion_events(
    engine: AsyncEngine, plan: GenerationPlan, meta: ResponseMeta, include_usage: bool, with_timings: bool = False
) -> AsyncIterator[str]:
    """The echoed prompt (if asked), text chunks as produced, a finish chunk per choice, usage.
    `with_timings`: each chunk carries llama.cpp's timings of its choice."""
    event = _chunk_events(CompletionResponse, meta, include_usage)
    offsets = {}  # choice index -> text offset of its next token, for logprobs
    for choice in plan.choices:
        prefix = plan.echo_texts[choice.prompt_index] if plan.echo_texts else ""
        offsets[choice.index] = len(prefix)
        if prefix:
            yield event([CompletionChoice(index=choice.index, text=prefix)])
    results = new_results(plan)
    async with aclosing(recorded_outputs(engine, plan, results)) as outputs:
        async for index, output in outputs:
            for chunk_choice in _completion_choices(engine, plan, index, output, offsets):
                yield event([chunk_choice], timings=timings(results[index]) if with_timings else None)
    if include_usage:
        yield event([], usage=usage(plan, results))


def _completion_choices(
    engine: AsyncEngine, plan: GenerationPlan, index: int, output: RequestOutput, offsets: dict[int, int]
) -> list[CompletionChoice]:
    choices = []
    logprobs = None
    if plan.want_logprobs and output.new_logprobs:
        logprobs = completion_logprobs(engine.tokenizer, output.new_logprobs, offsets[index])
        offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
    if output.text_delta or logprobs:
        choices.append(CompletionChoice(index=index, text=output.text_delta, logprobs=logprobs))
    if output.finish_reason is not None:
        choices.append(
            CompletionChoice(index=index, text="", finish_reason=finish_name(output.finish_reason))
        )
    return choices
