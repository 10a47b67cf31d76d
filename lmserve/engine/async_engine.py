"""One engine thread, per-request asyncio queues.

The HTTP event loop never runs the model: it posts commands (add, abort) to the engine
thread and receives outputs through `loop.call_soon_threadsafe`. Observers (metrics) hear of
every added and aborted request and every step's stats and outputs, on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from lmserve.engine.engine import LLMEngine, StepStats
from lmserve.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger("lmserve.engine")


class EngineObserver(Protocol):
    """Told what the engine thread does; called on that thread, so it must be quick. Times are
    time.monotonic(). An observer that raises is logged and does not stop the engine."""

    def request_added(self, request_id: str, now: float) -> None: ...

    def request_aborted(self, request_id: str) -> None: ...

    def step_done(self, stats: StepStats | None, outputs: list[RequestOutput], now: float) -> None:
        """`stats` is None when the step ran no batch or failed before recording its stats."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, observers: Sequence[EngineObserver] = ()):
        self.engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.grammar = engine.runner.grammar  # compiles request constraints on the server side
        self.observers = tuple(observers)
        self._commands: queue.Queue = queue.Queue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="lmserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive; the last has finish_reason set. Leaving the loop
        early (break, aclose, cancellation) aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already running")
            self._queues[request_id] = (loop, outputs)
        self._commands.put(("add", request_id, prompt_ids, params))
        finished = False
        try:
            while not finished:
                output: RequestOutput = await outputs.get()
                finished = output.finished
                yield output
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    def snapshot(self) -> dict[str, int]:
        """Current load, read without locking (approximate while a step runs)."""
        return {
            "num_running": len(self.engine.scheduler.running),
            "num_waiting": len(self.engine.scheduler.waiting),
            "num_kv_blocks": self.engine.pool.num_blocks,
            "num_free_kv_blocks": self.engine.pool.num_free,
        }

    def _run(self) -> None:
        while not self._stopped:
            self._drain_commands(block=not self.engine.has_unfinished)
            if self.engine.has_unfinished:
                self._step()

    def _step(self) -> None:
        previous_stats = self.engine.last_stats
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed outside the model")
            outputs = self.engine.fail_all(exc)
        # step() records a new StepStats object only when it ran a batch to the end.
        stats = self.engine.last_stats if self.engine.last_stats is not previous_stats else None
        self._notify("step_done", stats, outputs, time.monotonic())
        self._deliver(outputs)

    def _drain_commands(self, block: bool) -> None:
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            self._apply(command)

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params = command
            try:
                self.engine.add_request(request_id, prompt_ids, params)
            except ValueError as exc:
                self._deliver([RequestOutput(request_id, [], finish_reason=FinishReason.ERROR, error=str(exc))])
            else:
                self._notify("request_added", request_id, time.monotonic())
        elif kind == "abort":
            self._abort(command[1])
        elif kind == "stop":
            self._stopped = True

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        # One wake-up of each event loop per step, not one per output: with 64 streams the
        # per-output wake-ups cost the loop thread more than the chunks it then sends.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            with self._lock:
                target = self._queues.get(output.request_id)
            if target is None:
                if not output.finished:  # its consumer is gone: stop generating for it
                    self._abort(output.request_id)
                continue
            loop, outputs_queue = target
            batches.setdefault(loop, []).append((outputs_queue, output))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)
        self._notify("request_aborted", request_id)

    def _notify(self, event: str, *args: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("engine observer %r failed on %s", observer, event)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs_queue, output in batch:
        outputs_queue.put_nowait(output)
