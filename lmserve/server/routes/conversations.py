"""OpenAI's Conversations API on the server's store: create, retrieve, update (metadata), delete a
conversation; list, add, retrieve and delete its items. A response made with `conversation`
starts from its items and adds its input and output to them (routes/responses.py).

`GET /v1/conversations` (the owner's conversations, newest first) is lmserve's own addition, for
a client that lists them, as the web page does; OpenAI's API has no list.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from lmserve.server.errors import APIError
from lmserve.server.middleware.auth import owner_of
from lmserve.server.requests.responses_input import input_items, new_id
from lmserve.server.responses.responses_api import item_page
from lmserve.server.state import ServerState, State
from lmserve.store.conversations import Conversation

router = APIRouter()  # served under /v1

MAX_NEW_ITEMS = 20  # items one create or add may carry, as OpenAI's API allows


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class NewConversation(_Body):
    items: list[dict[str, Any]] | None = Field(None, max_length=MAX_NEW_ITEMS)
    metadata: dict[str, str] | None = None


class ConversationUpdate(_Body):
    metadata: dict[str, str]


class NewItems(_Body):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_NEW_ITEMS)


@router.post("/conversations")
async def create_conversation(body: NewConversation, request: Request, state: State) -> JSONResponse:
    items = input_items(body.items or [], field="items")
    conversation = Conversation(new_id("conv"), int(time.time()), body.metadata or {})
    await anyio.to_thread.run_sync(state.store.create_conversation, owner_of(request, state), conversation, items)
    return JSONResponse(conversation.to_json())


@router.get("/conversations")
async def list_conversations(request: Request, state: State) -> JSONResponse:
    conversations = await anyio.to_thread.run_sync(state.store.list_conversations, owner_of(request, state))
    return JSONResponse({"object": "list", "data": [c.to_json() for c in conversations]})


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request, state: State) -> JSONResponse:
    return JSONResponse((await _conversation(conversation_id, request, state)).to_json())


@router.post("/conversations/{conversation_id}")
async def update_conversation(conversation_id: str, body: ConversationUpdate, request: Request,
                              state: State) -> JSONResponse:
    owner = owner_of(request, state)
    if not await anyio.to_thread.run_sync(state.store.update_conversation, owner, conversation_id, body.metadata):
        raise not_found(conversation_id)
    return JSONResponse((await _conversation(conversation_id, request, state)).to_json())


@router.delete("/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request, state: State) -> JSONResponse:
    if not await anyio.to_thread.run_sync(state.store.delete_conversation, owner_of(request, state), conversation_id):
        raise not_found(conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@router.post("/conversations/{conversation_id}/items")
async def add_items(conversation_id: str, body: NewItems, request: Request, state: State) -> JSONResponse:
    items = input_items(body.items, field="items")
    if not await anyio.to_thread.run_sync(state.store.add_items, owner_of(request, state), conversation_id, items):
        raise not_found(conversation_id)
    return JSONResponse(item_page(items, limit=len(items), order="asc", after=None))


@router.get("/conversations/{conversation_id}/items")
async def list_items(conversation_id: str, request: Request, state: State,
                     limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                     after: str | None = None) -> JSONResponse:
    return JSONResponse(item_page(await _items(conversation_id, request, state), limit, order, after))


@router.get("/conversations/{conversation_id}/items/{item_id}")
async def get_item(conversation_id: str, item_id: str, request: Request, state: State) -> JSONResponse:
    for item in await _items(conversation_id, request, state):
        if item.get("id") == item_id:
            return JSONResponse(item)
    raise APIError(404, f"No item found with id '{item_id}'.", param="item_id", code="not_found")


@router.delete("/conversations/{conversation_id}/items/{item_id}")
async def delete_item(conversation_id: str, item_id: str, request: Request, state: State) -> JSONResponse:
    owner = owner_of(request, state)
    if not await anyio.to_thread.run_sync(state.store.delete_item, owner, conversation_id, item_id):
        await _conversation(conversation_id, request, state)  # a 404 for the conversation first
        raise APIError(404, f"No item found with id '{item_id}'.", param="item_id", code="not_found")
    return JSONResponse((await _conversation(conversation_id, request, state)).to_json())


async def _conversation(conversation_id: str, request: Request, state: ServerState) -> Conversation:
    found = await anyio.to_thread.run_sync(state.store.get_conversation, owner_of(request, state), conversation_id)
    if found is None:
        raise not_found(conversation_id)
    return found


async def _items(conversation_id: str, request: Request, state: ServerState) -> list[dict[str, Any]]:
    items = await anyio.to_thread.run_sync(state.store.items, owner_of(request, state), conversation_id)
    if items is None:
        raise not_found(conversation_id)
    return items


def not_found(conversation_id: str) -> APIError:
    return APIError(404, f"No conversation found with id '{conversation_id}'.", code="not_found")
