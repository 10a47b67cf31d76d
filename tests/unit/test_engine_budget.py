"""What an EngineConfig asks of the engine besides the model: a KV budget counted in tokens (as
llama-server's -c counts it) or in bytes, and a chat template in place of the model's own."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from lmserve.cli import default_model_path
from lmserve.config import CacheConfig, DraftConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from lmserve.engine.sizing import check_sizes, draft_kv_cache_bytes, kv_cache_bytes
from lmserve.fleet.catalogue import ModelEntry
from lmserve.fleet.models import engine_config_for, footprint_estimator
from lmserve.weights.size import estimated_weight_bytes

# The fields of a ModelConfig the sizes are read from: 2 x 3 layers x 2 heads x 16 values, float32.
MODEL = SimpleNamespace(max_position_embeddings=4096, num_hidden_layers=3, num_key_value_heads=2, head_dim=16)
TOKEN_BYTES = 2 * 3 * 2 * 16 * 4


def config(**cache) -> EngineConfig:
    return EngineConfig("m.gguf", "m", cache=CacheConfig(**cache), scheduler=SchedulerConfig(max_model_len=512))


def test_a_budget_in_tokens_is_as_many_blocks_as_hold_them_whatever_a_token_takes():
    assert check_sizes(config(block_size=16, kv_cache_tokens=2048), MODEL, "float32") == (512, 128)
    assert check_sizes(config(block_size=16, kv_cache_tokens=2050), MODEL, "float32") == (512, 129)  # rounded up
    assert check_sizes(config(block_size=16, kv_cache_memory_bytes=100 * 16 * TOKEN_BYTES), MODEL, "float32") == (
        512, 100)
    with pytest.raises(ValueError, match="holds 496 tokens, fewer than max_model_len 512"):
        check_sizes(config(block_size=16, kv_cache_tokens=496), MODEL, "float32")


def test_the_footprint_of_a_budget_in_tokens_is_read_from_the_models_header():
    path = str(default_model_path())  # SmolLM2-135M: 30 layers x 3 KV heads x 64, served in bfloat16 (int4)
    tokens = EngineConfig(path, "m", cache=CacheConfig(16, kv_cache_tokens=2048))
    assert kv_cache_bytes(tokens) == 2048 * 2 * 30 * 3 * 64 * 2
    assert kv_cache_bytes(replace(tokens, cache=CacheConfig(16, 5 << 20))) == 5 << 20


def test_a_models_own_kv_cache_memory_replaces_the_servers_budget_in_tokens():
    server = EngineConfig("x", "x", cache=CacheConfig(16, kv_cache_tokens=2048), scheduler=SchedulerConfig(4, 512, 512))
    own = engine_config_for(server, ModelEntry(id="a", source="a.gguf", settings={"kv_cache_memory": 1 << 20}))
    assert (own.cache.kv_cache_memory_bytes, own.cache.kv_cache_tokens) == (1 << 20, None)
    assert engine_config_for(server, ModelEntry(id="b", source="b.gguf")).cache == server.cache


def test_a_chat_template_in_the_config_replaces_the_models_own(default_model):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    config = EngineConfig("unused", "test", cache=CacheConfig(16, 16 << 20), scheduler=SchedulerConfig(2, 64, 256),
                          chat_template=template)
    engine = LLMEngine(config, default_model)
    try:
        assert engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi"
        assert default_model.tokenizer.chat_template != template  # the loaded model's tokenizer is left as it was
    finally:
        engine.close()


def test_a_models_draft_is_in_its_engine_settings_and_its_footprint():
    path = str(default_model_path())
    server = EngineConfig("x", "x", cache=CacheConfig(16, kv_cache_tokens=4096), scheduler=SchedulerConfig(4, 512, 512, 4))
    plain = ModelEntry(id="a", source=path)
    drafted = ModelEntry(id="a", source=path, settings={"draft_model": path, "draft_dtype": "int4", "draft_tokens": 6})
    config = engine_config_for(server, drafted)
    assert (config.draft, config.scheduler) == (DraftConfig(path, "int4", 6), server.scheduler)  # lookup's count kept
    assert engine_config_for(server, plain).draft is None
    footprint = footprint_estimator(server)
    draft_kv = draft_kv_cache_bytes(config)  # room for 4 sequences of 512 tokens (of the model's 4096) in bfloat16
    assert draft_kv == 4 * 512 * 2 * 30 * 3 * 64 * 2
    assert footprint(drafted) - footprint(plain) == estimated_weight_bytes(path, "int4", "cpu") + draft_kv
