"""The native RMSNorm (kernels/decoder.cpp's rms_norm_rows), which both the C++ layers and
model/llama.py's RMSNorm run: against F.rms_norm to float32 rounding, on the 16-wide path, its
scalar tail, zero rows and large values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import native_module
from lmserve.model.llama import RMSNorm


@pytest.mark.parametrize("rows, cols", [(1, 576), (33, 576), (5, 40), (3, 7), (130, 64)])
def test_native_rms_norm_agrees_with_torch(rows, cols):
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g) * 3
    x[0, 1] = 900.0  # one channel far larger than the rest
    if rows > 2:
        x[1] = 0  # eps keeps a zero row finite (and zero)
    weight = torch.rand(cols, generator=g) + 0.5
    got = module.rms_norm_rows(x, weight, 1e-5)
    expected = F.rms_norm(x, (cols,), weight, 1e-5)
    assert torch.allclose(got, expected, rtol=2e-6, atol=1e-6), (got - expected).abs().max()
    if rows > 2:
        assert torch.equal(got[1], torch.zeros(cols))
    # and it is a norm: each row's mean square, weight divided out, is 1
    ms = (got / weight).pow(2).mean(-1)
    assert torch.allclose(ms[ms > 0], torch.ones_like(ms[ms > 0]), rtol=1e-4)


def test_rms_norm_module_takes_the_native_op_for_float32_and_torch_for_bf16():
    module = native_module()
    norm = RMSNorm(576, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576) + 0.5)
    x = torch.randn(9, 576)
    assert torch.equal(norm(x), module.rms_norm_rows(x, norm.weight, 1e-6))
    norm.to(torch.bfloat16)
    assert torch.equal(norm(x), F.rms_norm(x, (576,), norm.weight, 1e-6))


def test_native_rms_norm_refuses_mismatched_weights():
    module = native_module()
    with pytest.raises(RuntimeError, match="weight"):
        module.rms_norm_rows(torch.randn(2, 8), torch.ones(7), 1e-6)
