"""W8A8 projections (model/int8.py, kernels/int8_linear.cpp): the compiled kernel against the ATen
reference bit for bit, the blockwise Hadamard transform against the matrix it stands for, and what
the transform is for: a row with one large channel quantizes far better after it."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import native_module
from lmserve.model.int8 import (
    hadamard_block,
    hadamard_rows,
    int8_linear,
    int8_linear_reference,
    quantize_rows_reference,
    rotate_weight,
)
from lmserve.model.llama import quantize_int8


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def w8a8_case(rows, cols, out, seed, outlier=40.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    x[:, 1] *= outlier  # one channel far larger than the rest, as these models have
    if rows > 2:
        x[0] = 0  # an all-zero row still gets a finite scale
    weight = torch.randn(out, cols, generator=g) * 0.05
    bias = torch.randn(out, generator=g).bfloat16()
    return x, weight, bias


def test_block_is_the_largest_power_of_two_up_to_64_dividing_k():
    assert [hadamard_block(k) for k in (576, 1536, 96, 24, 40, 7)] == [64, 64, 32, 8, 8, 1]


@pytest.mark.parametrize("block", [1, 2, 8, 16, 64])
def test_hadamard_rows_is_the_sylvester_matrix_blockwise(block):
    x = torch.randn(5, 128, dtype=torch.float64)
    expected = (x.view(5, 128 // block, block) @ sylvester(block)).view(5, 128)
    assert torch.allclose(hadamard_rows(x, block), expected, atol=1e-12)


def test_rotated_weights_cancel_the_transform():
    x, weight, _ = w8a8_case(4, 192, 24, seed=0)
    rotated = rotate_weight(weight, 64)
    assert torch.allclose(hadamard_rows(x.double(), 64) @ rotated.double().t(), x.double() @ weight.double().t(),
                          atol=1e-4)


@pytest.mark.parametrize("rows, cols, out", [(1, 24, 5), (3, 576, 960), (9, 96, 37), (64, 576, 3072),
                                             (300, 1536, 576), (5, 16, 8)])
def test_kernel_matches_the_reference_bit_for_bit(rows, cols, out):
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    x, weight, bias = w8a8_case(rows, cols, out, seed=rows)
    block = hadamard_block(cols)
    q, scales = quantize_int8(rotate_weight(weight, block))
    for b in (None, bias):
        expected = int8_linear_reference(x, q, scales.float(), b, block)
        assert torch.equal(module.int8_linear(x, q, scales.float(), b, block), expected)
        assert torch.equal(int8_linear(x, q, scales.float(), b, block), expected)
    for blk in {1, block}:
        q_ref, s_ref = quantize_rows_reference(x, blk)
        q_native, s_native = module.quantize_rows(x, blk)
        assert torch.equal(q_native, q_ref) and torch.equal(s_native, s_ref), blk


def test_rows_round_half_to_even_and_saturate_at_127():
    values = [127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 63.5, -127.0]  # scale exactly 1
    expected = [127, 0, 2, 2, 0, -2, 64, -127]
    x = torch.tensor([values * 5])  # 40 columns: the kernel's 16-wide path and its scalar tail
    q, scales = quantize_rows_reference(x)
    assert scales.item() == 1.0
    assert q.tolist() == [expected * 5]
    assert torch.equal(native_module().quantize_rows(x, 1)[0], q)


def test_the_transform_is_what_makes_an_outlier_row_quantize_well():
    x, weight, _ = w8a8_case(32, 576, 256, seed=3)
    exact = x @ weight.t()
    plain_q, plain_s = quantize_int8(weight)
    plain = int8_linear_reference(x, plain_q, plain_s.float(), None, 1)
    rot_q, rot_s = quantize_int8(rotate_weight(weight, 64))
    rotated = int8_linear_reference(x, rot_q, rot_s.float(), None, 64)
    plain_error = (plain - exact).abs().mean().item()
    rotated_error = (rotated - exact).abs().mean().item()
    assert rotated_error < plain_error / 2.5, (rotated_error, plain_error)
    assert rotated_error < 0.05 * exact.abs().mean().item()
