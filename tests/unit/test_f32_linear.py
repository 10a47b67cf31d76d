"""The float32 path's products (kernels/f32_linear.cpp): as close to the exact product as torch's,
and batch-invariant bit for bit, which torch's is not (its one-row and many-row products sum in
different orders)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import cpu_flags, native_module
from lmserve.model.weight_formats.floating import FloatWeight


def case(rows: int, cols: int, out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=generator), torch.randn(out, cols, generator=generator),
            torch.randn(out, generator=generator))


def test_the_kernel_runs_exactly_where_the_cpu_has_avx512_or_avx2():
    # so that on such a CPU (x86-64 from Haswell and Zen on) the tests below test the kernel, not torch
    flags = cpu_flags()
    assert native_module().f32_linear_supported() == ("avx512f" in flags or {"avx2", "fma"} <= flags)


# rows: one-row tiles (1-2 rows) and five-row ones with tails of 1-4; cols: whole vectors of 16 and
# a masked last one; out: whole blocks of 8 (one row) or 5 outputs, and tails
@pytest.mark.parametrize("rows, cols, out", [(1, 576, 960), (2, 40, 13), (3, 100, 50), (6, 64, 21), (9, 576, 1536),
                                             (37, 1536, 576), (130, 64, 7)])
def test_the_product_is_as_close_to_the_exact_one_as_torchs(rows, cols, out):
    x, weight, bias = case(rows, cols, out, seed=rows + cols)
    for b in (None, bias):
        exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
        got = native_module().f32_linear(x, weight, b)
        assert got.dtype == torch.float32 and got.shape == (rows, out)
        torch_error = (F.linear(x, weight, b).double() - exact).abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 2 * torch_error


@pytest.mark.parametrize("cols, out", [(576, 960), (100, 13)])
def test_a_row_gets_the_same_bits_alone_and_in_a_step_of_any_size(cols, out):
    x, weight, bias = case(40, cols, out, seed=cols)
    storage = FloatWeight(weight)  # the float32 path's Linear, as the engine runs it
    alone = torch.cat([storage.forward(x[i:i + 1], bias) for i in range(len(x))])
    for rows in (2, 3, 8, 40):
        assert torch.equal(storage.forward(x[:rows], bias), alone[:rows])


def test_inputs_of_any_shape_and_layout_give_torchs_product():
    x, weight, bias = case(10, 64, 24, seed=1)
    batched = x.view(2, 5, 64).transpose(0, 1)  # (5, 2, 64), not contiguous
    got = native_module().f32_linear(batched, weight, bias)
    assert got.shape == (5, 2, 24)
    torch.testing.assert_close(got, F.linear(batched, weight, bias))
