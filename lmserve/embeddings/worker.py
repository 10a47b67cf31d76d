"""One thread per embedding model: requests queue up, whatever arrived together runs together.

The HTTP event loop never runs the model. `embed` posts a job and awaits a future; the worker
thread takes every job waiting, runs their texts through the model in length-sorted padded
batches, and resolves each job's future on its own loop. One thread also serialises this
model's forwards, so a decoder's embeddings never run two at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lmserve.embeddings.embedder import DecoderEmbedder, Embedder
from lmserve.embeddings.pooling import Pooling

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

log = logging.getLogger("lmserve.embeddings")

# Tokens per chat-model forward: bounds its activations and how long one forward holds up the
# requests queued behind it (it shares the cores with generation).
DECODER_BATCH_TOKENS = 2048


@dataclass
class _Job:
    batch: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class EmbeddingWorker:
    """Async front of an Embedder. `max_batch_tokens` bounds one forward's padded size
    (sequences x longest sequence), so a large request runs as several forwards."""

    def __init__(self, embedder: Embedder, max_batch_tokens: int = 8192):
        self.embedder = embedder
        self.max_batch_tokens = max(max_batch_tokens, embedder.max_input_tokens)  # one longest input fits
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lmserve-embed", daemon=True)
        self._thread.start()

    async def embed(self, batch: list[list[int]]) -> np.ndarray:
        """(len(batch), dim) float32 vectors; inputs must already satisfy the Embedder contract."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put(_Job(batch, loop, future))
        return await future

    def shutdown(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (jobs := self._take_jobs()) is not None:
            self._serve(jobs)

    def _take_jobs(self) -> list[_Job] | None:
        """Block for one job, then take all that are already waiting; None means stop."""
        jobs = [self._jobs.get()]
        while not self._jobs.empty():
            jobs.append(self._jobs.get_nowait())
        if None in jobs:  # stopping: finish what was posted before the stop, then end
            self._serve([job for job in jobs if job is not None])
            return None
        return jobs

    def _serve(self, jobs: list[_Job]) -> None:
        # Jobs whose client hung up while they waited are skipped, and once every client of a run
        # has hung up its remaining forwards are: a queue of abandoned large requests would
        # otherwise hold up everyone behind it. (A racy read is harmless: at worst one more
        # forward is computed, and _settle drops its result.)
        jobs = [job for job in jobs if not job.future.cancelled()]
        if not jobs:
            return
        flat = [ids for job in jobs for ids in job.batch]
        try:
            vectors = embed_in_batches(self.embedder, flat, self.max_batch_tokens,
                                       abandoned=lambda: all(job.future.cancelled() for job in jobs))
            if vectors is None:
                log.info("embedding request abandoned by its client; its remaining forwards were skipped")
                return
        except Exception as exc:
            log.exception("embedding forward failed")
            for job in jobs:
                job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
            return
        start = 0
        for job in jobs:
            rows = vectors[start : start + len(job.batch)]
            start += len(job.batch)
            job.loop.call_soon_threadsafe(_settle, job.future, rows, None)


def _settle(future: asyncio.Future, rows: np.ndarray | None, error: Exception | None) -> None:
    if future.cancelled():  # the client went away while its job ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(rows)


def embed_in_batches(embedder: Embedder, inputs: list[list[int]], max_batch_tokens: int,
                     abandoned: Callable[[], bool] = lambda: False) -> np.ndarray | None:
    """(len(inputs), dim) float32. Inputs are sorted by length so padding stays small, and cut
    into forwards of at most max_batch_tokens padded tokens. None, with the forwards left undone,
    once `abandoned()` is true between two forwards."""
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = np.empty((len(inputs), embedder.dim), dtype=np.float32)
    for chunk in _chunks(order, [len(ids) for ids in inputs], max_batch_tokens):
        if abandoned():
            return None
        out[chunk] = embedder.embed([inputs[i] for i in chunk]).cpu().numpy()
    return out


def _chunks(order: list[int], lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive runs of `order` (ascending length) whose count x longest fits the budget."""
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= max_batch_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def decoder_worker(engine: AsyncEngine, pooling_mode: str) -> EmbeddingWorker:
    """Embeddings from the chat engine's model: its weights (read-only, shared with the engine
    thread), its tokenizer and context length; L2-normalised."""
    embedder = DecoderEmbedder(engine.model, engine.tokenizer, Pooling(pooling_mode, normalize=True),
                               engine.max_model_len)
    return EmbeddingWorker(embedder, DECODER_BATCH_TOKENS)
