"""Attention over the paged KV cache.

The cache of one layer is two tensors of shape (num_kv_heads, num_slots, head_dim), where
slot = block_id * block_size + offset; an int8 cache's rows are head_dim + 4 bytes wide: the
values over max|row| / 127, then that scale as float32 (quantize_rows), read back by
dequantize_rows and, in place, by the native kernels. Heads lead so that a gather along the slot axis comes out
as (num_kv_heads, ...) and feeds the batched matmuls without a transposing copy. The runner
orders each step's tokens decodes first (one query token per sequence), then prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from lmserve.kernels import native_module
from lmserve.kernels import paged_decode_attention as native_decode_attention
from lmserve.model.weight_formats.int8 import quantize_rows_reference as int8_rows


@dataclass
class PrefillSeq:
    """One sequence's chunk of query tokens [query_start, query_start + query_len)."""

    query_start: int
    query_len: int
    context_len: int  # tokens attended to, the chunk included
    slot_ids: torch.Tensor | None  # (context_len,) cache slots; None when the chunk is the whole context


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (num_tokens,) cache slot written by each token
    num_decodes: int  # the first num_decodes tokens are decode rows: each attends to the cache up to itself
    decode_blocks: torch.Tensor | None  # (num_decodes, max_blocks) block table, padded with block 0
    decode_lens: torch.Tensor | None  # (num_decodes,) int64 context lengths
    prefills: list[PrefillSeq]
    block_size: int = 0  # tokens per KV block, as the decode table lays them out
    decode_kernel: bool = True  # decode rows may take the native kernels; False: PyTorch's path (for comparisons)

    @cached_property
    def decode_bias(self) -> torch.Tensor:
        """(num_decodes, 1, max_blocks * block_size): 0 within each row's context, -inf past it.
        Made when first asked: only PyTorch's decode attention reads it."""
        positions = torch.arange(self.decode_blocks.shape[1] * self.block_size, device=self.decode_lens.device)
        past = positions[None, :] >= self.decode_lens[:, None]
        return torch.zeros(past.shape, device=past.device).masked_fill_(past, float("-inf"))[:, None, :]


SCALE_BYTES = 4  # an int8 row's float32 scale, after its values


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) float -> (..., D + 4) int8 rows: the int8 activations' per-row quantization
    (round(x / s), s = max|x| / 127), then s's bytes."""
    *lead, head_dim = x.shape
    values, scales = int8_rows(x.float().reshape(-1, head_dim))  # (N, D) int8, (N,) float32
    return torch.cat([values, scales[:, None].view(torch.int8)], dim=-1).view(*lead, head_dim + SCALE_BYTES)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quantize_rows' (..., D + 4) int8 rows -> (..., D) values in `dtype`."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float32)  # (..., 1)
    return (rows[..., :head_dim].float() * scale).to(dtype)


def head_dim_of(cache_part: torch.Tensor) -> int:
    return cache_part.shape[-1] - (SCALE_BYTES if cache_part.dtype == torch.int8 else 0)


def _stored(cache_part: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return quantize_rows(x) if cache_part.dtype == torch.int8 else x.to(cache_part.dtype)


def _read(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_rows(rows, dtype) if rows.dtype == torch.int8 else rows.to(dtype)


def write_kv(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (num_tokens, num_kv_heads, head_dim) into their slots."""
    k_cache, v_cache = cache
    k_cache.index_copy_(1, slot_mapping, _stored(k_cache, k.transpose(0, 1)))
    v_cache.index_copy_(1, slot_mapping, _stored(v_cache, v.transpose(0, 1)))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q (num_tokens, num_heads, head_dim); k, v the same tokens' keys and values, already in
    the cache. Returns (num_tokens, num_heads * head_dim)."""
    out = torch.empty_like(q)
    if meta.num_decodes:
        out[: meta.num_decodes] = _decode_attention(q[: meta.num_decodes], cache, meta, scale)
    module = native_module() if meta.prefills and cache is not None and q.device.type == "cpu" else None
    for seq in meta.prefills:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        after_context = seq.slot_ids is not None
        if module is None or not module.prompt_attention_chosen(cache[0], q.shape[1], seq.query_len, after_context):
            # PyTorch's attention: a float32 cache, shapes or CPUs the kernels do not take, and on
            # CPUs with AMX-BF16 tiles chunks of many rows (kernels/prompt_attention.cpp)
            out[rows] = _prefill_attention(q[rows], k[rows], v[rows], cache, seq, scale)
        elif not after_context:  # a whole prompt: its own keys and values, as _prefill_attention takes them
            out[rows] = module.prompt_attention(q[rows].float(), k[rows].float(), v[rows].float(), scale).to(q.dtype)
        else:  # after a cached prefix: the context's rows read from the cache by slot
            out[rows] = module.paged_prompt_attention(q[rows].float(), *cache, seq.slot_ids, scale).to(q.dtype)
    return out.flatten(1)


def _gather(cache_part: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # index_select copies whole rows; advanced indexing takes a much slower generic path.
    num_kv_heads, head_dim = cache_part.shape[0], head_dim_of(cache_part)
    rows = _read(cache_part.index_select(1, slots.reshape(-1)), dtype)
    return rows.view(num_kv_heads, *slots.shape, head_dim)


def _gather_blocks(cache_part: torch.Tensor, blocks: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks of each sequence, (Hkv, S, max_blocks * block_size, D). Copying a block
    (block_size * D contiguous values) at a time beats slot by slot (bench/RESULTS.md, "Figures the
    code cites")."""
    num_kv_heads, num_slots, width = cache_part.shape
    num_seqs, max_blocks = blocks.shape
    block_size = length // max_blocks
    by_block = cache_part.view(num_kv_heads, num_slots // block_size, block_size * width)
    rows = by_block.index_select(1, blocks.reshape(-1)).view(num_kv_heads, num_seqs * length, width)
    return _read(rows, dtype).view(num_kv_heads, num_seqs, length, head_dim_of(cache_part))


FLOAT32_DECODE_SEQS = 8


def _decode_attention(q: torch.Tensor, cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # A grouped matmul + softmax beats SDPA for single-token queries on CPU.
    k_cache, v_cache = cache
    num_seqs, num_heads, head_dim = q.shape
    kernel = native_decode_attention() if meta.decode_kernel and q.device.type == "cpu" else None
    if kernel is not None:  # reads the blocks in place, faster than the gather + matmuls below
        return kernel(q.float().contiguous(), k_cache, v_cache, meta.decode_blocks, meta.decode_lens, meta.block_size,
                      scale)
    num_kv_heads = k_cache.shape[0]
    group = num_heads // num_kv_heads
    # Matmuls in the cache's dtype: a bf16 cache is read and multiplied without widening copies.
    # Few sequences widen to float32 instead: a bf16 batched matmul has a fixed cost several times
    # a float32 one of that size on CPU, and the widening copy is small (figures for this function:
    # bench/RESULTS.md, "Figures the code cites").
    dtype = torch.float32 if num_seqs <= FLOAT32_DECODE_SEQS else attention_dtype(k_cache)
    length = meta.decode_blocks.shape[1] * meta.block_size
    keys = _gather_blocks(k_cache, meta.decode_blocks, length, dtype)  # (Hkv, S, L, D)
    values = _gather_blocks(v_cache, meta.decode_blocks, length, dtype)  # (Hkv, S, L, D)
    q = q.view(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1).to(dtype)  # (Hkv, S, G, D)
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale  # (Hkv, S, G, L)
    probs = torch.softmax(scores + meta.decode_bias, dim=-1).to(dtype)  # softmax in fp32
    out = torch.matmul(probs, values).float()  # (Hkv, S, G, D)
    return out.transpose(0, 1).reshape(num_seqs, num_heads, head_dim)


def attention_dtype(cache_part: torch.Tensor) -> torch.dtype:
    """What attention over this cache computes in: its dtype, bfloat16 for int8 rows."""
    return torch.bfloat16 if cache_part.dtype == torch.int8 else cache_part.dtype


def _prefill_attention(q, k, v, cache, seq: PrefillSeq, scale: float) -> torch.Tensor:
    # In the cache's dtype: with a bf16 cache the flash kernel runs faster than in float32
    # (bench/RESULTS.md, "Figures the code cites") and accumulates in float32 either way.
    dtype = attention_dtype(cache[0]) if cache is not None else q.dtype
    if seq.slot_ids is None:
        mask, causal = None, True
        k, v = k.transpose(0, 1).to(dtype), v.transpose(0, 1).to(dtype)  # (Hkv, context_len, D)
    else:
        k_cache, v_cache = cache
        k = _gather(k_cache, seq.slot_ids, dtype)  # (Hkv, context_len, D)
        v = _gather(v_cache, seq.slot_ids, dtype)
        offset = seq.context_len - seq.query_len
        mask = torch.ones(seq.query_len, seq.context_len, dtype=torch.bool, device=q.device).tril(offset)
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0).to(dtype), k.unsqueeze(0), v.unsqueeze(0),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
    )  # (1, H, query_len, D)
    return out.squeeze(0).transpose(0, 1).to(q.dtype)
