"""The real LLMEngine on a loaded model with small test budgets, and chat prompts for it."""

from __future__ import annotations

from lmserve.config import CacheConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine

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


def make_engine(loaded, kv_bytes=64 << 20, budget=64, max_seqs=8, max_len=1024, prefix_caching=True) -> LLMEngine:
    config = EngineConfig("unused", "test", cache=CacheConfig(16, kv_bytes, enable_prefix_caching=prefix_caching),
                          scheduler=SchedulerConfig(max_seqs, budget, max_len))
    return LLMEngine(config, loaded)


def chat_ids(tokenizer, text):
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                            add_special_tokens=False)
