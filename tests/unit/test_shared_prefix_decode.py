"""Decode attention over prefixes several sequences share (kernels/paged_attention.cpp,
shared_prefixes): sequences whose block tables begin with the same blocks of a bf16 cache attend to
those once together (the prompt kernel's products, kernels/prompt_attention.cpp) and then each to its
own positions from that state. Each row must still be its own attention over its whole context, as
the decode kernel gives it alone and as a float32 reference does, whatever the grouping (the shared
part rounds its softmax weights to bf16, as a prompt's attention does: ~1e-3); rows no group took
are the decode kernel's bit for bit; and the shared pass must run exactly where its rule says.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lmserve.kernels import cpu_flags, native_module
from tests.helpers.attention_cases import block_slots, random_cache

BLOCK = 16
TOLERANCE = 1e-2  # the shared part's bf16 weights (measured: up to 1.2e-3 on these cases)
PLAIN_TOLERANCE = 1e-4  # the decode kernel alone: float32 weights (measured: within 4e-6)
EVENT = "lmserve::shared_prefix_attention"


def layout(sequences, num_blocks, block=BLOCK):
    """sequences: (shared blocks, their first block id, own positions) per sequence. Shared blocks are
    numbered from the id given; each sequence's own blocks come after every shared one, its own."""
    next_block = num_blocks
    rows, lens = [], []
    for shared, first, own in sequences:
        own_blocks = list(range(next_block, next_block + (own + block - 1) // block))
        next_block += len(own_blocks)
        rows.append(list(range(first, first + shared)) + own_blocks)
        lens.append(shared * block + own)
    width = max(map(len, rows))
    table = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    return table, torch.tensor(lens), next_block


def reference(q, values, table, lens, group, scale, cache_dtype, block=BLOCK):
    """Each sequence's one query row over its whole context, in float32 (over a bf16 cache the query
    rounded to bf16, as the kernels round it there)."""
    out = torch.empty_like(q)
    q = q.bfloat16().float() if cache_dtype == torch.bfloat16 else q
    for s, length in enumerate(lens.tolist()):
        slots = block_slots(table[s], block, length)
        k, v = (part[:, slots].repeat_interleave(group, 0) for part in values)  # (H, L, D)
        weights = torch.softmax(torch.einsum("hd,hld->hl", q[s], k) * scale, dim=-1)
        out[s] = torch.einsum("hl,hld->hd", weights, v)
    return out


def shared_passes(module, *args, share_prefixes=True):
    """The kernel's output and how many shared passes it ran (one per sharing group)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = module.paged_decode_attention(*args, share_prefixes=share_prefixes)
    return out, sum(event.count for event in prof.key_averages() if event.key == EVENT)


def shares_here(cache_dtype):
    return cache_dtype == torch.bfloat16 and "avx512_bf16" in cpu_flags()


# Two groups the rule takes (17 sequences sharing 64 blocks; 16 sharing 66, one of them only 64), and
# sequences it leaves alone: one by itself, three sharing 66 blocks (too few), 8 sharing 30 (too few
# positions).
SEQUENCES = ([(64, 0, own) for own in (1, 7, 16, 17, 33, 40, 3, 29, 12, 5, 9, 14, 31, 2, 21, 38, 26)]
             + [(66, 100, own) for own in (5, 9, 14, 31, 2, 40, 21, 1, 7, 16, 17, 33, 3, 29, 12)] + [(64, 100, 8)]
             + [(30, 200, 11)] + [(66, 300, own) for own in (4, 18, 9)]
             + [(30, 400, own) for own in (6, 13, 2, 27, 8, 19, 1, 36)])


@pytest.mark.parametrize("num_kv_heads, group, head_dim, cache_dtype, block", [
    (2, 3, 64, torch.bfloat16, 16),  # SmolLM2's group
    (2, 3, 64, torch.bfloat16, 24),  # shared contexts that end inside a 16-key chunk
    (1, 7, 128, torch.bfloat16, 16),  # seven heads
    (2, 1, 64, torch.bfloat16, 16),  # one query head per kv head
    (1, 8, 128, torch.bfloat16, 32),  # the widest group the decode kernel is built for
    (2, 2, 64, torch.int8, 16),  # int8 rows keep the decode kernel's float32 query: nothing shared
    (2, 3, 64, torch.float32, 16),  # nor over float32 rows
])
def test_sequences_sharing_a_prefix_attend_each_over_its_whole_context(num_kv_heads, group, head_dim, cache_dtype,
                                                                      block):
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    g = torch.Generator().manual_seed(group * 1000 + head_dim)
    order = torch.randperm(len(SEQUENCES), generator=g).tolist()  # a group's members need not be neighbours
    table, lens, num_blocks = layout([SEQUENCES[i] for i in order], num_blocks=500, block=block)
    (k_cache, v_cache), values = random_cache(num_kv_heads, num_blocks * block, head_dim, cache_dtype, g)
    q = 2 * torch.randn(len(order), num_kv_heads * group, head_dim, generator=g)  # sharp weights: a slip shows
    scale = head_dim ** -0.5
    args = (q, k_cache, v_cache, table, lens, block, scale)
    out, passes = shared_passes(module, *args)
    alone, none = shared_passes(module, *args, share_prefixes=False)
    assert none == 0
    assert passes == (2 if shares_here(cache_dtype) else 0)
    expected = reference(q, values, table, lens, group, scale, cache_dtype, block)
    assert torch.allclose(out, expected, atol=TOLERANCE), (out - expected).abs().max()
    assert torch.allclose(alone, expected, atol=PLAIN_TOLERANCE), (alone - expected).abs().max()
    assert torch.allclose(out, alone, atol=TOLERANCE), (out - alone).abs().max()
    shifted = reference(q, values, table, lens, group, scale * 1.25, cache_dtype, block)  # the comparison can tell a wrong scale apart
    assert not torch.allclose(out, shifted, atol=TOLERANCE)
    # Rows of sequences no group took are the plain kernel's, bit for bit.
    left_alone = [i for i, s in enumerate(order) if SEQUENCES[s][1] >= 200]
    assert torch.equal(out[left_alone], alone[left_alone])


@pytest.mark.parametrize("sequences, passes", [
    ([(64, 0, 10)] * 16, 1),  # 16 sequences sharing 1,024 positions, few of their own
    ([(64, 0, 10)] * 15, 0),  # 15 x 1,024 shared reads: under 16,384
    ([(32, 0, 10)] * 32, 1),  # 32 x 512
    ([(31, 0, 10)] * 40, 0),  # 496 shared positions
    ([(160, 0, 10)] * 7, 0),  # 7 sequences
    ([(64, 0, 520)] * 16, 0),  # own positions more than half the shared ones
    ([(64, 0, 500)] * 16, 1),  # just under half
    ([(64, 0, 10)] * 8 + [(64, 0, 10)] * 8, 1),  # one first block: one group of 16
    ([(1, 0, 600)] + [(64, 0, 10)] * 16, 1),  # one that parts after a block does not cut the rest's prefix short
    ([(64, 0, 1)] + [(66, 0, 10)] * 15, 1),  # the first sequence the shortest: 64 blocks shared
])
def test_a_shared_pass_runs_where_enough_sequences_share_enough_positions(sequences, passes):
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    table, lens, num_blocks = layout(sequences, num_blocks=max(shared for shared, _, _ in sequences))
    g = torch.Generator().manual_seed(len(sequences))
    (k_cache, v_cache), values = random_cache(1, num_blocks * BLOCK, 64, torch.bfloat16, g)
    q = torch.randn(len(sequences), 3, 64, generator=g)
    out, ran = shared_passes(module, q, k_cache, v_cache, table, lens, BLOCK, 0.125)
    assert ran == (passes if shares_here(torch.bfloat16) else 0)
    expected = reference(q, values, table, lens, 3, 0.125, torch.bfloat16)
    assert torch.allclose(out, expected, atol=TOLERANCE), (out - expected).abs().max()
