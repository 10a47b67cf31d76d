"""Attention inputs shared by the attention tests."""

from __future__ import annotations

import torch

from lmserve.kernels import cpu_flags
from lmserve.model.attention import dequantize_rows, quantize_rows


def prompt_kernel_path() -> str | None:
    """Which path of the prompt attention kernels this CPU runs, read off its flags: "bf16" (bf16
    dot products, its softmax weights rounded to bf16), "float32" (AVX2 with FMA) or None."""
    flags = cpu_flags()
    if "avx512_bf16" in flags:
        return "bf16"
    return "float32" if {"avx2", "fma"} <= flags else None


def block_slots(blocks, block: int, total: int) -> torch.Tensor:
    """The cache slots of the first `total` positions laid over `blocks` of `block` positions."""
    return (torch.as_tensor(blocks)[:, None] * block + torch.arange(block)).flatten()[:total]


def random_cache(num_kv_heads: int, num_slots: int, head_dim: int, cache_dtype: torch.dtype, generator,
                 int8_read_as: torch.dtype = torch.float32):
    """A random key and value cache in `cache_dtype`, and the float32 values attention reads from
    it: int8 rows dequantized to `int8_read_as` (bf16 where a kernel rounds them so)."""
    parts = [torch.randn(num_kv_heads, num_slots, head_dim, generator=generator) for _ in range(2)]
    if cache_dtype == torch.int8:
        stored = [quantize_rows(p) for p in parts]
        return stored, [dequantize_rows(p, int8_read_as).float() for p in stored]
    stored = [p.to(cache_dtype) for p in parts]
    return stored, [p.float() for p in stored]


def scattered_context(total: int, num_kv_heads: int, group: int, head_dim: int, block: int, blocks: list[int],
                      seed: int):
    """`total` positions of random queries (total, Hkv * group, D), keys and values (total, Hkv, D),
    and their cache slots (total,) laid over `blocks` of `block` positions, in that order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=g)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    return q, k, v, block_slots(blocks, block, total)
