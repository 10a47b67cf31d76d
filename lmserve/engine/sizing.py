"""What an engine of a given config takes and refuses, worked out without building it: the
context length and KV blocks it gets (check_sizes), the KV cache's bytes (for --models-memory),
and the same refusals from the checkpoint's header alone (preflight), so a server stops before it
says it is up."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lmserve.cache.kv_cache import bytes_per_block, num_blocks_for_budget
from lmserve.config import CacheConfig, EngineConfig
from lmserve.model.config import ModelConfig
from lmserve.weights.load import DTYPES


def kv_dtype(cache: CacheConfig, dtype: str) -> torch.dtype:
    """The KV cache's element type: the weights' float type (bf16 under int4 and int8 weights), or
    int8 rows with --kv-cache-dtype int8."""
    return torch.int8 if cache.kv_cache_dtype == "int8" else DTYPES[dtype]


def check_sizes(config: EngineConfig, model: ModelConfig, dtype: str) -> tuple[int, int]:
    """(max_model_len, KV blocks) for `config` on a model of `model`'s shape served in `dtype`;
    ValueError when the context asked for exceeds the model's or the KV budget cannot hold it."""
    model_len = model.max_position_embeddings
    if (config.scheduler.max_model_len or 0) > model_len:
        raise ValueError(f"max_model_len {config.scheduler.max_model_len} exceeds the model's context "
                         f"length {model_len}")
    max_model_len = config.scheduler.max_model_len or model_len
    block_size = config.cache.block_size
    num_blocks = num_kv_blocks(config.cache, model, dtype)
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV cache budget holds {num_blocks * block_size} tokens, fewer than max_model_len "
            f"{max_model_len}: raise --kv-cache-memory or lower --max-model-len")
    return max_model_len, num_blocks


def num_kv_blocks(cache: CacheConfig, model: ModelConfig, dtype: str) -> int:
    """The KV blocks `cache` budgets for a model of `model`'s shape served in `dtype`: enough for
    its kv_cache_tokens when set, else as many as its bytes hold."""
    if cache.kv_cache_tokens is not None:
        return -(-cache.kv_cache_tokens // cache.block_size)
    return num_blocks_for_budget(model, cache.block_size, kv_dtype(cache, dtype), cache.kv_cache_memory_bytes)


def kv_cache_bytes(config: EngineConfig) -> int:
    """What the KV cache of `config` will take, from the checkpoint's header when its budget is
    counted in tokens (for --models-memory)."""
    if config.cache.kv_cache_tokens is None:
        return config.cache.kv_cache_memory_bytes
    from lmserve.weights.dtype import serving_dtype
    from lmserve.weights.load import read_model_config

    path = Path(config.model_path)
    model, dtype = read_model_config(path), serving_dtype(path, config.dtype, config.device)
    return num_kv_blocks(config.cache, model, dtype) * bytes_per_block(model, config.cache.block_size,
                                                                       kv_dtype(config.cache, dtype))


def draft_kv_cache_bytes(config: EngineConfig) -> int:
    """What the KV cache of `config`'s draft model will take at most (draft_model.draft_kv_tokens),
    from the two checkpoints' headers."""
    from lmserve.engine.draft_model import draft_kv_tokens
    from lmserve.weights.dtype import serving_dtype
    from lmserve.weights.load import read_model_config

    target_path, draft_path = Path(config.model_path), Path(config.draft.model_path)
    target, draft = read_model_config(target_path), read_model_config(draft_path)
    block_size = config.cache.block_size
    tokens = num_kv_blocks(config.cache, target, serving_dtype(target_path, config.dtype, config.device)) * block_size
    max_len = min(config.scheduler.max_model_len or target.max_position_embeddings, draft.max_position_embeddings)
    cache = replace(config.cache, kv_cache_tokens=draft_kv_tokens(tokens, max_len))
    dtype = serving_dtype(draft_path, config.draft.dtype, config.device)
    return num_kv_blocks(cache, draft, dtype) * bytes_per_block(draft, block_size, kv_dtype(cache, dtype))


def preflight(config: EngineConfig) -> None:
    """What LLMEngine would refuse about `config`, found from the checkpoint's header alone (a
    fraction of a second), so a server stops before it says it is up: ValueError."""
    from lmserve.weights.dtype import serving_dtype
    from lmserve.weights.load import read_model_config

    path = Path(config.model_path)
    check_sizes(config, read_model_config(path), serving_dtype(path, config.dtype, config.device))
