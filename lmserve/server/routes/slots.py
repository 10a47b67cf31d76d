"""llama.cpp's slot routes: GET /slots, and POST /slots/{id}?action=save|restore|erase.

A save writes the KV of the slot's last sequence (what the prefix cache still holds of it) to a
file under --slot-save-path; a restore puts a file's KV back into the prefix cache, so the next
request that starts with those tokens reports them as cached_tokens, across restarts too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from starlette.responses import JSONResponse

from lmserve.server.errors import ERROR_RESPONSES, APIError, bad_request
from lmserve.server.protocol import ErrorResponse, SlotAction
from lmserve.server.state import ServerState, State

# 501: slots are not served (--no-slots), or not saved (no --slot-save-path)
router = APIRouter(tags=["llama.cpp"], responses=ERROR_RESPONSES | {501: {"model": ErrorResponse}})


@router.get("/slots")
async def get_slots(state: State, model: str | None = None, fail_on_no_slot: int = 0) -> JSONResponse:
    """Every slot of the chat model (`?model=` with several), in llama.cpp's shape."""
    _check_enabled(state)
    lease = await state.chat_model(model)
    lease.release()
    slots = state.slot_table(lease).describe()
    if fail_on_no_slot and all(slot["is_processing"] for slot in slots):
        raise APIError(503, "no slot is free", type="server_error", code="unavailable")
    return JSONResponse(slots)


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: int, state: State, action: Literal["save", "restore", "erase"],
                      body: SlotAction | None = None, model: str | None = None) -> JSONResponse:
    _check_enabled(state)
    body = body or SlotAction()
    lease = await state.chat_model(model)
    try:
        table = state.slot_table(lease)
        try:
            slot = table.get(id_slot)
        except IndexError as exc:
            raise bad_request(str(exc), param="id_slot") from None
        async with slot.lock:  # a running sequence finishes first, as llama.cpp waits for it
            return JSONResponse(await _act(action, slot, body, state, lease.model.engine))
    finally:
        lease.release()


async def _act(action: str, slot, body: SlotAction, state: ServerState, engine) -> dict:
    started = time.perf_counter()
    if action == "erase":
        return {"id_slot": slot.id, "n_erased": await engine.forget_prefix(slot.token_ids)}
    path = _slot_file(state, body.filename)
    if action == "save":
        saved = await engine.save_prefix(slot.token_ids, path)
        return {"id_slot": slot.id, "filename": body.filename, "n_saved": saved,
                "n_written": path.stat().st_size if path.exists() else 0,
                "timings": {"save_ms": (time.perf_counter() - started) * 1000}}
    if not path.is_file():
        raise APIError(404, f"no saved slot named {body.filename!r}", param="filename", code="not_found")
    try:
        restored = await engine.restore_prefix(path)
    except ValueError as exc:  # another model's file, or a damaged one
        raise bad_request(f"cannot restore {body.filename!r}: {exc}", param="filename") from None
    return {"id_slot": slot.id, "filename": body.filename, "n_restored": restored, "n_read": path.stat().st_size,
            "timings": {"restore_ms": (time.perf_counter() - started) * 1000}}


def _check_enabled(state: ServerState) -> None:
    if not state.serve_slots:
        raise APIError(501, "This server does not serve slots: it was started with --no-slots.",
                       type="not_supported_error", code="not_supported")


def _slot_file(state: ServerState, filename: str | None) -> Path:
    """The file under --slot-save-path `filename` names; a 400 for any name that would leave it."""
    if state.slot_save_path is None:
        raise APIError(501, "Saving and restoring slots is off; start the server with --slot-save-path DIR.",
                       type="not_supported_error", code="not_supported")
    if not filename:
        raise bad_request("'filename' is required", param="filename")
    if not _plain_file_name(filename):
        raise bad_request(f"invalid filename {filename!r}: a plain file name inside the slot save folder",
                          param="filename")
    return state.slot_save_path / filename


def _plain_file_name(name: str) -> bool:
    """A name that stays inside its folder: no separators, no '.', '..', control characters or
    leading/trailing spaces, at most 255 bytes (llama.cpp's fs_validate_filename)."""
    return (name not in (".", "..") and name == name.strip() and len(name.encode("utf-8", "surrogatepass")) <= 255
            and not any(c in name for c in '/\\:') and all(ord(c) >= 32 and c != "\x7f" for c in name)
            and Path(name).name == name)
