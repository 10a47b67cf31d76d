"""The int8 KV cache's rows (head_dim int8 values, then their float32 scale): quantized within half
a step, and read as the values they stand for by the native decode kernel (tiled and generic) and
by the PyTorch path, against the same attention over the dequantized rows in float32."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import paged_decode_attention
from lmserve.model.attention import AttentionMetadata, _decode_attention, dequantize_rows, quantize_rows, write_kv

BLOCK_SIZE = 16


def test_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 64) * torch.logspace(-3, 2, 7)[None, :, None]  # rows of very different sizes
    rows = quantize_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 7, 68)
    step = x.abs().amax(-1, keepdim=True) / 127
    error = (dequantize_rows(rows, torch.float32) - x).abs()
    assert (error <= step * 0.5001).all()
    assert (rows[..., :64].abs().amax(-1) == 127).all()  # the largest value uses the whole range
    zeros = quantize_rows(torch.zeros(2, 64))
    assert torch.equal(dequantize_rows(zeros, torch.float32), torch.zeros(2, 64))


def test_write_kv_stores_quantized_rows_in_their_slots():
    cache = (torch.zeros(2, 64, 36, dtype=torch.int8), torch.zeros(2, 64, 36, dtype=torch.int8))
    k, v = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    slots = torch.tensor([5, 17, 40])
    write_kv(cache, k, v, slots)
    assert torch.equal(cache[0][:, slots], quantize_rows(k.transpose(0, 1)))
    assert torch.equal(cache[1][:, slots], quantize_rows(v.transpose(0, 1)))
    assert not cache[0][:, 6].any()


def decode_case(group: int, head_dim: int, seed: int = 0):
    torch.manual_seed(seed)
    num_kv_heads, num_blocks = 2, 12
    k = torch.randn(num_kv_heads, num_blocks * BLOCK_SIZE, head_dim)
    v = torch.randn(num_kv_heads, num_blocks * BLOCK_SIZE, head_dim) * 3
    table = torch.stack([torch.randperm(num_blocks)[:4] for _ in range(3)])  # (3 sequences, 4 blocks)
    lens = torch.tensor([1, 37, 64])
    q = torch.randn(3, num_kv_heads * group, head_dim)
    return q, quantize_rows(k), quantize_rows(v), table, lens


@pytest.mark.parametrize("group, head_dim", [(3, 64), (1, 128), (2, 32)])  # 32: the generic loop, not the tiles
def test_the_native_kernel_reads_int8_rows_as_their_values(group, head_dim):
    kernel = paged_decode_attention()
    assert kernel is not None, "the native kernels are built by scripts/setup.sh"
    q, k_rows, v_rows, table, lens = decode_case(group, head_dim)
    scale = head_dim ** -0.5
    out = kernel(q, k_rows, v_rows, table, lens, BLOCK_SIZE, scale)
    k_float, v_float = dequantize_rows(k_rows, torch.float32), dequantize_rows(v_rows, torch.float32)
    reference = kernel(q, k_float, v_float, table, lens, BLOCK_SIZE, scale)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_seqs_dtype", ["float32", "bfloat16"])
def test_the_pytorch_path_reads_int8_rows_as_their_values(num_seqs_dtype):
    q, k_rows, v_rows, table, lens = decode_case(3, 64, seed=1)
    if num_seqs_dtype == "bfloat16":  # past FLOAT32_DECODE_SEQS sequences the path computes in bf16
        q, table, lens = q.repeat(4, 1, 1), table.repeat(4, 1), lens.repeat(4)
    meta = AttentionMetadata(torch.zeros(len(lens), dtype=torch.long), len(lens), table, lens, [], BLOCK_SIZE,
                             decode_kernel=False)
    out = _decode_attention(q, (k_rows, v_rows), meta, 0.125)
    floats = (dequantize_rows(k_rows, torch.float32), dequantize_rows(v_rows, torch.float32))
    reference = _decode_attention(q, floats, meta, 0.125)
    tolerance = 1e-5 if num_seqs_dtype == "float32" else 3e-2
    torch.testing.assert_close(out, reference, atol=tolerance, rtol=tolerance)
