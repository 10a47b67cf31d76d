"""A chat model whose engines run in Ray Serve replicas, seen by the ingress as one engine.

RemoteEngine has AsyncEngine's public face (generate, abort, snapshot, drain, close, and what the
routes read: config, tokenizer, max_model_len, kv_block_bytes, grammar), so every route of the
app works unchanged on top of it: prompts are rendered, tokenized and checked here, and only
token ids and SamplingParams cross to a replica (scale/replica.py), chosen by the prefix-aware
router (scale/ray_router.py).

Faults: a request whose replica dies before its first output is retried on another (Ray Serve
replaces the dead one); once output has streamed, it ends with an ABORT saying so (a 503, or an
error event in a stream), and no other request is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from lmserve.engine.async_engine import EngineObserver, notify, until_empty
from lmserve.engine.step_types import EngineClosed
from lmserve.request import FinishReason, RequestOutput, SamplingParams
from lmserve.scale.mailbox import Mailbox
from lmserve.scale.replica import EngineDescription, ReplicaLoad, load_fields
from lmserve.server.errors import APIError

log = logging.getLogger("lmserve.scale")

DEFAULT_MAX_RETRIES = 3  # tries on other replicas for a request whose replica died before it streamed
RETRY_BACKOFF_SECONDS = 0.5
_NOT_ACCEPTING = "the model is being unloaded; retry the request"
_CANCELLED = "the request was cancelled"


def replica_gone_errors() -> tuple[type[BaseException], ...]:
    """What a deployment handle raises when the replica serving a call died or cannot be reached."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError

    return RayActorError, ActorUnavailableError, BackPressureError


class RemoteEngine:
    def __init__(self, handle: Any, description: EngineDescription, mailbox: Mailbox, *, num_replicas: int = 1,
                 observers: Sequence[EngineObserver] = (), routed: Callable[[str], None] | None = None,
                 stats_observer: Callable[[str], EngineObserver] | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES):
        """`handle`: the model's deployment handle; `description`: what one replica reported;
        `num_replicas`: the most replicas it runs, which the ingress's queues are sized for;
        `routed(replica)`: told which replica each request's first output came from;
        `stats_observer(replica)`: the observer that hears that replica's step stats, the same one
        for as long as the replica runs, whatever engine connects to it (each replica's counters
        run from its own start, and an observer counts their increases)."""
        from lmserve.sampling.grammar import GrammarCompiler

        scheduler = description.config.scheduler
        self.config = dataclasses.replace(description.config, scheduler=dataclasses.replace(
            scheduler, max_num_seqs=scheduler.max_num_seqs * num_replicas))
        self.tokenizer = description.tokenizer
        self.max_model_len = description.max_model_len
        self.kv_block_bytes = description.kv_block_bytes
        self.grammar = GrammarCompiler(description.tokenizer, description.vocab_size,
                                       busy=lambda: bool(self._running))  # replicas decoding, maybe on these cores
        self.model = None  # the weights are in the replicas
        self.weights_bytes = description.weights_bytes  # of one replica
        self._routed = routed if routed is not None else (lambda replica: None)
        self.observers = tuple(observers)
        self.max_retries = max_retries
        self._handle = handle
        self._mailbox = mailbox
        self._stats_observer = stats_observer
        mailbox.on_stats(description.config.served_model_name, self._replica_stats)
        self._blocks_per_replica = description.num_kv_blocks
        self._num_replicas = num_replicas
        self._loads: dict[str, ReplicaLoad] = {}  # each replica's load, as of its last output
        self._running: dict[str, Any] = {}  # request id -> its call to its replica
        self._accepting = True
        self._refusal = _NOT_ACCEPTING

    @classmethod
    def connect(cls, handle: Any, mailbox: Mailbox, *, timeout: float | None = None, **options: Any) -> RemoteEngine:
        """Asks a replica to describe its model (waiting for one to start), then as __init__;
        blocking: call it off the event loop."""
        return cls(handle, handle.describe.remote().result(timeout_s=timeout), mailbox, **options)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """As AsyncEngine.generate; leaving the loop early cancels the request on its replica."""
        if not self._accepting:
            yield RequestOutput(request_id, [], finish_reason=FinishReason.ABORT,
                                num_prompt_tokens=len(prompt_ids), error=self._refusal)
            return
        if request_id in self._running:
            raise ValueError(f"request id {request_id!r} is already running")
        self._notify("request_added", request_id, time.monotonic())
        finished = False
        try:
            async with contextlib.aclosing(self._stream(request_id, prompt_ids, params)) as outputs:
                async for output in outputs:  # closed on leaving: its inbox and watcher go at once
                    finished = output.finished
                    self._notify("step_done", None, [output], time.monotonic())
                    yield output
        finally:
            response = self._running.pop(request_id, None)
            if not finished:
                if response is not None:
                    response.cancel()
                self._notify("request_aborted", request_id)

    async def _stream(self, request_id: str, prompt_ids: list[int],
                      params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The request's outputs as its replica delivers them (mailbox.py); a replica lost before
        the first is retried on another."""
        for attempt in range(self.max_retries + 1):
            inbox = self._mailbox.open(request_id)
            call = self._running[request_id] = self._handle.generate.remote(request_id, prompt_ids, params)
            watcher = asyncio.ensure_future(_watch(call, inbox))
            delivered = False
            try:
                while True:
                    outputs, load = await inbox.get()
                    if isinstance(outputs, _Ended):
                        why = outputs.why(self._refusal if not self._accepting else _CANCELLED)
                        break
                    self._loads[load.replica] = load
                    if not delivered:
                        self._routed(load.replica)
                    delivered = True
                    for output in outputs:
                        yield output
                    if outputs[-1].finished:
                        return
            finally:
                self._mailbox.close(request_id)
                watcher.cancel()
            if why.cancelled:
                yield _ended(request_id, prompt_ids, FinishReason.ABORT, why.message)
                return
            if delivered or not why.retry or attempt == self.max_retries:
                log.warning("request %s failed: %s", request_id, why.message)
                yield _ended(request_id, prompt_ids, FinishReason.ABORT, f"The request failed: {why.message}. "
                                                                         "Retry it.")
                return
            log.info("request %s: %s before its first output; retrying on another replica", request_id, why.message)
            await asyncio.sleep(RETRY_BACKOFF_SECONDS * (attempt + 1))

    def abort(self, request_id: str) -> None:
        response = self._running.get(request_id)
        if response is not None:
            response.cancel()

    def snapshot(self) -> dict[str, int]:
        """The replicas' load summed, as of each one's last output; before any has answered, the
        KV blocks of the replicas it runs."""
        loads = [load_fields(load) for load in self._loads.values()]
        total = {name: sum(load[name] for load in loads) for name in ("num_running", "num_waiting", "num_kv_blocks",
                                                                      "num_free_kv_blocks")}
        if not loads:
            total["num_kv_blocks"] = total["num_free_kv_blocks"] = self._blocks_per_replica * self._num_replicas
        total["num_running"] = len(self._running)  # exact here: the requests in flight through this ingress
        return total

    def replica_loads(self) -> dict[str, ReplicaLoad]:
        """Each replica's load as of its last output, by replica id."""
        return dict(self._loads)

    @property
    def num_requests(self) -> int:
        return len(self._running)

    async def drain(self, timeout: float | None = None) -> bool:
        self._accepting = False
        return await until_empty(self._running, timeout)

    def close(self, why: str = _NOT_ACCEPTING) -> None:
        """Take no new requests and cancel the running ones (each ends with an ABORT saying `why`);
        the replicas keep running for other ingresses."""
        self._accepting, self._refusal = False, why
        for response in list(self._running.values()):
            response.cancel()

    async def save_prefix(self, token_ids: list[int], path: Any) -> int:
        raise EngineClosed(_NO_SLOT_FILES)

    async def restore_prefix(self, path: Any) -> int:
        raise EngineClosed(_NO_SLOT_FILES)

    async def forget_prefix(self, token_ids: list[int]) -> int:
        raise EngineClosed(_NO_SLOT_FILES)

    def _replica_stats(self, replica: str, stats: list) -> None:
        if self._stats_observer is None:
            return
        observer = self._stats_observer(replica)
        now = time.monotonic()
        for step in stats:
            notify((observer,), "step_done", step, [], now)

    def _notify(self, event: str, *args: object) -> None:
        notify(self.observers, event, *args)


_NO_SLOT_FILES = "slot files are not served with replicas: each replica has a KV cache of its own"


class _Ended:
    """Put in a request's inbox when its call to the replica has returned or failed."""

    def __init__(self, error: BaseException | None):
        self.error = error

    def why(self, cancelled_reason: str) -> _Why:
        from ray.serve.exceptions import RequestCancelledError

        if isinstance(self.error, (RequestCancelledError, asyncio.CancelledError)):
            return _Why(cancelled_reason, cancelled=True)
        if isinstance(self.error, replica_gone_errors()):
            return _Why(f"the replica serving it stopped ({type(self.error).__name__})", retry=True)
        if self.error is not None:
            return _Why(f"its replica failed ({type(self.error).__name__}: {self.error})")
        return _Why("its replica finished it without its last output")


@dataclass(frozen=True)
class _Why:
    message: str
    cancelled: bool = False
    retry: bool = False


async def _watch(call: Any, inbox: asyncio.Queue) -> None:
    """Await the request's call; when it ends, say so in its inbox (after the outputs it delivered)."""
    try:
        await call
    except asyncio.CancelledError as exc:  # the call was cancelled (or this watcher, when it is no use)
        inbox.put_nowait((_Ended(exc), None))
        raise
    except Exception as exc:  # noqa: BLE001 - the request's to report, not the watcher's
        inbox.put_nowait((_Ended(exc), None))
    else:
        # Its outputs were delivered before it returned: the replica awaits each `deliver` call,
        # which schedules its puts on this loop before returning, so they precede this one.
        inbox.put_nowait((_Ended(None), None))


def _ended(request_id: str, prompt_ids: list[int], reason: FinishReason, why: str) -> RequestOutput:
    return RequestOutput(request_id, [], finish_reason=reason, num_prompt_tokens=len(prompt_ids), error=why)


class RemoteChatModel:
    """What the ingress's fleet holds for a chat model served by replicas (fleet/models.ChatModel's face)."""

    kind = "chat"

    def __init__(self, engine: RemoteEngine, release: Callable[[], None] | None = None):
        """`release()`: stops the model's replicas once the fleet lets go of it (None: they stay)."""
        self.engine = engine
        self.weights_bytes = engine.weights_bytes
        self._release = release

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def memory_bytes(self) -> int:
        return 0  # held by the replicas, not this process

    def embedder(self) -> Any:
        raise APIError(501, "Embeddings from a chat model's hidden states are not served through replicas; "
                            "ask the embedding model.", type="not_implemented_error", param="model",
                       code="not_implemented")

    async def drain(self, timeout: float | None = None) -> bool:
        return await self.engine.drain(timeout)

    def close(self, why: str) -> None:
        self.engine.close(why)
        if self._release is not None:
            self._release()
