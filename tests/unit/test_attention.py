"""Batched decode attention over a paged bf16 cache, against a float32 reference per sequence:
few sequences widen to float32 before the matmuls, more multiply in bf16; both must attend
to exactly each sequence's own context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import paged_decode_attention as native_decode_attention
from lmserve.model.attention import (
    FLOAT32_DECODE_SEQS,
    AttentionMetadata,
    PrefillSeq,
    paged_attention,
)
from tests.helpers.attention_cases import scattered_context

HKV, GROUP, D, BLOCK = 2, 3, 16, 4


def reference(q, k_cache, v_cache, blocks, length):
    slots = (torch.tensor(blocks)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]
    k = k_cache[:, slots].float().repeat_interleave(GROUP, 0)  # (H, L, D)
    v = v_cache[:, slots].float().repeat_interleave(GROUP, 0)
    return F.scaled_dot_product_attention(q[:, None], k, v, scale=D ** -0.5)[:, 0]  # (H, D)


@pytest.mark.parametrize("num_seqs", [1, FLOAT32_DECODE_SEQS, FLOAT32_DECODE_SEQS + 1, 24])
def test_decode_attention_matches_reference(num_seqs):
    g = torch.Generator().manual_seed(num_seqs)
    num_blocks = 4 * num_seqs + 1
    k_cache = torch.randn(HKV, num_blocks * BLOCK, D, generator=g).bfloat16()
    v_cache = torch.randn(HKV, num_blocks * BLOCK, D, generator=g).bfloat16()
    order = torch.randperm(num_blocks, generator=g).tolist()
    lengths = [int(x) for x in torch.randint(1, 4 * BLOCK + 1, (num_seqs,), generator=g)]
    tables = [order[4 * i: 4 * i + (n + BLOCK - 1) // BLOCK] for i, n in enumerate(lengths)]
    max_blocks = max(len(t) for t in tables)
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.long)  # padding points at block 0
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    q = torch.randn(num_seqs, HKV * GROUP, D, generator=g)
    meta = AttentionMetadata(torch.zeros(num_seqs, dtype=torch.long), num_seqs, table, torch.tensor(lengths), [],
                             BLOCK, decode_kernel=False)
    out = paged_attention(q, q, q, (k_cache, v_cache), meta, D ** -0.5).view(num_seqs, HKV * GROUP, D)
    for i in range(num_seqs):
        expected = reference(q[i], k_cache, v_cache, tables[i], lengths[i])
        tolerance = 1e-5 if num_seqs <= FLOAT32_DECODE_SEQS else 3e-2  # bf16 rounds q and the probabilities
        assert torch.allclose(out[i], expected, atol=tolerance), (i, (out[i] - expected).abs().max())


@pytest.mark.parametrize("cache_dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunked_prefill_attends_like_one_shot(cache_dtype, tolerance):
    """A second chunk reads the first from the paged cache (in the cache's dtype) and must
    equal one causal pass over the whole context."""
    total, first = 11, 6
    q, k, v, slots = scattered_context(total, HKV, GROUP, D, BLOCK, [2, 0, 3], seed=7)
    k_cache = torch.zeros(HKV, 4 * BLOCK, D, dtype=cache_dtype)
    v_cache = torch.zeros(HKV, 4 * BLOCK, D, dtype=cache_dtype)
    k_cache[:, slots] = k.transpose(0, 1).to(cache_dtype)
    v_cache[:, slots] = v.transpose(0, 1).to(cache_dtype)
    rows = slice(first, total)
    meta = AttentionMetadata(slots[rows], 0, None, None, [PrefillSeq(0, total - first, total, slots)])
    out = paged_attention(q[rows], k[rows], v[rows], (k_cache, v_cache), meta, D ** -0.5)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(GROUP, 0), v.transpose(0, 1).repeat_interleave(GROUP, 0),
        is_causal=True, scale=D ** -0.5).transpose(0, 1)[rows].flatten(1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=tolerance), (out - expected).abs().max()


def paged_case(num_seqs, num_kv_heads, group, head_dim, cache_dtype, seed, block_size=4, max_len=23):
    g = torch.Generator().manual_seed(seed)
    per_seq = (max_len + block_size - 1) // block_size
    num_blocks = num_seqs * per_seq + 1
    k_cache = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_kv_heads, num_blocks * block_size, head_dim, generator=g).to(cache_dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    lens = [int(x) for x in torch.randint(1, max_len + 1, (num_seqs,), generator=g)]
    lens[0] = max_len
    tables = [order[per_seq * i: per_seq * i + (n + block_size - 1) // block_size] for i, n in enumerate(lens)]
    width = max(len(t) for t in tables)
    table = torch.zeros(num_seqs, width, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t)
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=g)
    slots = torch.zeros(num_seqs, dtype=torch.long)
    with_lens = AttentionMetadata(slots, num_seqs, table, torch.tensor(lens), [], block_size)
    without = AttentionMetadata(slots, num_seqs, table, torch.tensor(lens), [], block_size, decode_kernel=False)
    return q, (k_cache, v_cache), with_lens, without


@pytest.mark.parametrize("num_seqs, num_kv_heads, group, head_dim, block_size, max_len", [
    (5, 2, 1, 32, 4, 23), (24, 1, 7, 24, 4, 23), (2, 1, 3, 20, 4, 19),  # the generic kernel (head_dim not 64/128)
    (1, 3, 3, 64, 4, 23), (3, 3, 3, 64, 16, 150), (2, 1, 1, 64, 16, 77), (4, 2, 4, 128, 16, 61),
    (3, 1, 8, 64, 8, 40),  # the tiled kernel, blocks of 4-16 positions
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_native_decode_kernel_matches_the_pytorch_path(num_seqs, num_kv_heads, group, head_dim, block_size, max_len,
                                                       cache_dtype):
    """The compiled kernel (built by scripts/setup.sh; this fails if it was not) reads the blocks
    in place; head_dim 24 and 20 exercise its 8-lane step and scalar tail (AVX-512: 16 lanes and
    the tail), group 7 a long group of query heads, head_dim 64/128 the tiled kernel (AVX-512; the
    generic one on AVX2) over several 16-position tiles with a partial last one. A bf16 cache is
    attended with the query rounded to bf16 (every product then exact in float32)."""
    assert native_decode_attention() is not None, "native kernel not built: run python -m lmserve.kernels"
    q, cache, with_lens, without = paged_case(num_seqs, num_kv_heads, group, head_dim, cache_dtype, seed=num_seqs,
                                              block_size=block_size, max_len=max_len)
    native = paged_attention(q, q, q, cache, with_lens, head_dim ** -0.5)
    # The PyTorch path in float32 throughout (few sequences widen the cache; compare against that
    # precision whatever the batch size).
    float_cache = tuple(c.float() for c in cache)
    q_used = q.bfloat16().float() if cache_dtype == torch.bfloat16 else q
    expected = paged_attention(q_used, q_used, q_used, float_cache, without, head_dim ** -0.5)
    assert torch.allclose(native, expected, atol=2e-5), (native - expected).abs().max()
    if cache_dtype == torch.bfloat16:  # the rounding is real: the unrounded query gives other outputs
        unrounded = paged_attention(q, q, q, float_cache, without, head_dim ** -0.5)
        assert not torch.allclose(native, unrounded, atol=2e-5)


@pytest.mark.parametrize("rising", [True, False])
def test_native_decode_kernel_rescales_as_the_maximum_moves(rising):
    """The tiled kernel keeps a running softmax over 16-position chunks: keys whose scores grow by
    tens from one chunk to the next (or shrink) move the maximum far, mostly upward (or mostly not
    past the first chunk), with weights from 1 down to underflow; its outputs must still be the
    PyTorch path's."""
    assert native_decode_attention() is not None, "native kernel not built: run python -m lmserve.kernels"
    q, (k_cache, v_cache), with_lens, without = paged_case(3, 2, 3, 64, torch.float32, seed=7, block_size=16, max_len=100)
    for s, n in enumerate(with_lens.decode_lens.tolist()):
        for t in range(n):
            slot = int(with_lens.decode_blocks[s, t // 16]) * 16 + t % 16
            step = t // 16 if rising else 6 - t // 16
            k_cache[:, slot] *= 1 + 8 * step
    native = paged_attention(q, q, q, (k_cache, v_cache), with_lens, 64 ** -0.5)
    expected = paged_attention(q, q, q, (k_cache, v_cache), without, 64 ** -0.5)
    assert torch.allclose(native, expected, atol=2e-5), (native - expected).abs().max()
    n = int(with_lens.decode_lens[0])
    slots = (with_lens.decode_blocks[0, :, None] * 16 + torch.arange(16)).flatten()[:n]
    scores = q[0, 0] @ k_cache[0, slots].T * 64 ** -0.5
    assert scores.max() - scores.min() > 100  # weights from 1 down to exp(-100), past float32's range
