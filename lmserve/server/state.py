"""What the routes share: the served models' names, the engines once loaded, the API keys."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from lmserve.server.errors import APIError
from lmserve.server.middleware.limits import DEFAULT_MAX_REQUEST_BODY
from lmserve.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from lmserve.embeddings.worker import EmbeddingWorker
    from lmserve.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    """Owned by the CLI: it creates this, starts uvicorn, and sets `engine` (and `embedder`) once loaded."""

    model_id: str  # the served model name, e.g. "SmolLM2-135M-Instruct"
    engine: AsyncEngine | None  # None while the model is loading
    api_keys: tuple[str, ...] = ()  # empty: no auth
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY  # bytes; larger bodies answer 413
    metrics: ServerMetrics = field(default_factory=ServerMetrics, repr=False)  # this server's own registry
    created: int = field(default_factory=lambda: int(time.time()))  # unix time for /v1/models
    embedding_model_id: str | None = None  # the served embedding model's name; None: none is served
    embedder: EmbeddingWorker | None = None  # set by the CLI once the embedding model is loaded
    chat_embedding_pooling: str = "mean"  # how /v1/embeddings pools the chat model: "mean" or "last"
    _chat_embedder: EmbeddingWorker | None = field(default=None, init=False, repr=False)  # made on first use

    @property
    def ready(self) -> bool:
        """Every served model is loaded (what /health reports)."""
        return self.engine is not None and (self.embedding_model_id is None or self.embedder is not None)

    @property
    def served_model_ids(self) -> list[str]:
        return [self.model_id] + ([self.embedding_model_id] if self.embedding_model_id else [])

    def engine_for(self, model: str | None) -> AsyncEngine:
        """The engine serving `model` (None means the served one); 400, 404 or 503 otherwise."""
        if model is not None and model == self.embedding_model_id:
            raise APIError(400, f"The model '{model}' is an embedding model; use /v1/embeddings with it.",
                           param="model", code="model_not_supported")
        if model is not None and model != self.model_id:
            raise self._not_found(model)
        if self.engine is None:
            raise _loading()
        return self.engine

    @property
    def default_embedding_model(self) -> str:
        """What /v1/embeddings uses when `model` is missing."""
        return self.embedding_model_id or self.model_id

    def embedder_for(self, model: str | None) -> EmbeddingWorker:
        """The embedding worker for `model`: the embedding model, or the chat model's own hidden
        states (None means default_embedding_model); 404 or 503 otherwise."""
        model = model or self.default_embedding_model
        if model == self.model_id:
            return self._chat_embedder_for(self.engine_for(model))
        if model != self.embedding_model_id:
            raise self._not_found(model)
        if self.embedder is None:
            raise _loading()
        return self.embedder

    def _chat_embedder_for(self, engine: AsyncEngine) -> EmbeddingWorker:
        if self._chat_embedder is None:  # no await in between: the event loop cannot race this
            from lmserve.embeddings.worker import decoder_worker

            self._chat_embedder = decoder_worker(engine, self.chat_embedding_pooling)
        return self._chat_embedder

    def _not_found(self, model: str) -> APIError:
        served = ", ".join(f"'{m}'" for m in self.served_model_ids)
        return APIError(404, f"The model '{model}' does not exist; this server serves {served}.",
                        param="model", code="model_not_found")


def _loading() -> APIError:
    return APIError(503, "The model is still loading; retry shortly.", type="server_error", code="model_loading")


def server_state(request: Request) -> ServerState:
    return request.app.state.lmserve


State = Annotated[ServerState, Depends(server_state)]  # a route parameter: the app's ServerState


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
