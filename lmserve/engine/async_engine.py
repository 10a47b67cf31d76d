"""One engine thread, per-request asyncio queues.

The HTTP event loop never runs the model: it posts commands (add, abort) to the engine
thread and receives outputs through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from lmserve.engine.engine import LLMEngine
from lmserve.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger("lmserve.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
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
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the engine thread
            log.exception("engine step failed outside the model")
            outputs = self.engine.fail_all(exc)
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
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "stop":
            self._stopped = True

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            with self._lock:
                target = self._queues.get(output.request_id)
            if target is None:
                if not output.finished:  # its consumer is gone: stop generating for it
                    self.engine.abort_request(output.request_id)
                continue
            loop, outputs_queue = target
            loop.call_soon_threadsafe(outputs_queue.put_nowait, output)
