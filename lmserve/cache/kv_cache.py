"""Allocate the paged KV cache from a memory budget."""

from __future__ import annotations

import math
import mmap

import torch

from lmserve.model.attention import SCALE_BYTES
from lmserve.model.config import ModelConfig


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one cached (kv head, token) row: head_dim, and an int8 row's 4-byte scale."""
    return head_dim + (SCALE_BYTES if dtype == torch.int8 else 0)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * row_width(config.head_dim, dtype)
    return per_token * block_size * dtype.itemsize


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
    return budget_bytes // bytes_per_block(config, block_size, dtype)


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (keys, values) pair per layer, each (num_kv_heads, num_blocks * block_size, row_width),
    all zeros (an int8 cache's rows carry their scale: model/attention.py). On the CPU they lie in anonymous mappings: the kernel's zero pages, committed one page
    at a time as blocks are first written, so the budget's unused part costs no resident memory
    (a server started with the default 1 GiB budget holds only what its requests have used)."""
    shape = (config.num_key_value_heads, num_blocks * block_size, row_width(config.head_dim, dtype))
    return [(_zeros(shape, dtype, device), _zeros(shape, dtype, device)) for _ in range(config.num_hidden_layers)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    pages = mmap.mmap(-1, nbytes)  # anonymous, private, zero-filled; the tensor keeps it alive
    return torch.frombuffer(pages, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
