"""What the routes share: the fleet of models, the API keys and the server's limits."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from pydantic import BaseModel
from starlette.responses import Response

from lmserve.config import DEFAULT_SHUTDOWN_TIMEOUT
from lmserve.fleet.catalogue import UnknownModel, duration_seconds
from lmserve.fleet.fleet import (
    Fleet,
    FleetBusy,
    FleetClosed,
    Lease,
    ModelFailed,
    ModelStatus,
    ModelTooLarge,
    NotLoaded,
    Slot,
)
from lmserve.server.admission import (
    DEFAULT_QUEUE_TIMEOUT,
    AdmissionGate,
    AdmissionLimits,
    QueueFull,
    QueueTimeout,
    Ticket,
)
from lmserve.server.errors import APIError
from lmserve.server.middleware.draining import InFlight, stop_serving
from lmserve.server.middleware.limits import DEFAULT_MAX_REQUEST_BODY, DEFAULT_READ_TIMEOUT
from lmserve.server.metrics import ServerMetrics
from lmserve.server.slots import SlotTable
from lmserve.store.conversations import ConversationStore

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

# How long a client is told to wait before trying again after a 503 about loading or room, or a
# 429 or 503 about a full queue.
RETRY_AFTER_SECONDS = 5


@dataclass
class ServerState:
    """Owned by the CLI: it builds the fleet of models, creates this and starts uvicorn."""

    fleet: Fleet
    api_keys: tuple[str, ...] = ()  # empty: no auth
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    # Host names served besides IP addresses and localhost (middleware/hosts.py); ("*",): any. The
    # CLI sets them from --host and --allowed-hosts.
    allowed_hosts: tuple[str, ...] = ("*",)
    max_request_body: int = DEFAULT_MAX_REQUEST_BODY  # bytes; larger bodies answer 413
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds for a body, plus its size's share; later: 408
    metrics: ServerMetrics = field(default_factory=ServerMetrics, repr=False)  # this server's own registry
    created: int = field(default_factory=lambda: int(time.time()))  # unix time for /v1/models
    load_timeout: float | None = 600.0  # seconds a request waits for its model to load before a 503; None: no limit
    exit_if_pinned_fails: bool = False  # end the process when a model served from start-up cannot load
    embeddings_only: bool = False  # llama-server's --embedding: the generation routes answer 501
    serve_slots: bool = True  # llama-server's --slots / --no-slots: whether GET /slots is served
    slot_save_path: Path | None = None  # llama-server's --slot-save-path: where slots are saved; None: not at all
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT  # seconds requests in flight get once the server stops
    requests: InFlight = field(default_factory=InFlight, repr=False)  # the HTTP requests being answered
    _stopping: asyncio.Task | None = field(default=None, repr=False)
    max_queued_requests: int | None = None  # sequences waiting per model before a 429; None: sized from its engine
    queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT  # seconds a request waits to start before a 503; None: no limit
    store: ConversationStore = field(default_factory=lambda: ConversationStore(None), repr=False)  # stored responses
    running_sessions: dict[str, str] = field(default_factory=dict, repr=False)  # lmdeploy session -> its request id
    _slot_tables: dict[str, tuple[object, SlotTable]] = field(default_factory=dict, repr=False)
    _gates: dict[str, tuple[object, AdmissionGate]] = field(default_factory=dict, repr=False)

    @property
    def ready(self) -> bool:
        """Every pinned model (the models served from start-up) is loaded: what /health reports."""
        return all(slot.status is ModelStatus.LOADED for slot in self.fleet.slots() if slot.entry.pinned)

    async def stop(self) -> None:
        """Stop serving (middleware/draining.py's stop_serving); every call waits on the one stop."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(stop_serving(self.requests, self.fleet, self.shutdown_timeout))
        await asyncio.shield(self._stopping)

    def loaded_engines(self) -> dict[str, AsyncEngine]:
        """The loaded chat models' engines, by model id."""
        return {slot.entry.id: slot.model.engine for slot in self.fleet.slots()
                if slot.status is ModelStatus.LOADED and slot.entry.kind == "chat"}

    def slot_table(self, lease: Lease) -> SlotTable:
        """The slots of the chat model `lease` holds: new with each load of the model."""
        engine = lease.model.engine
        held = self._slot_tables.get(lease.entry.id)
        if held is None or held[0] is not engine:
            scheduler = engine.config.scheduler
            table = SlotTable(scheduler.max_num_seqs, engine.max_model_len, scheduler.num_speculative_tokens > 0)
            self._slot_tables[lease.entry.id] = held = (engine, table)
        return held[1]

    def admission_gate(self, lease: Lease) -> AdmissionGate:
        """The admission gate of the chat model `lease` holds: new with each load of the model."""
        engine = lease.model.engine
        held = self._gates.get(lease.entry.id)
        if held is None or held[0] is not engine:
            limits = AdmissionLimits.sized_for(max_num_seqs=engine.config.scheduler.max_num_seqs,
                                               num_kv_blocks=engine.snapshot()["num_kv_blocks"],
                                               max_queued=self.max_queued_requests, queue_timeout=self.queue_timeout)
            self._gates[lease.entry.id] = held = (engine, AdmissionGate(limits))
        return held[1]

    def refuse_if_full(self, lease: Lease, client: str) -> None:
        """429 now, before any work, when `lease`'s model's queue would refuse even one sequence."""
        gate = self.admission_gate(lease)
        if gate.refuses(client):
            self.metrics.request_rejected(lease.entry.id, "queue_full")
            raise _queue_full(f"{gate.num_queued} sequences are already waiting (at most {gate.limits.max_queued})")

    async def admit(self, lease: Lease, client: str, num_seqs: int) -> Ticket:
        """A turn on the engine of `lease`'s model for `num_seqs` sequences of `client`'s (see
        admission.py); 429 when its queue is full, 503 when the request waited too long."""
        try:
            return await self.admission_gate(lease).admit(client, num_seqs)
        except QueueFull as exc:
            self.metrics.request_rejected(lease.entry.id, "queue_full")
            raise _queue_full(str(exc)) from None
        except QueueTimeout as exc:
            self.metrics.request_rejected(lease.entry.id, "queue_timeout")
            raise _retry_later(f"The server is busy: the request {exc}. Retry later.", "queue_timeout") from None

    def queued_sequences(self) -> dict[str, int]:
        """Sequences waiting for a turn, by loaded chat model."""
        queued = {}
        for model, engine in self.loaded_engines().items():
            held = self._gates.get(model)
            queued[model] = held[1].num_queued if held is not None and held[0] is engine else 0
        return queued

    async def chat_model(self, name: str | None, keep_alive: str | float | None = None) -> Lease:
        """A lease on the chat model `name` names (loaded first if needed); release it when the
        request is done. `keep_alive` is Ollama's: how long the model stays loaded once idle.
        400 for an embedding model or a bad keep_alive; 404, 409, 500 or 503 as _lease says."""
        lease = await self._lease(name, "chat", keep_alive)
        if lease.entry.kind != "chat":
            lease.release()
            raise APIError(400, f"The model '{lease.entry.id}' is an embedding model; use /v1/embeddings with it.",
                           param="model", code="model_not_supported")
        return lease

    async def embedding_model(self, name: str | None, keep_alive: str | float | None = None) -> Lease:
        """A lease on what /v1/embeddings uses for `name`: an embedding model, or a chat model's
        own hidden states; with `name` missing, the embedding model (or the chat model if there is
        none)."""
        has_embedding = any(entry.kind == "embedding" for entry in self.fleet.catalogue.entries())
        return await self._lease(name, "embedding" if has_embedding else "chat", keep_alive)

    async def load_model(self, name: str) -> Slot:
        """Load `name` now (POST /models/load), with the errors a request for it would get."""
        with _fleet_errors():
            return await asyncio.wait_for(self.fleet.load(name), self.load_timeout)

    async def _lease(self, name: str | None, kind: str, keep_alive: str | float | None = None) -> Lease:
        keep_seconds = _keep_alive_seconds(keep_alive)
        with _fleet_errors():
            lease = await asyncio.wait_for(self.fleet.acquire(name, kind), self.load_timeout)
        if keep_seconds is not None and keep_seconds != math.inf and lease.entry.pinned:
            lease.release()
            raise APIError(400, f"The model '{lease.entry.id}' stays loaded for the server's life; keep_alive "
                                "can only be -1 for it.", param="keep_alive", code="model_pinned")
        lease.keep_alive = keep_seconds
        return lease


def _keep_alive_seconds(value: str | float | None) -> float | None:
    """Ollama's keep_alive as seconds (math.inf: keep loaded), None when not given; 400 if malformed."""
    if value is None:
        return None
    try:
        seconds = duration_seconds(value)
    except ValueError as exc:
        raise APIError(400, f"Invalid value for 'keep_alive': {exc}", param="keep_alive") from None
    return math.inf if seconds is None else seconds


@contextlib.contextmanager
def _fleet_errors():
    """The fleet's refusals as OpenAI-shaped errors."""
    try:
        yield
    except UnknownModel as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None
    except NotLoaded as exc:
        raise APIError(409, str(exc), param="model", code="model_not_loaded") from None
    except ModelFailed as exc:
        raise APIError(500, str(exc), type="server_error", code="model_load_failed") from None
    except FleetClosed:
        raise _retry_later("The server is shutting down; retry the request.", "server_shutting_down") from None
    except FleetBusy as exc:
        raise _retry_later(f"The model cannot be loaded now: {exc}.", "model_capacity") from None
    except ModelTooLarge as exc:
        raise APIError(400, f"{exc}.", param="model", code="model_too_large") from None
    except TimeoutError:
        raise _retry_later("The model is still loading; retry shortly.", "model_loading") from None


def _queue_full(why: str) -> APIError:
    return APIError(429, f"The server is busy: {why}. Retry later.", type="server_error", code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _retry_later(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def server_state(request: Request) -> ServerState:
    return request.app.state.lmserve


State = Annotated[ServerState, Depends(server_state)]  # a route parameter: the app's ServerState


def json_response(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")
