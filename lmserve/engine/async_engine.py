"""One engine thread, per-request asyncio queues.

The HTTP event loop never runs the model: it posts commands (add, abort, close, and calls such as
saving a prefix) to the engine thread, which runs them in order between steps, and receives outputs
and results through `loop.call_soon_threadsafe`. Observers (metrics) hear of every added and
aborted request and every step's stats and outputs, on the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence, Sized
from pathlib import Path
from typing import Any, Protocol

from lmserve.engine.engine import LLMEngine
from lmserve.engine.step_types import EngineClosed, EngineStep, StepStats
from lmserve.request import FinishReason, RequestOutput, SamplingParams

log = logging.getLogger("lmserve.engine")

_NOT_ACCEPTING = "the model is being unloaded; retry the request"


class EngineObserver(Protocol):
    """Told what the engine thread does; called on that thread, so it must be quick. Times are
    time.monotonic(). An observer that raises is logged and does not stop the engine."""

    def request_added(self, request_id: str, now: float) -> None: ...

    def request_aborted(self, request_id: str) -> None: ...

    def step_done(self, stats: StepStats | None, outputs: list[RequestOutput], now: float) -> None:
        """`stats` is None when the step ran no batch or failed before recording its stats."""


class AsyncEngine:
    """An LLMEngine run by its own thread, for asyncio callers.

    Its public face: generate, abort, snapshot, drain, close, save_prefix, restore_prefix,
    forget_prefix, and what the server reads: config, tokenizer, max_model_len, kv_block_bytes,
    grammar (to validate constraints before they reach the engine) and model (the decoder, for
    embeddings)."""

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], observers: Sequence[EngineObserver] = ()):
        """`engine`, or a function that builds one: it is then called on the engine's thread
        (and its exception raised here). Build a model on the thread that will step it: stepped
        on another thread than the one that loaded it, the native forward runs at a third of its
        speed at one sequence (bench/RESULTS.md, 2026-12-03, third sitting)."""
        self._ready = threading.Event()  # set once __init__ is done: then the thread runs the engine
        if callable(engine):
            engine = self._built_on_own_thread(engine)
        else:
            self._thread = threading.Thread(target=self._run_when_ready, name="lmserve-engine", daemon=True)
            self._thread.start()
        self._engine = engine
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.kv_block_bytes = engine.kv_block_bytes
        self.grammar = engine.grammar
        self.model = engine.model
        self.draft_model = engine.draft_model
        self.observers = tuple(observers)
        self._commands: queue.Queue = queue.Queue()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._accepting = True  # new requests are taken (False from drain or close on)
        self._refusal = _NOT_ACCEPTING  # what requests refused or aborted from then on are told
        self._closing = False  # close was called: no more commands of any kind
        self._stopped = False
        self._ready.set()

    def _run_when_ready(self) -> None:
        self._ready.wait()
        self._run()

    def _built_on_own_thread(self, build: Callable[[], LLMEngine]) -> LLMEngine:
        """`build()` on a new thread, which then runs the engine; its exception raised here."""
        built: list = []
        done = threading.Event()

        def run() -> None:
            try:
                built.append(build())
            except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
                built.append(exc)
            finally:
                done.set()
            if not isinstance(built[0], BaseException):
                self._run_when_ready()

        self._thread = threading.Thread(target=run, name="lmserve-engine", daemon=True)
        self._thread.start()
        done.wait()
        if isinstance(built[0], BaseException):
            raise built[0]
        return built[0]

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive; the last has finish_reason set. Leaving the loop
        early (break, aclose, cancellation) aborts the request and frees its blocks. Once the
        engine drains or closes, a new request gets one ABORT output saying so."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already running")
            accepted = self._accepting
            if accepted:
                self._queues[request_id] = (loop, outputs)
                self._commands.put(("add", request_id, prompt_ids, params))  # under the lock: never after "close"
        if not accepted:  # yielded with the lock released: the caller may hold this generator paused
            yield RequestOutput(request_id, [], finish_reason=FinishReason.ABORT,
                                num_prompt_tokens=len(prompt_ids), error=self._refusal)
            return
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

    async def save_prefix(self, token_ids: list[int], path: Path) -> int:
        """LLMEngine.save_prefix on the engine thread, between steps (generation pauses while the
        file is written)."""
        return await self._call(self._engine.save_prefix, list(token_ids), Path(path))

    async def restore_prefix(self, path: Path) -> int:
        """LLMEngine.restore_prefix on the engine thread, between steps."""
        return await self._call(self._engine.restore_prefix, Path(path))

    async def forget_prefix(self, token_ids: list[int]) -> int:
        """LLMEngine.forget_prefix on the engine thread, between steps."""
        return await self._call(self._engine.forget_prefix, list(token_ids))

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)`'s result or exception, from the engine thread. These run while the
        engine drains; once it closes they raise EngineClosed."""
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        with self._lock:
            if self._closing:
                raise EngineClosed(self._refusal)
            self._commands.put(("call", function, args, loop, result))  # under the lock: before "close"
        return await result

    def snapshot(self) -> dict[str, int]:
        """Current load, read without locking (approximate while a step runs)."""
        return dataclasses.asdict(self._engine.load())

    @property
    def is_running(self) -> bool:
        """The engine thread is alive and stepping (False once closed, or if the thread died)."""
        return self._thread.is_alive() and not self._stopped

    @property
    def num_requests(self) -> int:
        """Requests being generated for a caller now (added, not yet finished or abandoned)."""
        return len(self._queues)

    async def drain(self, timeout: float | None = None) -> bool:
        """Take no new requests (each gets an ABORT output) and wait until the ones running have
        finished. False if some were still running after `timeout` seconds."""
        with self._lock:
            self._accepting = False
        return await until_empty(self._queues, timeout)

    def close(self, why: str = _NOT_ACCEPTING) -> None:
        """Take no new requests, abort the running ones (each gets an ABORT output saying `why`),
        stop the engine thread and let go of the model and the KV cache. Safe to call more than
        once."""
        with self._lock:
            if not self._closing:
                self._refusal = why
            self._accepting = False
            self._closing = True
        if self._thread.is_alive():
            self._commands.put(("close",))
            self._thread.join(timeout=30)
        self.model = self.draft_model = None

    def _run(self) -> None:
        while not self._stopped:
            self._drain_commands(block=not self._engine.has_unfinished)
            if self._engine.has_unfinished and not self._stopped:
                self._step()

    def _step(self) -> None:
        try:
            step = self._engine.step()
        except Exception as exc:
            log.exception("engine step failed outside the model")
            step = EngineStep(self._engine.fail_all(exc), None)
        self._notify("step_done", step.stats, step.outputs, time.monotonic())
        self._deliver(step.outputs)

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
                self._engine.add_request(request_id, prompt_ids, params)
            except ValueError as exc:
                self._deliver([RequestOutput(request_id, [], finish_reason=FinishReason.ERROR, error=str(exc))])
            else:
                self._notify("request_added", request_id, time.monotonic())
        elif kind == "abort":
            self._abort(command[1])
        elif kind == "call":
            self._run_call(*command[1:])
        elif kind == "close":
            outputs = self._engine.close(why=self._refusal)
            for output in outputs:
                self._notify("request_aborted", output.request_id)
            self._deliver(outputs)
            self._stopped = True

    @staticmethod
    def _run_call(function: Callable[..., Any], args: tuple, loop: asyncio.AbstractEventLoop,
                  result: asyncio.Future) -> None:
        try:
            value, error = function(*args), None
        except Exception as exc:  # noqa: BLE001 - the caller's to handle, not the engine thread's
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(_settle, result, value, error)
        except RuntimeError:  # the caller's event loop has closed: no one is waiting
            log.debug("engine call %r finished after its caller's event loop closed", function)

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
        self._engine.abort_request(request_id)
        self._notify("request_aborted", request_id)

    def _notify(self, event: str, *args: object) -> None:
        notify(self.observers, event, *args)


def notify(observers: Sequence[EngineObserver], event: str, *args: object) -> None:
    """Tell each observer `event`; one that raises is logged, and the others are still told."""
    for observer in observers:
        try:
            getattr(observer, event)(*args)
        except Exception:
            log.exception("engine observer %r failed on %s", observer, event)


async def until_empty(running: Sized, timeout: float | None) -> bool:
    """Wait until `running` (requests in flight) is empty: False if it still was not after
    `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while running:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _settle(result: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if result.done():  # its caller was cancelled
        return
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(value)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for outputs_queue, output in batch:
        outputs_queue.put_nowait(output)
