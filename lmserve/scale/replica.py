"""One replica of a chat model on Ray Serve: an engine of its own, driven by the ingress.

The ingress (lmserve's own app, scale/application.py) turns HTTP requests into token ids and
SamplingParams, as it does in one process, and calls `generate` here through a deployment
handle; the outputs go back to the ingress's `deliver`, a step's worth of every request at a
time (mailbox.py), with this replica's load, which the ingress reports as the model's. The engine is built as the server builds one (fleet/models.py), so downloads, `preload`
and the dtype rules are the same.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from typing import Any

from lmserve.config import EmbeddingConfig, EngineConfig
from lmserve.engine.step_types import StepStats
from lmserve.fleet.catalogue import ModelEntry
from lmserve.request import SamplingParams
from lmserve.scale.mailbox import Batch, Outbox

_STOPPING = "the replica serving this request is stopping; retry the request"


@dataclass(frozen=True, kw_only=True)
class ReplicaLoad:
    """A replica's engine load as of one of its outputs (engine.EngineLoad, with whose it is)."""

    model: str
    replica: str
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int


@dataclass(frozen=True, kw_only=True)
class EngineDescription:
    """What the ingress needs of a model it does not load: enough to tokenize, render templates,
    compile constraints and size its queues."""

    config: EngineConfig
    tokenizer: object  # text.tokenizer.Tokenizer
    vocab_size: int
    max_model_len: int
    kv_block_bytes: int
    num_kv_blocks: int
    weights_bytes: int


class EngineReplica:
    """A Ray Serve deployment class (scale/application.py makes it one per chat model)."""

    def __init__(self, defaults: EngineConfig, entry: ModelEntry, ingress: str, ingress_app: str):
        """`ingress`: the name of the deployment whose `deliver` takes this replica's outputs, in
        the application `ingress_app`."""
        from lmserve.fleet.models import model_loader

        self._stats = StepStatsQueue()
        self._model = model_loader(defaults, EmbeddingConfig("", ""), metrics=self._stats)(entry)
        self._model_id = entry.id
        self._replica = _replica_name()
        self._ingress_name, self._ingress_app = ingress, ingress_app
        self._ingress: Any = None  # its deployment handle, made on first use
        self._outbox = Outbox(self._deliver)

    def describe(self) -> EngineDescription:
        engine = self._model.engine
        return EngineDescription(config=engine.config, tokenizer=engine.tokenizer,
                                 vocab_size=engine.grammar.vocab_size, max_model_len=engine.max_model_len,
                                 kv_block_bytes=engine.kv_block_bytes, num_kv_blocks=engine.snapshot()["num_kv_blocks"],
                                 weights_bytes=self._model.weights_bytes)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> str:
        """Run the request; its outputs go to the ingress in the batches mailbox.py describes.
        Returns (this replica's id) once its last output has been delivered. Cancelled by the
        ingress (its client went away), the engine aborts the request."""
        async for output in self._model.engine.generate(request_id, prompt_ids, params):
            self._outbox.post(request_id, [output])
        await self._outbox.flushed()
        return self._replica

    async def _deliver(self, batch: Batch) -> None:
        if self._ingress is None:
            from ray import serve

            self._ingress = serve.get_deployment_handle(self._ingress_name, app_name=self._ingress_app)
        await self._ingress.deliver.remote(batch, self.load(), self._stats.take())

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(model=self._model_id, replica=self._replica, **self._model.engine.snapshot())

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine has stopped is replaced."""
        if not self._model.engine.is_running:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        model = getattr(self, "_model", None)
        if model is not None:
            model.close(_STOPPING)


class StepStatsQueue:
    """The engine's step stats since the last batch went to the ingress, which feeds them to
    /metrics (step times, tokens a step, prefix-cache hits, preemptions, drafts). It is what
    fleet/models.model_loader takes as `metrics`: the engine's observer, told on its thread."""

    def __init__(self) -> None:
        self._pending: collections.deque[StepStats] = collections.deque()

    def observer(self, model: str) -> StepStatsQueue:
        return self

    def request_added(self, request_id: str, now: float) -> None:
        pass

    def request_aborted(self, request_id: str) -> None:
        pass

    def step_done(self, stats: StepStats | None, outputs: list, now: float) -> None:
        if stats is not None:
            self._pending.append(stats)

    def take(self) -> list[StepStats]:
        """Every stats recorded since the last take (popleft is atomic: the engine thread may append)."""
        taken = []
        while self._pending:
            taken.append(self._pending.popleft())
        return taken


def _replica_name() -> str:
    """This replica's id as Ray Serve names it (its unique id), or "local" outside Ray Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - no replica context: built directly (tests, one process)
        return "local"


def load_fields(load: ReplicaLoad) -> dict[str, int]:
    """The load as AsyncEngine.snapshot() reports one."""
    return {name: value for name, value in dataclasses.asdict(load).items() if name not in ("model", "replica")}
