"""Quantized copies of a Linear (model/linear.py): exactness on weights that already sit on a 4-bit
grid, the shape fallback, and which weight format a step of a given size takes (W4A8 at every step
for int4 where the kernels run; elsewhere weight-only int8 / int4 copies for small steps and W8A8 or
bf16 for larger ones)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.model import linear
from lmserve.model.linear import SMALL_STEP_TOKENS, Linear
from lmserve.model.weight_formats import floating
from lmserve.model.weight_formats.floating import Bf16Panels, FloatWeight, OneDNNPackedWeight
from lmserve.model.weight_formats.int4 import (INT4_GROUP, Int4WeightOnly, W4A8Pairs, W4A8Weight, int4_linear,
                                               int4_linear_supported, int4_pairs_run, quantize_int4, unpack_int4)
from lmserve.model.weight_formats.int8 import Int8WeightOnly, W8A8Weight, int8_linear_reference, packs_weights


def q4_1_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights as a Q4_1 file dequantizes them: per group of 32, d * q + m with q in 0..15, each
    group using both ends of its range (as Q4_1's quantizer sets d and m from the group's min/max)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // INT4_GROUP, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(rows, cols // INT4_GROUP, 1, generator=g) * 0.02 + 0.001
    m = torch.randn(rows, cols // INT4_GROUP, 1, generator=g) * 0.05
    return (d * q + m).view(rows, cols)


def linear_with(weight: torch.Tensor, kind: str, w8a8: bool = True) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
    layer.quantize(kind, w8a8)
    return layer


def test_int4_reproduces_a_q4_1_grid():
    """Only the bf16 rounding of scale and zero stands between the int4 product and the exact
    one; an off-by-one integer anywhere would cost a whole step d (~1e-2) on some output."""
    weight = q4_1_weight(64, 256)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    packed, scale_zero = quantize_int4(weight)
    assert scale_zero.shape == (256 // INT4_GROUP, 64, 2)
    out = torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scale_zero).float()
    exact = x.float() @ weight.t()
    scale_error = weight.abs().max().item() * 2 ** -8  # bf16 keeps 8 significant bits
    assert (out - exact).abs().max().item() < scale_error * x.float().abs().sum(-1).max().item()
    assert (out - exact).abs().max().item() < 0.05 * exact.abs().max().item()


def test_int4_is_closer_than_int8_on_a_q4_grid(monkeypatch):
    monkeypatch.setattr(linear, "int4_linear_supported", lambda: False)  # the weight-only copies
    weight = q4_1_weight(128, 512, seed=1)
    x = torch.randn(4, 512)
    exact = x @ weight.t()
    err4 = (linear_with(weight, "int4", w8a8=False)(x) - exact).abs().mean().item()  # the weight-only copies
    err8 = (linear_with(weight, "int8", w8a8=False)(x) - exact).abs().mean().item()
    assert err4 < err8, (err4, err8)


def test_int4_falls_back_to_int8_where_the_kernel_cannot_pack(monkeypatch):
    monkeypatch.setattr(linear, "int4_linear_supported", lambda: False)  # the weight-only copies

    def small_step_format(weight):
        return type(linear_with(weight, "int4", w8a8=False).small_step_copy.storage)

    assert small_step_format(torch.randn(24, 64)) is Int8WeightOnly  # N not a multiple of 16
    assert small_step_format(torch.randn(32, 48)) is Int8WeightOnly  # K not a multiple of 32
    assert small_step_format(torch.randn(32, 64)) is Int4WeightOnly


def test_a_packed_w8a8_weight_serves_every_int8_step():
    """Where the W8A8 weight is packed its product outruns the weight-only int8 kernel from one
    row: no weight-only int8 copy is kept. Where it cannot be packed (N % 16) the copy stays."""
    packed, unpackable = linear_with(torch.randn(32, 48), "int8"), linear_with(torch.randn(24, 64), "int8")
    copy = unpackable.small_step_copy
    assert isinstance(copy.storage, Int8WeightOnly) and copy.max_tokens == SMALL_STEP_TOKENS[Int8WeightOnly]
    assert isinstance(packed.storage, W8A8Weight)
    if packs_weights():
        assert packed.small_step_copy is None and packed.storage.weight.dtype == torch.uint8
        x = torch.randn(1, 48)
        w8a8 = packed.storage
        assert torch.equal(packed(x), int8_linear_reference(x, w8a8.weight, w8a8.scales, None, w8a8.block))
    else:
        assert isinstance(packed.small_step_copy.storage, Int8WeightOnly) and packed.storage.weight.dtype == torch.int8


def test_int4_runs_w4a8_at_every_step_where_the_kernels_do():
    """One copy, the weight's 4-bit integers (tests/unit/test_int4_linear.py: a Q4_1 file's own,
    exactly), for every step size."""
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    weight = q4_1_weight(64, 128, seed=5)
    layer = Linear(128, 64, bias=True)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.quantize("int4")
    assert layer.weight is None and layer.small_step_copy is None
    # in one stream a pair of blocks where the register tiles serve every step, the same values
    assert isinstance(layer.storage, W4A8Pairs if int4_pairs_run() else W4A8Weight)
    blocks = W4A8Weight.quantize(weight)
    packed, scales, lows = blocks.weight, blocks.scales, blocks.lows
    restored = (unpack_int4(packed).float() * scales.t().float().repeat_interleave(INT4_GROUP, 1)
                + lows.t().float().repeat_interleave(INT4_GROUP, 1))
    assert (restored - weight).abs().max() < scales.float().max() / 2 + 1e-3  # half a step and float16 rounding
    for rows in (1, 2, 9, 70):
        x = torch.randn(rows, 128)
        assert torch.equal(layer(x), int4_linear(x, packed, scales, lows, layer.bias)), rows


def test_without_the_kernels_small_steps_use_the_weight_only_copy_and_larger_ones_w8a8(monkeypatch):
    """Without the native kernels on a CPU with int8 dot products, int4 keeps torch's weight-only
    int4 kernel for steps of few tokens and W8A8 on torch._int_mm for larger ones."""
    monkeypatch.setattr(linear, "int4_linear_supported", lambda: False)
    monkeypatch.setattr(linear, "packs_weights", lambda: False)
    weight = q4_1_weight(64, 128, seed=2)
    layer = linear_with(weight, "int4")
    assert layer.weight is None  # the bf16 weight is gone: the copies serve every step
    assert isinstance(layer.storage, W8A8Weight)
    small = layer.small_step_copy.storage
    assert isinstance(small, Int4WeightOnly)
    packed, scale_zero = small.weight, small.scale_zero
    w8a8 = layer.storage
    assert w8a8.weight.dtype == torch.int8 and w8a8.block == 64  # (N, K) for torch._int_mm
    limit = layer.small_step_copy.max_tokens
    assert limit == SMALL_STEP_TOKENS[Int4WeightOnly]
    for rows in (1, limit, limit + 1, 32):
        x = torch.randn(rows, 128)
        small_out = torch._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, INT4_GROUP, scale_zero).float()
        large_out = int8_linear_reference(x, w8a8.weight, w8a8.scales, None, w8a8.block)
        assert not torch.equal(small_out, large_out)  # the two paths are distinguishable on this input
        assert torch.equal(layer(x), small_out if rows <= limit else large_out), rows
        exact = x @ weight.t()
        assert (large_out - exact).abs().max() < 0.06 * exact.abs().max(), rows  # and both compute x W^T


def test_without_int8_products_larger_steps_keep_bf16(monkeypatch):
    """On a CPU without int8 dot products (quantize(w8a8=False)) nor the W4A8 product (no AVX2)
    larger steps run the bf16 weight."""
    monkeypatch.setattr(linear, "int4_linear_supported", lambda: False)
    weight = q4_1_weight(64, 128, seed=4)
    layer = Linear(128, 64, bias=True)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.quantize("int4", w8a8=False)
    assert isinstance(layer.small_step_copy.storage, Int4WeightOnly)
    assert isinstance(layer.storage, FloatWeight) and layer.storage.weight is layer.weight
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    # the small-step limit measured against bf16, not the packed product
    assert layer.small_step_copy.max_tokens == SMALL_STEP_TOKENS[Int4WeightOnly]
    x = torch.randn(SMALL_STEP_TOKENS[Int4WeightOnly] + 1, 128)
    assert torch.equal(layer(x), F.linear(x.bfloat16(), layer.weight, layer.bias).float())


def test_onednn_packed_weights_give_the_plain_products(monkeypatch):
    """oneDNN's blocked layout changes how the weight is stored, never the product."""
    monkeypatch.setattr(floating, "bf16_panels_run", lambda: False)  # the layout of CPUs the panels do not serve
    torch.manual_seed(3)
    layer = Linear(96, 48, bias=True)
    layer.to(torch.bfloat16)
    plain_weight, bias = layer.weight.detach().clone(), layer.bias.detach()
    if not floating.packs_bf16():  # oneDNN without a bf16 product here (AVX2 alone): it refuses, as packs_bf16 says
        with pytest.raises(RuntimeError, match="bf16"):
            layer.pack_for_cpu()
        return
    layer.pack_for_cpu()
    assert isinstance(layer.storage, OneDNNPackedWeight) and layer.storage.weight.is_mkldnn and layer.weight is None
    for rows in (1, 9, 64, 300):
        x = torch.randn(rows, 96)
        assert torch.equal(layer(x), F.linear(x.bfloat16(), plain_weight, bias).float()), rows


def test_bf16_weights_take_the_panels_where_the_kernel_serves_them():
    """Where bf16_linear runs without AMX tiles, pack_for_cpu lays the weight out in its panels, and
    the products are those of the same bf16 values, summed in float32 (oneDNN rounds them to bf16)."""
    torch.manual_seed(3)
    layer = Linear(96, 48, bias=True)
    layer.to(torch.bfloat16)
    plain_weight, bias = layer.weight.detach().clone(), layer.bias.detach()
    if not floating.bf16_panels_run():
        return  # the test above covers this CPU's layout, or that it has none
    layer.pack_for_cpu()
    assert isinstance(layer.storage, Bf16Panels)
    assert layer.weight is None
    for rows in (1, 9, 64, 300):
        x = torch.randn(rows, 96)
        exact = F.linear(x.bfloat16().double(), plain_weight.double(), bias.double())
        assert (layer(x).double() - exact).abs().max() < 1e-4, rows


def test_model_packs_only_bf16_weights(default_model):
    """The float32 default keeps plain weights (oneDNN's bf16 path is what pays)."""
    assert not default_model.model.pack_for_cpu()
    assert isinstance(default_model.model.lm_head.storage, FloatWeight)
    assert default_model.model.model.embed_tokens.weight.dtype == torch.float32  # float32 stays exact
