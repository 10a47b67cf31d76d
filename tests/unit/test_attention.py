"""Batched decode attention over a paged bf16 cache, against a float32 reference per sequence:
few sequences widen to float32 before the matmuls, more multiply in bf16; both must attend
to exactly each sequence's own context."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.model.attention import FLOAT32_DECODE_SEQS, AttentionMetadata, paged_attention

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
    bias = torch.full((num_seqs, 1, max_blocks * BLOCK), float("-inf"))
    for i, (t, n) in enumerate(zip(tables, lengths)):
        table[i, : len(t)] = torch.tensor(t)
        bias[i, :, :n] = 0
    q = torch.randn(num_seqs, HKV * GROUP, D, generator=g)
    meta = AttentionMetadata(torch.zeros(num_seqs, dtype=torch.long), num_seqs, table, bias, [])
    out = paged_attention(q, q, q, (k_cache, v_cache), meta, D ** -0.5).view(num_seqs, HKV * GROUP, D)
    for i in range(num_seqs):
        expected = reference(q[i], k_cache, v_cache, tables[i], lengths[i])
        tolerance = 1e-5 if num_seqs <= FLOAT32_DECODE_SEQS else 3e-2  # bf16 rounds q and the probabilities
        assert torch.allclose(out[i], expected, atol=tolerance), (i, (out[i] - expected).abs().max())
