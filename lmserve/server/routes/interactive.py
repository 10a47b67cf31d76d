"""lmdeploy's POST /v1/chat/interactive: a chat kept on the server by `session_id`, so a client
sends only its new turn.

With `interactive_mode: true` the turn and its reply are added to the session (a conversation in
the server's store, so sessions outlive a restart with --data-dir); with false the turn continues
the session's history if it has one, and then the session ends. An empty prompt with
`request_output_len: 0` and `interactive_mode: false` just ends it; `cancel: true` stops the
session's running request. The answer is lmdeploy's: `text`, `tokens`, `input_tokens`,
`history_tokens`, `finish_reason`; streamed, one such JSON object per line, `text` the new part
(as text/event-stream, as lmdeploy sends it). `request_output_len: 0` generates nothing.
lmdeploy's own defaults apply (temperature 0.8, top_p 0.8, top_k 40).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from lmserve.server.errors import APIError, bad_request
from lmserve.server.middleware.auth import owner_of
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.protocol.requests import Int
from lmserve.server.requests.plan import GenerationPlan, chat_plan
from lmserve.server.requests.responses_input import chat_messages, input_items, message_item
from lmserve.server.responses.choices import ChoiceResult, ResponseMeta, finish_name, new_results, recorded_outputs
from lmserve.server.routes.generation import STREAMABLE, Shape, generate
from lmserve.server.state import ServerState, State
from lmserve.store.conversations import Conversation

router = APIRouter(tags=["lmdeploy"])


class InteractiveRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    prompt: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    session_id: Int = -1
    interactive_mode: bool = False
    stream: bool = False
    stop: str | list[str] | None = None
    request_output_len: Int | None = Field(None, ge=0)
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    top_k: Int = Field(40, ge=0)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cancel: bool = False
    seed: Int | None = None
    min_new_tokens: Int | None = Field(None, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    model: str | None = None
    # declared so a value is refused by name rather than ignored
    image_url: str | list[str] | None = None
    adapter_name: str | None = None


EMPTY = {"text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}


@router.post("/v1/chat/interactive", responses=STREAMABLE)
async def chat_interactive(body: InteractiveRequest, request: Request, state: State) -> Response:
    for name in ("image_url", "adapter_name"):
        if getattr(body, name):
            raise bad_request(f"'{name}' is not supported by lmserve", param=name, code="unsupported_parameter")
    owner = owner_of(request, state)
    session = None if body.session_id == -1 else _session_key(owner, body.session_id)  # -1: a one-off turn
    if body.cancel:
        return await _cancel(body, session, state)
    if body.request_output_len == 0:  # nothing to generate; with an empty prompt outside interactive mode,
        if session is not None and not body.interactive_mode and body.prompt == "":  # the end of a session
            await anyio.to_thread.run_sync(state.store.delete_conversation, owner, session)
            return JSONResponse(EMPTY)
        return JSONResponse({**EMPTY, "finish_reason": "length"})
    found = None if session is None else await anyio.to_thread.run_sync(state.store.get_conversation, owner, session)
    history = await anyio.to_thread.run_sync(state.store.items, owner, session) if found else []
    turn = _Turn(state, owner, session, found, input_items(body.prompt, field="prompt"), body.interactive_mode)
    chat_body = _chat_body(body, chat_messages((history or []) + turn.items, None, field="prompt"))
    try:
        return await generate(chat_body, request, state, turn.shape())
    finally:
        if not body.stream:  # a streamed turn forgets its request when its stream ends
            turn.forget()


class _Turn:
    """One turn of a session: how it answers, and what it leaves in the store when it ends."""

    def __init__(self, state: ServerState, owner: str, session: str | None, found: Conversation | None,
                 items: list[dict[str, Any]], keep: bool):
        self.state, self.owner, self.session, self.found = state, owner, session, found
        self.items, self.keep = items, keep
        self.history_tokens = int(found.metadata.get("tokens", "0")) if found else 0

    def shape(self) -> Shape:
        return Shape("interactive", self._plan, self._stream, self._whole)

    def _plan(self, *args, **fields) -> GenerationPlan:
        plan = chat_plan(*args, **fields)
        if self.session is not None:  # a cancel finds the request here
            self.state.running_sessions[self.session] = plan.choices[0].request_id
        return plan

    async def _whole(self, meta: ResponseMeta, plan: GenerationPlan, results: dict[int, ChoiceResult], _engine,
                     _body) -> Response:
        result = results[plan.choices[0].index]
        await self._finish(plan, result)
        return JSONResponse(self._answer(plan, result, result.text))

    def _stream(self, engine, plan: GenerationPlan, meta: ResponseMeta, _body) -> AsyncIterator[str]:
        return self._lines(engine, plan)

    async def _lines(self, engine, plan: GenerationPlan) -> AsyncIterator[str]:
        """One JSON object per line, each with the new text; an error after the start is a line too."""
        results = new_results(plan)
        result = results[plan.choices[0].index]
        try:
            async with aclosing(recorded_outputs(engine, plan, results)) as outputs:
                async for _, output in outputs:
                    if output.finish_reason is not None:
                        await self._finish(plan, result)
                    yield json.dumps(self._answer(plan, result, output.text_delta)) + "\n"
        except APIError as error:
            yield json.dumps(error.body()) + "\n"
        finally:
            self.forget()

    def _answer(self, plan: GenerationPlan, result: ChoiceResult, text: str) -> dict[str, Any]:
        return {"text": text, "tokens": result.num_tokens, "input_tokens": len(plan.prompts[0]) - self.history_tokens,
                "history_tokens": self.history_tokens, "finish_reason": finish_name(result.finish_reason)}

    async def _finish(self, plan: GenerationPlan, result: ChoiceResult) -> None:
        """Keep the turn in the session (interactive mode), or end the session."""
        self.forget()
        store, owner, session = self.state.store, self.owner, self.session
        if session is None:
            return
        if not self.keep:
            await anyio.to_thread.run_sync(store.delete_conversation, owner, session)
            return
        tokens = {"tokens": str(len(plan.prompts[0]) + result.num_tokens)}
        items = self.items + [message_item("assistant", result.text)]
        if self.found is None:
            await anyio.to_thread.run_sync(store.create_conversation, owner,
                                           Conversation(session, int(time.time()), tokens), items)
            return
        await anyio.to_thread.run_sync(store.update_conversation, owner, session, tokens)
        await anyio.to_thread.run_sync(store.add_items, owner, session, items)

    def forget(self) -> None:
        if self.session is not None:
            self.state.running_sessions.pop(self.session, None)


async def _cancel(body: InteractiveRequest, session: str | None, state: ServerState) -> JSONResponse:
    """Stop the session's running request (its answer ends with an error saying so)."""
    if session is None:
        raise bad_request("please set a session_id to cancel a request", param="session_id")
    request_id = state.running_sessions.get(session)
    if request_id is not None:
        lease = await state.chat_model(body.model)
        try:
            lease.model.engine.abort(request_id)
        finally:
            lease.release()
    return JSONResponse(EMPTY)


def _session_key(owner: str, session_id: int) -> str:
    """The store's conversation id of a session: an owner's session ids are their own."""
    return f"session_{owner[:16] or 'open'}_{session_id}"


def _chat_body(body: InteractiveRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    fields: dict[str, Any] = {
        "model": body.model, "messages": messages, "stream": body.stream, "temperature": body.temperature,
        "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
        "ignore_eos": body.ignore_eos, "skip_special_tokens": body.skip_special_tokens, "seed": body.seed,
    }
    if body.request_output_len:
        fields["max_completion_tokens"] = body.request_output_len
    if body.stop:
        fields["stop"] = body.stop
    if body.min_new_tokens:
        fields["min_tokens"] = body.min_new_tokens
    return ChatCompletionRequest.model_validate(fields, strict=False)
