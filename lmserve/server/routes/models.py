"""The catalogue of models: GET /models and /models/{id} with each model's status, and llama.cpp's
router routes POST /models/load and /models/unload."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from lmserve.fleet.fleet import ModelStatus, Slot
from lmserve.server.errors import APIError
from lmserve.server.protocol import ModelAction, ModelActionResult, ModelCard, ModelList, ModelStatusInfo
from lmserve.server.state import ServerState, State, json_response

router = APIRouter()


@router.get("/models", response_model=ModelList)
async def list_models(state: State) -> Response:
    return json_response(ModelList(data=[_model_card(state, slot) for slot in state.fleet.slots()]))


@router.post("/models/load", response_model=ModelActionResult)
async def load_model(body: ModelAction, state: State) -> Response:
    """Load a model now (or wait for the load under way); a model that failed is tried again."""
    _known(state, body.model)
    slot = await state.load_model(body.model)
    return json_response(ModelActionResult(success=slot.status is ModelStatus.LOADED))


@router.post("/models/unload", response_model=ModelActionResult)
async def unload_model(body: ModelAction, state: State) -> Response:
    """Unload a model; its requests in flight may finish first (up to the drain limit)."""
    _known(state, body.model)
    return json_response(ModelActionResult(success=await state.fleet.unload(body.model)))


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: State) -> Response:
    for slot in state.fleet.slots():
        if model_id in slot.entry.names:
            return json_response(_model_card(state, slot))
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


def _known(state: ServerState, name: str) -> None:
    if not any(name in entry.names for entry in state.fleet.catalogue.entries()):
        known = ", ".join(f"'{e.id}'" for e in state.fleet.catalogue.entries())
        raise APIError(404, f"The model '{name}' does not exist; this server serves {known}.", param="model",
                       code="model_not_found")


def _model_card(state: ServerState, slot: Slot) -> ModelCard:
    loaded = slot.status is ModelStatus.LOADED
    return ModelCard(id=slot.entry.id, created=state.created, kind=slot.entry.kind, aliases=list(slot.entry.aliases),
                     max_model_len=slot.model.max_model_len if loaded else None,
                     status=ModelStatusInfo(value=slot.status.value, error=slot.error, progress=_progress(slot)))


def _progress(slot: Slot) -> dict[str, int] | None:
    if slot.status is not ModelStatus.DOWNLOADING or slot.progress is None:
        return None
    done, total = slot.progress
    return {"done": done, "total": total}
