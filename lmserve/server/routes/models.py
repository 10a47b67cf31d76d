"""GET /models and /models/{id}: the served chat model, then the embedding model if there is one."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from lmserve.server.errors import APIError
from lmserve.server.protocol import ModelCard, ModelList
from lmserve.server.state import ServerState, State, json_response

router = APIRouter()


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
