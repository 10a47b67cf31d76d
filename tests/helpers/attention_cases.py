"""Attention inputs shared by the attention tests."""

from __future__ import annotations

import torch


def scattered_context(total: int, num_kv_heads: int, group: int, head_dim: int, block: int, blocks: list[int],
                      seed: int):
    """`total` positions of random queries (total, Hkv * group, D), keys and values (total, Hkv, D),
    and their cache slots (total,) laid over `blocks` of `block` positions, in that order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=g)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    slots = (torch.tensor(blocks)[:, None] * block + torch.arange(block)).flatten()[:total]
    return q, k, v, slots
