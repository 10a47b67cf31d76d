"""What the routes share: the served model's name, the engine once loaded, the API keys."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.server.errors import APIError

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    """Owned by the CLI: it creates this, starts uvicorn, and sets `engine` once loaded."""

    model_id: str  # the served model name, e.g. "SmolLM2-135M-Instruct"
    engine: AsyncEngine | None  # None while the model is loading
    api_keys: tuple[str, ...] = ()  # empty: no auth
    created: int = field(default_factory=lambda: int(time.time()))  # unix time for /v1/models

    def engine_for(self, model: str | None) -> AsyncEngine:
        """The engine serving `model` (None means the served one); 404 or 503 otherwise."""
        if model is not None and model != self.model_id:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_id}'.",
                param="model",
                code="model_not_found",
            )
        if self.engine is None:
            raise APIError(
                503, "The model is still loading; retry shortly.", type="server_error", code="model_loading"
            )
        return self.engine
