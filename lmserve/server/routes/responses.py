"""OpenAI's Responses API: POST /v1/responses (whole or streamed), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items, on the server's conversation store.

A response runs as the chat request its input makes (requests/responses_input.py), through the
same planning, admission and engine path as /v1/chat/completions. `previous_response_id`
continues from the stored context of that response, so the prompt begins with the tokens of the
earlier turn and the prefix cache serves them. Each API key sees only its own responses; another
key's id is a 404, as a missing one is.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from lmserve.server.errors import APIError
from lmserve.server.middleware.auth import owner_of
from lmserve.server.protocol.responses_api import ResponsesRequest
from lmserve.server.requests.plan import chat_plan
from lmserve.server.requests.responses_input import (
    chat_messages,
    chat_request,
    conversation_id,
    input_items,
    logprobs_plan,
    new_id,
    refuse_unsupported,
    truncating_plan,
    wants_logprobs,
)
from lmserve.server.responses.responses_api import (
    ResponseContext,
    finished_response,
    item_page,
    response_events,
    whole_output,
)
from lmserve.server.routes.generation import STREAMABLE, Shape, generate
from lmserve.server.state import ServerState, State
from lmserve.store.conversations import ConversationStore, StoredResponse

router = APIRouter()  # served under /v1


@router.post("/responses", responses=STREAMABLE)
async def create_response(body: ResponsesRequest, request: Request, state: State) -> Response:
    refuse_unsupported(body)
    owner, store = owner_of(request, state), state.store
    new_items, conversation = input_items(body.input), conversation_id(body)
    context = await _history(body, conversation, store, owner) + new_items
    chat_body = chat_request(body, chat_messages(context, body.instructions))
    return await generate(chat_body, request, state, _shape(body, conversation, context, new_items, store, owner))


async def _history(body: ResponsesRequest, conversation: str | None, store: ConversationStore,
                   owner: str) -> list[dict[str, Any]]:
    """The items before this response's input: its conversation's, or its previous response's context."""
    if conversation is not None:
        items = await anyio.to_thread.run_sync(store.items, owner, conversation)
        if items is None:
            raise APIError(404, f"No conversation found with id '{conversation}'.", param="conversation",
                           code="not_found")
        return items
    if body.previous_response_id is None:
        return []
    previous = await anyio.to_thread.run_sync(store.get_response, owner, body.previous_response_id)
    if previous is None:
        raise not_found(body.previous_response_id, param="previous_response_id")
    return previous.context


def _shape(body: ResponsesRequest, conversation: str | None, context: list[dict[str, Any]],
           new_items: list[dict[str, Any]], store: ConversationStore, owner: str) -> Shape:
    """How this response answers: the Responses shapes over the chat plan, stored at the end (and
    its input and output added to its conversation)."""
    response_id, created_at = new_id("resp"), int(time.time())

    async def save(response: dict[str, Any]) -> None:
        if body.store:
            stored = StoredResponse(response_id, created_at, response, context)
            await anyio.to_thread.run_sync(store.put_response, owner, stored)
        if conversation is not None:
            await anyio.to_thread.run_sync(store.add_items, owner, conversation, new_items + response["output"])

    def labels(meta) -> ResponseContext:
        return ResponseContext(response_id, created_at, meta.model, body, conversation)

    def stream(engine, plan, meta, _chat_body):
        return response_events(engine, plan, labels(meta), save)

    async def whole(meta, plan, results, engine, _chat_body) -> Response:
        result = results[plan.choices[0].index]
        response = finished_response(labels(meta), plan, result, whole_output(plan, result, engine.tokenizer))
        await save(response)
        return JSONResponse(response)

    base_plan = truncating_plan if body.truncation == "auto" else chat_plan

    def plan(*args, **fields):
        built = base_plan(*args, **fields)
        return logprobs_plan(built) if wants_logprobs(body) else built

    return Shape("resp", plan, stream, whole)


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, state: State) -> JSONResponse:
    stored = await _stored(response_id, request, state)
    return JSONResponse(stored.response)


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request, state: State) -> JSONResponse:
    deleted = await anyio.to_thread.run_sync(state.store.delete_response, owner_of(request, state), response_id)
    if not deleted:
        raise not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


@router.get("/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, state: State,
                           limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                           after: str | None = None) -> JSONResponse:
    """The response's whole input context (earlier turns included), newest first by default;
    `after` an item id pages on."""
    stored = await _stored(response_id, request, state)
    return JSONResponse(item_page(stored.input_items, limit, order, after))


async def _stored(response_id: str, request: Request, state: ServerState) -> StoredResponse:
    stored = await anyio.to_thread.run_sync(state.store.get_response, owner_of(request, state), response_id)
    if stored is None:
        raise not_found(response_id)
    return stored


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No response found with id '{response_id}'.", param=param, code="not_found")
