"""The native prompt attention (kernels/prompt_attention.cpp): a prefill chunk's query rows, the
last of their context, attend causally to the context's cached rows, read by slot (or a whole
prompt to its own keys and values). Against a float32 reference over the same cached values (int8
rows widened as dequantize_rows does) with the query rounded to bf16 as the kernel rounds it. Its
bf16 path (AVX512-BF16) also rounds its softmax weights to bf16, which bounds the difference (~3e-3
measured); its float32 path (AVX2) keeps them, and comes within float32 rounding (~3e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import cpu_flags, native_module
from lmserve.model.attention import AttentionMetadata, PrefillSeq, dequantize_rows, paged_attention, quantize_rows, write_kv
from tests.helpers.attention_cases import prompt_kernel_path, random_cache, scattered_context

TOLERANCE = 1.5e-2
FLOAT32_TOLERANCE = 2e-5  # the float32 path: products and weights in float32
KERNEL_TOLERANCE = FLOAT32_TOLERANCE if prompt_kernel_path() == "float32" else TOLERANCE  # this CPU's path


def reference(q, values, slots, group, scale):
    """q (Lq, H, D) at the end of its context; values the float32 (Hkv, slots, D) keys and values."""
    query_len, context_len = q.shape[0], slots.numel()
    k, v = (part[:, slots].repeat_interleave(group, 0) for part in values)
    mask = torch.ones(query_len, context_len, dtype=torch.bool).tril(context_len - query_len)
    out = F.scaled_dot_product_attention(q.bfloat16().float().transpose(0, 1), k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def attend_or_refused(module, q, k_cache, v_cache, slots, scale):
    """The kernel's output, or None once it has refused by name a cache this CPU cannot take."""
    if module.prompt_attention_supported(k_cache, q.shape[1]):
        return module.paged_prompt_attention(q, k_cache, v_cache, slots, scale)
    with pytest.raises(RuntimeError, match="prompt attention"):
        module.paged_prompt_attention(q, k_cache, v_cache, slots, scale)
    return None


def test_the_kernel_takes_bf16_and_int8_caches_where_the_cpu_has_bf16_dot_products_or_avx2():
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    runs = prompt_kernel_path() is not None
    assert module.prompt_attention_supported(torch.zeros(2, 4, 64, dtype=torch.bfloat16), 6) == runs
    assert module.prompt_attention_supported(torch.zeros(2, 4, 128 + 4, dtype=torch.int8), 6) == runs
    assert not module.prompt_attention_supported(torch.zeros(2, 4, 64), 6)  # float32 keeps PyTorch's exact path
    assert not module.prompt_attention_supported(torch.zeros(2, 4, 80, dtype=torch.bfloat16), 6)  # not 32 | head_dim
    assert not module.prompt_attention_supported(torch.zeros(2, 4, 64, dtype=torch.bfloat16), 5)  # heads not grouped


def test_prefill_takes_pytorchs_attention_for_chunks_of_many_rows_where_the_cpu_has_amx_bf16_tiles():
    """PyTorch's flash attention runs its bf16 products on AMX tiles: from 128 rows of a whole
    prompt, and 24 (bf16 cache) or 32 (int8 cache) rows of a chunk after cached context, it is faster
    there than these kernels, which keep the chunks below that. Without the tiles the kernels take
    every chunk they can."""
    module = native_module()
    runs, tiles = prompt_kernel_path() is not None, module.amx_bf16_usable()
    assert tiles <= ("amx_bf16" in cpu_flags())  # never without the CPU's tiles
    bf16, int8 = torch.zeros(2, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 64 + 4, dtype=torch.int8)
    for cache, chunk_rows in ((bf16, 24), (int8, 32)):
        for rows, after_context, below in ((127, False, True), (128, False, False), (2000, False, False),
                                           (1, True, True), (chunk_rows - 1, True, True), (chunk_rows, True, False)):
            expected = runs and (below or not tiles)
            assert module.prompt_attention_chosen(cache, 6, rows, after_context) == expected, (cache.dtype, rows)
    assert not module.prompt_attention_chosen(torch.zeros(2, 4, 64), 6, 1, False)  # float32: PyTorch's exact path
    assert not module.prompt_attention_chosen(torch.zeros(2, 4, 80, dtype=torch.int8), 6, 1, False)  # not taken


@pytest.mark.parametrize("query_len, context_len, num_kv_heads, group, head_dim, cache_dtype", [
    (11, 11, 2, 3, 64, torch.bfloat16),  # a whole prompt, part of one 16-key chunk
    (5, 40, 2, 3, 64, torch.bfloat16),  # a chunk after a cached prefix
    (1, 17, 1, 7, 64, torch.bfloat16),  # one row, the last chunk holding one key
    (33, 70, 2, 7, 128, torch.int8),  # seven heads a task, int8 rows and their scales
    (16, 16, 1, 16, 64, torch.bfloat16),  # a group split over two tasks of 8 heads
    (7, 300, 3, 1, 32, torch.int8),  # one head a task, twelve rows
    (50, 50, 2, 5, 96, torch.bfloat16),  # five heads, head_dim 96
    (200, 1000, 2, 2, 64, torch.bfloat16),  # long rows, many tasks over both threads
    (3, 3, 4, 11, 64, torch.int8),  # a prime group: one head a task
    (9, 9, 1, 4, 64, torch.bfloat16),  # four heads a task, three rows
    (20, 30, 2, 6, 64, torch.int8),  # six heads a task
    (12, 12, 1, 8, 256, torch.bfloat16),  # eight heads a task, the widest head_dim taken
])
def test_native_prompt_attention_matches_a_float32_reference(query_len, context_len, num_kv_heads, group, head_dim,
                                                            cache_dtype):
    module = native_module()
    g = torch.Generator().manual_seed(query_len * 1000 + context_len)
    num_slots = context_len + 37
    (k_cache, v_cache), values = random_cache(num_kv_heads, num_slots, head_dim, cache_dtype, g, torch.bfloat16)
    slots = torch.randperm(num_slots, generator=g)[:context_len]  # scattered, in no order
    q = 2 * torch.randn(query_len, num_kv_heads * group, head_dim, generator=g)  # sharp weights: a mask slip shows
    scale = head_dim ** -0.5
    out = attend_or_refused(module, q, k_cache, v_cache, slots, scale)
    if out is None:
        return
    expected = reference(q, values, slots, group, scale)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=KERNEL_TOLERANCE), (out - expected).abs().max()
    shifted = reference(q, values, slots, group, scale * 1.25)  # the comparison can tell a wrong scale apart
    assert not torch.allclose(out, shifted, atol=TOLERANCE)


@pytest.mark.parametrize("rising", [True, False])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
def test_native_prompt_attention_rescales_as_the_maximum_moves(rising, cache_dtype):
    """Keys whose scores grow (or shrink) by tens from one 16-key chunk to the next move each
    row's running maximum far; its outputs must still be the reference's."""
    module = native_module()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 100, 64, generator=g)
    steps = torch.arange(100) // 16
    k = k * (1 + 8 * (steps if rising else 6 - steps))[None, :, None]
    stored = [quantize_rows(p) if cache_dtype == torch.int8 else p.to(cache_dtype) for p in (k, v)]
    values = [dequantize_rows(p, torch.bfloat16).float() if cache_dtype == torch.int8 else p.float() for p in stored]
    q = torch.randn(40, 6, 64, generator=g)
    slots = torch.arange(100)
    out = attend_or_refused(module, q, *stored, slots, 0.125)
    if out is None:
        return
    expected = reference(q, values, slots, 3, 0.125)
    assert torch.allclose(out, expected, atol=KERNEL_TOLERANCE), (out - expected).abs().max()
    scores = q[-1, 0].bfloat16().float() @ values[0][0].T * 0.125
    assert scores.max() - scores.min() > 100  # weights from 1 down to exp(-100), past float32's range


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
def test_paged_attention_prefills_through_the_kernels_whole_or_after_a_cached_prefix(cache_dtype):
    """A whole prompt attends to its own keys and values as computed (rounded to bf16, the PyTorch
    path's dtype for these caches); a second chunk reads the first from the cache, int8 rows as
    their values: each equals one causal pass over what it reads."""
    num_kv_heads, group, head_dim, block = 2, 3, 64, 16
    total, first = 45, 29
    q, k, v, slots = scattered_context(total, num_kv_heads, group, head_dim, block, [3, 0, 2], seed=11)
    width = head_dim + (4 if cache_dtype == torch.int8 else 0)
    cache = tuple(torch.zeros(num_kv_heads, 4 * block, width, dtype=cache_dtype) for _ in range(2))
    write_kv(cache, k, v, slots)
    scale = head_dim ** -0.5
    whole = paged_attention(q[:first], k[:first], v[:first], cache,
                            AttentionMetadata(slots[:first], 0, None, None, [PrefillSeq(0, first, first, None)]), scale)
    own = [x[:first].transpose(0, 1).bfloat16().float() for x in (k, v)]  # (Hkv, first, D)
    expected = reference(q[:first], own, torch.arange(first), group, scale).flatten(1)
    assert torch.allclose(whole, expected, atol=KERNEL_TOLERANCE), (whole - expected).abs().max()
    rows = slice(first, total)
    rest = paged_attention(q[rows], k[rows], v[rows], cache,
                           AttentionMetadata(slots[rows], 0, None, None, [PrefillSeq(0, total - first, total, slots)]),
                           scale)
    values = [dequantize_rows(p, torch.bfloat16).float() if cache_dtype == torch.int8 else p.float() for p in cache]
    expected = reference(q, values, slots, group, scale).flatten(1)[rows]
    assert torch.allclose(rest, expected, atol=KERNEL_TOLERANCE), (rest - expected).abs().max()


def test_a_whole_prompt_without_a_kernel_shape_is_refused_by_name():
    module = native_module()
    q, k = torch.zeros(4, 6, 80), torch.zeros(4, 2, 80)  # head_dim 80: not a multiple of 32
    with pytest.raises(RuntimeError, match="prompt attention"):
        module.prompt_attention(q, k, k, 0.1)
