"""The native silu(gate) * up (kernels/decoder.cpp's silu_mul_rows), which both the C++ layers and
model/llama.py's MLP run: against F.silu(gate) * up to float32 rounding, on the 16-wide path and
its scalar tail, with large and tiny gates; the module takes it for float32 rows and ATen's two ops
otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import native_module
from lmserve.model.config import ModelConfig
from lmserve.model.llama import MLP


@pytest.mark.parametrize("rows, width", [(1, 4864), (64, 1536), (5, 40), (3, 7), (130, 16)])
def test_native_silu_mul_agrees_with_torch(rows, width):
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    g = torch.Generator().manual_seed(rows * width)
    gate_up = torch.randn(rows, 2 * width, generator=g) * 4
    gate_up[0, 0], gate_up[0, 1], gate_up[0, 2] = 90.0, -90.0, 0.0  # exp's clamp either way, and silu(0) = 0
    got = module.silu_mul_rows(gate_up)
    expected = F.silu(gate_up[:, :width]) * gate_up[:, width:]
    assert got.shape == (rows, width)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got - expected).abs().max()
    assert got[0, 0] == pytest.approx(90.0 * gate_up[0, width].item(), rel=1e-6)
    assert abs(got[0, 1].item()) < 1e-30 and got[0, 2].item() == 0.0


def test_mlp_takes_the_native_op_for_float32_rows():
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    config = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1})
    mlp = MLP(config)
    mlp.prepare(torch.float32)
    x = torch.randn(7, 32)
    gate_up = mlp.gate_up_proj(x)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.down_proj(module.silu_mul_rows(gate_up)))


def test_native_silu_mul_refuses_odd_widths():
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    with pytest.raises(RuntimeError, match="gate_up"):
        module.silu_mul_rows(torch.randn(2, 7))


@pytest.mark.parametrize("width", [16, 19])  # the 16-wide path; then its scalar tail too
def test_native_silu_mul_edge_gates_agree_with_torch(width):
    """Gates past exp's range (silu -0, and NaN for -inf as ATen gives it), infinities and NaN, in
    the vector lanes and in the scalar tail."""
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    edges = torch.tensor([float("-inf"), float("nan"), -1e4, -88.5, -88.0, 88.5, 1e4, float("inf")])
    gate = torch.linspace(-3, 3, width)
    gate[:8] = edges
    if width > 16:
        gate[16:] = edges[[0, 1, 2]]
    up = torch.linspace(0.5, 2, width)
    got = module.silu_mul_rows(torch.cat([gate, up])[None])
    torch.testing.assert_close(got, (F.silu(gate) * up)[None], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got[0, 0].isnan() and got[0, 1].isnan() and got[0, 7] == float("inf")


def test_silu_mul_falls_back_to_torch_beyond_two_dimensions_and_for_bfloat16():
    """ATen's silu and mul, on the row split in the middle as the MLP splits it."""
    module = native_module()
    assert module is not None, "native kernels not built: run python -m lmserve.kernels"
    x = torch.randn(2, 3, 10)
    assert torch.equal(module.silu_mul(x), F.silu(x[..., :5]) * x[..., 5:])
    rows = torch.randn(7, 96).bfloat16()
    gate, up = rows.split(48, dim=-1)
    assert torch.equal(module.silu_mul(rows), F.silu(gate) * up)
