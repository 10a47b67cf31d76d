"""The bf16 path's products where the CPU has AVX512-BF16 and no AMX tiles (kernels/bf16_linear.cpp):
the weight's panels hold its values and zeros, and the product of x rounded to bf16 with them is as
close to the exact one as float32 sums get, on tiles and tails of every kind."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import cpu_flags, native_module
from lmserve.model.weight_formats.floating import Bf16Panels, bf16_panels_run


def case(rows: int, cols: int, out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator), torch.randn(out, cols, generator=generator).bfloat16(),
            torch.randn(out, generator=generator))


def test_the_kernel_runs_where_the_cpu_has_bf16_dot_products():
    # so that on such a CPU (this project's machines) the tests below test the kernel's own loop
    module = native_module()
    assert module.bf16_linear_supported() == ("avx512_bf16" in cpu_flags())
    assert bf16_panels_run() == (module.bf16_linear_supported() and not module.amx_bf16_usable())


@pytest.mark.parametrize("cols, out", [(576, 960), (33, 70), (1, 5), (2, 32)])
def test_panels_hold_the_weight_and_zeros(cols, out):
    _, weight, _ = case(1, cols, out, seed=cols)
    panels = native_module().bf16_panels(weight)
    assert panels.dtype == torch.bfloat16 and panels.shape == ((out + 31) // 32, (cols + 1) // 2, 32, 2)
    plain = panels.permute(0, 2, 1, 3).reshape(-1, panels.shape[1] * 2)  # (outputs rounded up, columns rounded up)
    assert torch.equal(plain[:out, :cols], weight)
    assert not plain[out:].any() and not plain[:, cols:].any()


# rows: one row, tiles of 2-12 and steps past 12 (a whole tile and a tail); cols: odd (a padded
# pair) and even; out: whole panels of 32, one vector of a panel, and partial vectors
@pytest.mark.parametrize("rows, cols, out", [(1, 576, 960), (2, 40, 13), (5, 33, 70), (12, 64, 48), (13, 577, 96),
                                             (40, 1536, 576), (25, 7, 17)])
def test_the_product_is_the_exact_one_of_the_bf16_values_to_float32_rounding(rows, cols, out):
    x, weight, bias = case(rows, cols, out, seed=rows + cols)
    panels = native_module().bf16_panels(weight)
    for b in (None, bias):
        exact = F.linear(x.bfloat16().double(), weight.double(), None if b is None else b.double())
        got = native_module().bf16_linear(x, panels, b, out)
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        # each output a float32 sum of `cols` products: the bound float32 summation guarantees
        scale = F.linear(x.bfloat16().double().abs(), weight.double().abs()) + (0 if b is None else b.double().abs())
        assert ((got.double() - exact).abs() <= cols * 2 ** -23 * scale + 1e-30).all()


def test_storage_takes_inputs_of_any_shape_and_dtype():
    x, weight, bias = case(10, 64, 24, seed=1)
    storage = Bf16Panels.pack(weight)
    assert storage.out_features == 24
    batched = x.view(2, 5, 64).transpose(0, 1)  # (5, 2, 64), not contiguous
    expected = F.linear(batched.bfloat16().float(), weight.float(), bias)
    got = storage.forward(batched, bias)
    assert got.shape == (5, 2, 24) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got = storage.forward(batched.bfloat16(), bias.bfloat16())  # a bf16 model's activations and bias
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(batched.bfloat16().float(), weight.float(), bias.bfloat16().float())
                               .bfloat16())


def test_inputs_that_do_not_fit_the_panels_are_refused():
    x, weight, bias = case(3, 64, 40, seed=2)
    panels = native_module().bf16_panels(weight)
    with pytest.raises(RuntimeError, match="do not fit"):
        native_module().bf16_linear(x[:, :62], panels, None, 40)  # fewer columns
    with pytest.raises(RuntimeError, match="do not fit"):
        native_module().bf16_linear(x, panels, None, 70)  # more outputs than the panels hold
    with pytest.raises(RuntimeError, match="bias"):
        native_module().bf16_linear(x, panels, bias[:39], 40)
    with pytest.raises(RuntimeError, match="bfloat16"):
        native_module().bf16_panels(weight.float())


def test_rows_come_back_exactly_and_ids_out_of_range_are_refused():
    _, weight, _ = case(1, 33, 70, seed=5)
    storage = Bf16Panels.pack(weight)
    ids = torch.tensor([0, 31, 32, 69, 5, 5])
    got = storage.rows(ids)
    assert got.dtype == torch.float32 and torch.equal(got, weight[ids].float())
    for bad in (70, -1):
        with pytest.raises(RuntimeError, match="out of range"):
            storage.rows(torch.tensor([3, bad]))
