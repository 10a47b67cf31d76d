"""The real LLMEngine on a loaded model with small test budgets, and chat prompts for it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lmserve.config import CacheConfig, DraftConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from tests.helpers.pacing import AlwaysDraft

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in one sentence, please, with an example from everyday life.",
    "Hi",
    "What is 2 + 2? Answer with one number only.",
    "Name a color, any color you like.",
    "Describe a cat. " * 12,
]


def make_engine(loaded, kv_bytes=64 << 20, budget=64, max_seqs=8, max_len=1024, prefix_caching=True,
                speculative=0, max_step_ms=0.0) -> LLMEngine:
    """No time bound on a step's prompt tokens unless asked (it follows the machine's speed)."""
    config = EngineConfig("unused", "test", cache=CacheConfig(16, kv_bytes, enable_prefix_caching=prefix_caching),
                          scheduler=SchedulerConfig(max_seqs, budget, max_len, num_speculative_tokens=speculative,
                                                    max_step_ms=max_step_ms))
    return LLMEngine(config, loaded)


def chat_ids(tokenizer, text):
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                            add_special_tokens=False)


class IdTokenizer:
    """Stands in for the tokenizer a tiny random model lacks: token i reads "<i>"; nothing is
    special and no token ends a sequence."""

    eos_token_ids = ()
    strip_leading_space = False

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def token_bytes(self, token_id: int) -> bytes:
        return f"<{token_id}>".encode()

    def is_special(self, token_id: int) -> bool:
        return False


def tiny_engine(folder: Path, dtype="float32", num_blocks=64, block_size=4, max_len=None,
                model_path=None, speculative=0, speculative_sampling=False, kv_cache_dtype="auto",
                draft: Path | None = None, paced: bool = False) -> LLMEngine:
    """The real LLMEngine on a tiny random model's HF folder (tests/helpers/tiny_models.py), its
    KV cache `num_blocks` blocks of `block_size` tokens; max_len defaults to all of them. Its
    config names `model_path` instead of the folder if given; `draft`, a tiny model's folder, is
    its draft model (float32), drafting at every step unless `paced` (then where drafts pay)."""
    from lmserve.cache.kv_cache import bytes_per_block
    from lmserve.engine.sizing import kv_dtype
    from lmserve.weights.load import LoadedModel, load_weights

    def tiny(where: Path, dtype: str) -> LoadedModel:
        model, model_config, _ = load_weights(where, dtype)
        return LoadedModel(model, model_config, IdTokenizer(model_config.vocab_size), dtype)

    loaded = tiny(folder, dtype)
    model_config = loaded.config
    cache = CacheConfig(block_size, 1, kv_cache_dtype=kv_cache_dtype)
    cache = replace(cache, kv_cache_memory_bytes=num_blocks * bytes_per_block(model_config, block_size,
                                                                             kv_dtype(cache, dtype)))
    max_len = max_len or min(num_blocks * block_size, model_config.max_position_embeddings)
    config = EngineConfig(model_path or str(folder), "tiny", dtype=dtype, cache=cache,
                          draft=None if draft is None else DraftConfig(str(draft), "float32", tokens=speculative),
                          scheduler=SchedulerConfig(4, 64, max_len, num_speculative_tokens=speculative,
                                                    speculative_sampling=speculative_sampling))
    engine = LLMEngine(config, loaded, None if draft is None else tiny(draft, "float32"))
    if draft is not None and not paced:
        engine._draft.pacer = AlwaysDraft()
    return engine
