"""What the fleet holds for a loaded model, and how a catalogue entry is loaded into one.

A chat model is its AsyncEngine, plus the embedding worker over its hidden states once
/v1/embeddings asks for it; an embedding model is its EmbeddingWorker. Both drain and close as
the fleet expects, and closing lets go of every reference to the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from lmserve import memory
from lmserve.config import DEFAULT_DRAFT_TOKENS, DraftConfig, EmbeddingConfig, EngineConfig
from lmserve.fleet.catalogue import ModelEntry

if TYPE_CHECKING:
    from lmserve.embeddings.worker import EmbeddingWorker
    from lmserve.engine.async_engine import AsyncEngine

log = logging.getLogger("lmserve.fleet")


def weights_bytes(root: object) -> int:
    """Bytes of every tensor storage reachable from `root` through object attributes, containers
    and module trees (each storage once): a loaded model's weights, whatever formats hold them."""
    import torch

    seen_objects, storages, total = set(), set(), 0
    pending = [root]
    while pending:
        value = pending.pop()
        if id(value) in seen_objects:
            continue
        seen_objects.add(id(value))
        if isinstance(value, torch.Tensor):
            try:
                storage = value.untyped_storage()
            except NotImplementedError:  # oneDNN-packed weights hold their bytes opaquely
                total += value.numel() * value.element_size()
                continue
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith(("lmserve", "torch")):
            pending.extend(vars(value).values())
    return total


class ChatModel:
    kind = "chat"

    def __init__(self, engine: AsyncEngine, pooling: str = "mean"):
        self.engine = engine
        self.weights_bytes = sum(weights_bytes(model) for model in (engine.model, engine.draft_model) if model is not None)
        self.pooling = pooling  # how its embeddings pool hidden states: "mean" or "last"
        self._embedder: EmbeddingWorker | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def memory_bytes(self) -> int:
        """Its weights, and the KV blocks its requests hold now (the rest of the budget is not touched)."""
        load = self.engine.snapshot()
        return self.weights_bytes + (load["num_kv_blocks"] - load["num_free_kv_blocks"]) * self.engine.kv_block_bytes

    def embedder(self) -> EmbeddingWorker:
        """Embeddings from this model's hidden states, its worker made on first use."""
        if self._embedder is None:  # no await in between: the event loop cannot race this
            from lmserve.embeddings.worker import decoder_worker

            self._embedder = decoder_worker(self.engine, self.pooling)
        return self._embedder

    async def drain(self, timeout: float | None = None) -> bool:
        return await self.engine.drain(timeout)

    def close(self, why: str) -> None:
        """Stop; the requests still running end with an error saying `why`. The memory its steps
        freed, which stays in the heap for the next step while a model serves
        (memory.serve_from_heap), goes back to the OS with the engine's."""
        if self._embedder is not None:
            self._embedder.shutdown()
            self._embedder = None
        self.engine.close(why)
        memory.return_freed_memory()


class EmbeddingModel:
    kind = "embedding"

    def __init__(self, worker: EmbeddingWorker):
        self.worker = worker
        self.weights_bytes = weights_bytes(worker.embedder)

    @property
    def max_model_len(self) -> int:
        return self.worker.embedder.max_input_tokens

    def memory_bytes(self) -> int:
        return self.weights_bytes

    def embedder(self) -> EmbeddingWorker:
        return self.worker

    async def drain(self, timeout: float | None = None) -> bool:
        return True  # a request holds its lease until its vectors are back: the fleet waits on those

    def close(self, why: str) -> None:
        """Stop once the jobs already posted are done: no request is cut short, so `why` is never told."""
        self.worker.shutdown()


def engine_config_for(defaults: EngineConfig, entry: ModelEntry) -> EngineConfig:
    """The server's engine settings with the entry's path and name, and its own settings on top
    (its kv_cache_memory replaces a budget the server counts in tokens, -c)."""
    settings = entry.settings
    cache = defaults.cache
    if "kv_cache_memory" in settings:
        cache = replace(cache, kv_cache_memory_bytes=settings["kv_cache_memory"], kv_cache_tokens=None)
    scheduler = replace(defaults.scheduler, max_model_len=settings.get("max_model_len", defaults.scheduler.max_model_len))
    draft = None
    if "draft_model" in settings:  # its drafts come before prompt lookup's
        draft = DraftConfig(settings["draft_model"], settings.get("draft_dtype", "auto"),
                            settings.get("draft_tokens", DEFAULT_DRAFT_TOKENS))
    return replace(defaults, model_path=entry.source, served_model_name=entry.id,
                   dtype=settings.get("dtype", defaults.dtype), cache=cache, scheduler=scheduler, draft=draft)


def preload(engine, messages: list[dict[str, str]]) -> int:
    """Prefill `messages` (as the chat template renders them, without the assistant's turn) into
    the engine's prefix cache, so requests that begin with them find those blocks cached. Returns
    the tokens prefilled."""
    from lmserve.request import SamplingParams

    tokenizer = engine.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False),
                           add_special_tokens=False)
    engine.generate([ids], SamplingParams(temperature=0, max_tokens=1))
    log.info("preloaded %d prompt tokens", len(ids))
    return len(ids)


def footprint_estimator(engine_defaults: EngineConfig) -> Callable[[ModelEntry], int]:
    """Bytes a catalogue entry will take loaded, from its header alone: weights in the dtype it will
    be served in, plus its whole KV cache budget, and its draft model's (for --models-memory). 0
    when the checkpoint cannot be read: loading it will say why."""

    def footprint(entry: ModelEntry) -> int:
        from lmserve.engine.sizing import draft_kv_cache_bytes, kv_cache_bytes
        from lmserve.weights.size import estimated_weight_bytes

        config = engine_config_for(engine_defaults, entry) if entry.kind == "chat" else None
        try:
            weights = estimated_weight_bytes(entry.source, config.dtype if config else "float32", engine_defaults.device)
            kv_budget = kv_cache_bytes(config) if config else 0
            if config is not None and config.draft is not None:
                weights += estimated_weight_bytes(config.draft.model_path, config.draft.dtype, engine_defaults.device)
                kv_budget += draft_kv_cache_bytes(config)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot size %s before loading it: %s", entry.id, exc)
            return 0
        return weights + kv_budget

    return footprint


def model_loader(engine_defaults: EngineConfig, embedding_defaults: EmbeddingConfig, *, metrics: Any = None,
                 pooling: str = "mean") -> Callable[[ModelEntry], Any]:
    """A fleet loader: an entry becomes a ChatModel built from `engine_defaults` (with the entry's
    path, name and settings), its engine observed by `metrics.observer(id)`, or an
    EmbeddingModel. Runs in a worker thread; raises ValueError (or OSError) with the reason for a
    model that cannot be served."""

    def load(entry: ModelEntry, progress: Callable[[int, int], None] | None = None) -> ChatModel | EmbeddingModel:
        from lmserve.fleet.download import download, is_remote

        if is_remote(entry.source):  # into the Hugging Face cache (or lmserve's), reported as it arrives
            entry = replace(entry, source=str(download(entry.source, progress)))

        if entry.kind == "embedding":
            from lmserve.embeddings.embedder import EncoderEmbedder
            from lmserve.embeddings.worker import EmbeddingWorker

            config = replace(embedding_defaults, model_path=entry.source, served_model_name=entry.id)
            model = EmbeddingModel(EmbeddingWorker(EncoderEmbedder.from_folder(config.model_path),
                                                   config.max_batch_tokens))
        else:
            from lmserve.engine.async_engine import AsyncEngine
            from lmserve.engine.engine import LLMEngine

            config = engine_config_for(engine_defaults, entry)

            def build() -> LLMEngine:  # on the engine's own thread: see AsyncEngine
                engine = LLMEngine.from_config(config)
                if entry.preload:
                    preload(engine, entry.preload)
                return engine

            observers = [metrics.observer(entry.id)] if metrics is not None else []
            memory.release_library_pages()  # what start-up touched is not held beside the load's work
            with memory.large_blocks_mapped_apart():
                model = ChatModel(AsyncEngine(build, observers=observers), pooling)
        released = memory.settle_after_load()
        log.info("model %s ready: %d MiB of weights (%d MiB of library pages only start-up and loading used "
                 "released)", entry.id, model.weights_bytes >> 20, released >> 20)
        return model

    return load

