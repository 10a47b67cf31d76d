"""Engine output -> OpenAI Responses API objects: the output items, the Response, and its typed
stream of events.

One OutputItems builder serves both answers: a stream feeds it each parsed delta and sends the
events it returns; a whole answer feeds it the whole parsed reply at once. So a streamed response
and a whole one always hold the same items. Items follow the reply's order: reasoning, then the
message, then function calls; an item is closed (its .done events) when the next one opens or
the reply ends, so every item added is done before `response.completed`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmserve.parsing import ReplyParser
from lmserve.parsing.events import ToolCallDelta
from lmserve.parsing.reply import ReplyDelta
from lmserve.request import FinishReason
from lmserve.server.errors import APIError, internal_error
from lmserve.server.protocol.responses_api import ResponsesRequest
from lmserve.server.requests.plan import GenerationPlan
from lmserve.server.requests.responses_input import new_id
from lmserve.server.responses.choices import ChoiceResult, new_results, recorded_outputs
from lmserve.server.responses.logprobs import response_logprobs

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.text.tokenizer import ChatTokenizer

Event = dict[str, Any]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseContext:
    """What a response says about itself besides its output."""

    id: str
    created_at: int
    model: str
    body: ResponsesRequest
    conversation: str | None = None  # the conversation it continues and adds to


class OutputItems:
    """The response's output items, built from parsed reply deltas; each call returns the events
    that tell a stream what changed (without sequence numbers)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item still growing
        self._text = ""  # its text (message, reasoning) or arguments (function call)
        self._calls: dict[int, dict[str, Any]] = {}  # tool call index -> its item
        self._logprobs: list[dict[str, Any]] = []  # the open message's, when asked for
        self._pending: list[dict[str, Any]] = []  # tokens whose text has not shown yet (part of a character)

    def feed(self, delta: ReplyDelta, logprobs: list[dict[str, Any]] | None = None) -> list[Event]:
        events = []
        if delta.reasoning:
            events += self._grow_text("reasoning", delta.reasoning)
        if delta.content:
            events += self._grow_text("message", delta.content, self._pending + (logprobs or []))
            self._pending = []
        elif logprobs:
            self._pending += logprobs
        for call in delta.tool_calls:
            events += self._grow_call(call)
        return events

    def finish(self) -> list[Event]:
        """Close the last item; a reply with nothing in it still answers one (empty) message. Tokens
        that showed no text (a stop string's) count in the open message's logprobs, as in a whole reply."""
        events = [] if self.items else self._add("message")
        if self._open is not None and self._open["type"] == "message":
            self._logprobs += self._pending
        self._pending = []
        return events + self._close()

    def _grow_text(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[Event]:
        events = [] if self._open is not None and self._open["type"] == kind else self._close() + self._add(kind)
        self._text += text
        self._logprobs += logprobs or []
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": logprobs} if kind == "message" else {}
        return events + [self._event(name, content_index=0, delta=text, **extra)]

    def _grow_call(self, call: ToolCallDelta) -> list[Event]:
        events = []
        if call.index not in self._calls:
            events = self._close()
            item = {"type": "function_call", "id": new_id("fc"), "call_id": call.id or new_id("call"),
                    "name": call.name or "", "arguments": "", "status": "in_progress"}
            self._calls[call.index] = item
            events += self._open_item(item)
        if call.arguments:
            self._text += call.arguments
            events.append(self._event("response.function_call_arguments.delta", delta=call.arguments))
        return events

    def _add(self, kind: str) -> list[Event]:
        if kind == "message":
            item = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        return self._open_item(item) + [self._event("response.content_part.added", content_index=0, part=part)]

    def _open_item(self, item: dict[str, Any]) -> list[Event]:
        self._open, self._text = item, ""
        self.items.append(item)
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": dict(item)}]

    def _close(self) -> list[Event]:
        item = self._open
        if item is None:
            return []
        events = []
        if item["type"] == "function_call":
            item["arguments"] = self._text
            events.append(self._event("response.function_call_arguments.done", arguments=self._text, name=item["name"]))
        else:
            message = item["type"] == "message"
            part = ({"type": "output_text", "text": self._text, "annotations": [], "logprobs": self._logprobs}
                    if message else {"type": "reasoning_text", "text": self._text})
            item["content"] = [part]
            done = "response.output_text.done" if message else "response.reasoning_text.done"
            events.append(self._event(done, content_index=0, text=self._text,
                                      **({"logprobs": self._logprobs} if message else {})))
            events.append(self._event("response.content_part.done", content_index=0, part=dict(part)))
        item["status"] = "completed"
        events.append({"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": dict(item)})
        self._open, self._text, self._logprobs = None, "", []
        return events

    def _event(self, kind: str, **fields: Any) -> Event:
        return {"type": kind, "item_id": self._open["id"], "output_index": len(self.items) - 1, **fields}


def response_object(ctx: ResponseContext, status: str, output: list[dict[str, Any]],
                    usage: dict[str, Any] | None = None, incomplete: str | None = None,
                    error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Response in OpenAI's shape."""
    body = ctx.body
    return {
        "id": ctx.id, "object": "response", "created_at": ctx.created_at, "status": status, "error": error,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": ctx.model,
        "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "store": body.store, "temperature": body.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "top_p": body.top_p,
        "truncation": body.truncation or "disabled", "usage": usage, "user": body.user, "metadata": body.metadata or {},
        "conversation": {"id": ctx.conversation} if ctx.conversation is not None else None,
    }


def item_page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> dict[str, Any]:
    """One page of a list of items (oldest first in `items`), in OpenAI's list shape: `order`
    "asc" or "desc", starting after the item whose id is `after`."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise APIError(400, f"no item {after!r} in this list", param="after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}


def usage_of(plan: GenerationPlan, result: ChoiceResult) -> dict[str, Any]:
    num_input = len(plan.prompts[0])
    return {"input_tokens": num_input, "input_tokens_details": {"cached_tokens": result.num_cached_tokens},
            "output_tokens": result.num_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": num_input + result.num_tokens}


def finished_response(ctx: ResponseContext, plan: GenerationPlan, result: ChoiceResult,
                      items: list[dict[str, Any]]) -> dict[str, Any]:
    """The Response once its one choice has ended: completed, or incomplete at max_output_tokens."""
    cut = result.finish_reason == FinishReason.LENGTH
    return response_object(ctx, "incomplete" if cut else "completed", items, usage_of(plan, result),
                           incomplete="max_output_tokens" if cut else None)


def whole_output(plan: GenerationPlan, result: ChoiceResult, tokenizer: ChatTokenizer) -> list[dict[str, Any]]:
    """The output items of a whole reply, built as a stream would build them."""
    items = OutputItems()
    logprobs = response_logprobs(tokenizer, result.logprobs) if plan.want_logprobs else None
    items.feed(_parsed(result.text, final=True, truncated=result.finish_reason == FinishReason.LENGTH,
                       parser=ReplyParser(plan.reply) if plan.reply else None), logprobs)
    items.finish()
    return items.items


def _parsed(text: str, final: bool, truncated: bool, parser: ReplyParser | None) -> ReplyDelta:
    if parser is None:
        return ReplyDelta(content=text)
    return parser.feed(text, final=final, truncated=truncated)


def _logged(exc: Exception) -> APIError:
    """An unexpected error, logged under an id the client gets."""
    error_id = uuid.uuid4().hex
    logger.error("error while streaming a response (error id %s)", error_id, exc_info=exc)
    return internal_error(f"error id {error_id}")


async def response_events(engine: AsyncEngine, plan: GenerationPlan, ctx: ResponseContext,
                          on_finished: Callable[[dict[str, Any]], Any]) -> AsyncIterator[str]:
    """The typed SSE events of one response, in OpenAI's order; `on_finished(response)` runs (and
    is awaited) before the last event, so a stored response can be read once the client has it.
    An error after the start ends the stream with an `error` event and `response.failed`."""
    number = iter(range(1 << 62))

    def frame(event: Event) -> str:
        event = {**event, "sequence_number": next(number)}
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    yield frame({"type": "response.created", "response": response_object(ctx, "in_progress", [])})
    yield frame({"type": "response.in_progress", "response": response_object(ctx, "in_progress", [])})
    items, results = OutputItems(), new_results(plan)
    parser = ReplyParser(plan.reply) if plan.reply else None
    try:
        async with aclosing(recorded_outputs(engine, plan, results)) as outputs:
            async for _, output in outputs:
                delta = _parsed(output.text_delta, final=output.finish_reason is not None,
                                truncated=output.finish_reason == FinishReason.LENGTH, parser=parser)
                logprobs = (response_logprobs(engine.tokenizer, output.new_logprobs)
                            if plan.want_logprobs and output.new_logprobs else None)
                for event in items.feed(delta, logprobs):
                    yield frame(event)
    except Exception as exc:  # noqa: BLE001 - the stream has begun: the error is its last events
        error = exc if isinstance(exc, APIError) else _logged(exc)
        code = error.code or error.type
        yield frame({"type": "error", "code": code, "message": error.message, "param": error.param})
        failed = response_object(ctx, "failed", items.items, error={"code": code, "message": error.message})
        yield frame({"type": "response.failed", "response": failed})
        return
    for event in items.finish():
        yield frame(event)
    response = finished_response(ctx, plan, results[plan.choices[0].index], items.items)
    await on_finished(response)
    name = "response.completed" if response["status"] == "completed" else "response.incomplete"
    yield frame({"type": name, "response": response})
