"""W4A8 projections (model/weight_formats/int4.py, kernels/int4_linear.cpp): 4-bit weights in groups
of 32 with a float16 scale and low each, int8 activations in the same groups. The packed layout
round-trips, a Q4_1 file's weights come back to their own integers, scales and lows, the activation
quantizer matches its reference bit for bit, and the product matches the float64 reference to
float32 accumulation error through every tile shape, tail and row chunk."""

from __future__ import annotations

import pytest
import torch

from lmserve.cpu import has_int4_products
from lmserve.kernels import cpu_flags, native_module
from lmserve.memory import LOAD_PIECE_BYTES
from lmserve.model.weight_formats.int4 import (
    INT4_GROUP,
    can_pack_int4,
    int4_linear,
    int4_linear_bf16_reference,
    int4_linear_reference,
    int4_linear_supported,
    pack_int4,
    pack_int4_reference,
    quantize_groups_reference,
    quantize_int4_groups,
    quantize_int4_groups_reference,
    unpack_int4,
)

# The kernels' quantizer and the torch one (where the kernels are not built) are both held to each property.
QUANTIZERS = pytest.mark.parametrize("quantize", [quantize_int4_groups, quantize_int4_groups_reference],
                                     ids=["kernels", "torch"])


def q4_1_file_weight(rows: int, cols: int, seed: int = 0):
    """Weights as a Q4_1 file dequantizes them, with the file's parts: integers q (0..15, each group
    using both ends), float16 d and m per group of 32; w = d * q + m."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols // INT4_GROUP, INT4_GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(rows, cols // INT4_GROUP, 1, generator=g) * 0.02 + 0.001).half()
    m = (torch.randn(rows, cols // INT4_GROUP, 1, generator=g) * 0.05).half()
    weight = (d.float() * q + m.float()).view(rows, cols)
    return weight, q.view(rows, cols), d.view(rows, -1), m.view(rows, -1)


def activations(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 3
    x[:, 1] *= 40  # one channel far larger than the rest, as these models have: only its group pays
    if rows > 2:
        x[0] = 0  # an all-zero row still gets finite scales
        x[1, :INT4_GROUP] = 0  # and so does an all-zero group
    return x


def test_w4a8_runs_exactly_where_the_cpu_has_avx512_vnni_or_avx2():
    # so that on such a CPU (x86-64 from Haswell and Zen on) the kernel tests below cannot pass unrun
    flags = cpu_flags()
    assert int4_linear_supported() == (("avx512_vnni" in flags and "avx512bw" in flags) or has_int4_products(flags))


@pytest.mark.parametrize("pack", [pack_int4, pack_int4_reference], ids=["kernels", "torch"])
def test_packed_layout_puts_two_columns_of_k_in_each_byte_and_round_trips(pack):
    if pack is pack_int4:
        assert native_module() is not None, "native kernels not built: run python -m lmserve.kernels"
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = pack(q)
    assert packed.shape == (2, 8, 16, 4) and packed.dtype == torch.uint8
    # byte [j, s, l, b]: q[16 j + l, 8 s + b] low, q[16 j + l, 8 s + 4 + b] high
    assert packed[1, 3, 5, 2].item() == q[21, 26].item() | (q[21, 30].item() << 4)
    assert torch.equal(unpack_int4(packed), q)
    wide = torch.randint(0, 16, (48, 576), dtype=torch.uint8)
    assert torch.equal(pack(wide), pack_int4_reference(wide))


@QUANTIZERS
def test_a_q4_1_files_weights_come_back_to_their_own_integers_scales_and_lows(quantize):
    weight, q, d, m = q4_1_file_weight(48, 128)
    q_out, scales, lows = quantize(weight)
    assert scales.dtype == lows.dtype == torch.float16 and scales.shape == (128 // INT4_GROUP, 48)
    assert torch.equal(q_out, q.to(torch.uint8))
    assert torch.equal(scales.t(), d) and torch.equal(lows.t(), m)


@QUANTIZERS
def test_a_q4_0_files_weights_come_back_exactly_too(quantize):
    """Q4_0: w = (q - 8) * d, the group's value of largest magnitude at q = 0, so d takes its
    opposite sign; groups of both signs, most not reaching the other end of the range."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 32, 128
    q = torch.randint(1, 15, (rows, cols // INT4_GROUP, INT4_GROUP), generator=g)
    q[..., 0] = 0
    sign = torch.where(torch.rand(rows, cols // INT4_GROUP, 1, generator=g) < 0.5, -1.0, 1.0)
    d = ((torch.rand(rows, cols // INT4_GROUP, 1, generator=g) * 0.02 + 0.001) * sign).half()
    weight = ((q - 8) * d.float()).view(rows, cols)
    q_out, scales, lows = quantize(weight)
    restored = (q_out.float().view(rows, -1, INT4_GROUP) * scales.t().float()[..., None]
                + lows.t().float()[..., None]).view(rows, cols)
    assert torch.equal(restored, weight)
    assert (scales < 0).any() and (scales > 0).any()


@QUANTIZERS
def test_other_weights_take_the_closer_grid(quantize):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    q, scales, lows = quantize(weight)
    groups = weight.view(64, -1, INT4_GROUP)
    error = (q.float().view(64, -1, INT4_GROUP) * scales.t().float()[..., None] + lows.t().float()[..., None]
             - groups).abs().amax(-1)
    q4_1_step = ((groups.amax(-1) - groups.amin(-1)) / 15)
    assert (error <= q4_1_step / 2 * 1.01 + 1e-4).all()  # never worse than half a step of Q4_1's grid
    constant = torch.zeros(16, 32)
    constant[3] = 0.25  # a constant group (scale 0) comes back exactly
    q, scales, lows = quantize(constant)
    assert torch.equal(q.float() * scales.t().float() + lows.t().float(), constant)


@QUANTIZERS
def test_a_weight_quantized_in_pieces_is_quantized_as_each_row_alone(quantize):
    # 4096 columns: 16 rows a piece, so 40 rows take three pieces, the last one short
    weight = torch.randn(40, 4096, generator=torch.Generator().manual_seed(5))
    assert LOAD_PIECE_BYTES // (4 * 4096) == 16
    q, scales, lows = quantize(weight)
    for row in (0, 15, 16, 31, 32, 39):
        q_row, scales_row, lows_row = quantize(weight[row:row + 1])
        assert torch.equal(q[row], q_row[0])
        assert torch.equal(scales[:, row], scales_row[:, 0]) and torch.equal(lows[:, row], lows_row[:, 0])


def test_the_kernels_quantizer_gives_the_torch_ones_values_bit_for_bit():
    """Groups of every kind: random, Q4_1- and Q4_0-shaped, constant, all zero, ties for the largest
    magnitude (+a and -a: the first wins), tiny and large values, rows of odd counts."""
    assert native_module().int4_quantize_supported()  # the kernels' quantizer is the one called
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(37, 512, generator=g) * 0.05
    weight[0] = q4_1_file_weight(1, 512, seed=1)[0]
    groups = weight.view(37, -1, INT4_GROUP)
    groups[1] = 0
    groups[2] = 0.125
    groups[3, :, 5], groups[3, :, 9] = 0.3, -0.3
    groups[4, :, 9], groups[4, :, 5] = 0.3, -0.3
    groups[5] *= 1e-6
    groups[6] *= 1e3
    groups[7, :, 0] = 0.0
    groups[7, :, 1] = -0.0
    groups[8, :, 3] = float("nan")  # a NaN group stays NaN (scale and low), as torch's min and max make it
    groups[9, 0, :] = 6e5  # Q4_0's scale overflows float16: that grid is never the closer one
    groups[9, 0, 0] = -7e5
    def same(got, expected):
        assert torch.equal(got[0], expected[0])
        for ours, theirs in zip(got[1:], expected[1:]):
            assert ours.dtype == theirs.dtype and torch.allclose(ours, theirs, rtol=0, atol=0, equal_nan=True)

    got = quantize_int4_groups(weight)
    assert got[1].isnan().sum() == 512 // INT4_GROUP
    same(got, quantize_int4_groups_reference(weight))
    same(quantize_int4_groups(weight.bfloat16()), quantize_int4_groups_reference(weight.bfloat16()))  # widened first


def test_shape_rules():
    assert can_pack_int4(torch.zeros(32, 64)) and can_pack_int4(torch.zeros(16, 32))
    assert not can_pack_int4(torch.zeros(24, 64)) and not can_pack_int4(torch.zeros(32, 48))


def test_activation_groups_quantize_as_the_reference_bit_for_bit():
    module = native_module()
    x = activations(9, 256, seed=1)
    x[2, 40] = 2.5 * (x[2, 32:64].abs().max() / 127)  # a value halfway between two steps: round to even
    expected = quantize_groups_reference(x)
    got = module.quantize_groups(x)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    q, scales, sums = expected
    assert q.abs().max().item() == 127 and scales[0].min().item() > 0  # the zero row's scale is finite
    assert torch.equal(sums, q.view(9, -1, INT4_GROUP).sum(-1).float() * scales)


# rows: full 4-row tiles, 1-3 row tails, more than one 64-row chunk; out: odd and even numbers of
# 16-output blocks per thread (2-block tiles and 1-block tails); cols: one group to the MLP's 1536
@pytest.mark.parametrize("rows, cols, out", [(1, 32, 16), (1, 1536, 576), (2, 64, 48), (3, 576, 960), (5, 96, 80), (7, 160, 112),
                                             (64, 576, 3072), (130, 1536, 576), (67, 128, 208)])
def test_product_matches_the_reference(rows, cols, out):
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    weight = q4_1_file_weight(out, cols, seed=rows + cols)[0]
    q, scales, lows = quantize_int4_groups(weight)
    packed = pack_int4(q)
    x = activations(rows, cols, seed=rows)
    bias = torch.randn(out)
    on_bf16_tiles = native_module().int4_linear_path(rows) == "bf16_tiles"
    reference = int4_linear_bf16_reference if on_bf16_tiles else int4_linear_reference
    for b in (None, bias):
        expected = reference(x, packed, scales, lows, b)  # float64 sums, rounded once
        got = int4_linear(x, packed, scales, lows, b)
        # float32 accumulation over cols / 32 groups: far below one int8 step of any activation
        assert (got - expected).abs().max() <= 2e-6 * expected.abs().max() * (cols // INT4_GROUP), (rows, cols, out)
    # and what it stands for: x W^T up to the activations' int8 rounding (coarser in the outlier's group)
    exact = x @ weight.t()
    assert (int4_linear(x, packed, scales, lows, None) - exact).norm() < 0.03 * exact.norm()


@pytest.mark.parametrize("rows", [3, 20, 70])  # the register tiles, and the AMX tiles where there are any
def test_extreme_values_do_not_overflow(rows):
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    # every integer at its largest (15 against +-127) over K = 1536: the largest int32 group sums
    k = 1536
    weight = torch.full((32, k), 15.0 * 2**-6)
    weight[:, ::INT4_GROUP] = 0.0  # each group's low 0 and scale 2^-6 (exact in float16): q = 15 elsewhere
    q, scales, lows = quantize_int4_groups(weight)
    assert q.max().item() == 15
    x = torch.full((rows, k), 2.0)
    x[1] = -2.0
    expected = int4_linear_reference(x, pack_int4(q), scales, lows, None)  # both paths exact here
    got = int4_linear(x, pack_int4(q), scales, lows, None)
    assert torch.allclose(got, expected, rtol=1e-5) and expected[1].max() < 0 < expected[0].min()


def register_tiles_float32(x, packed, scales, lows, bias):
    """The register tiles' own float32 arithmetic, step for step, for steps of more than
    RESIDUAL_ROWS rows: per group f = fma(sum, w_scale * x_scale, f), then f = fma(w_low, x_sum, f)
    (an fma as float64 of float32 operands, whose product is exact, rounded once to float32), then
    plus the bias."""
    xq, x_scales, x_sums = quantize_groups_reference(x)
    q = unpack_int4(packed).long()
    m, k = x.shape
    groups = k // INT4_GROUP
    sums = torch.einsum("mgc,ngc->mng", xq.long().view(m, groups, INT4_GROUP), q.view(-1, groups, INT4_GROUP))
    f = torch.zeros(m, q.shape[0])
    for g in range(groups):
        scale = scales[g].float()[None, :] * x_scales[:, g:g + 1]  # float32, as _mm*_mul_ps
        f = (sums[..., g].double() * scale.double() + f.double()).float()
        f = (lows[g].float().double()[None, :] * x_sums[:, g:g + 1].double() + f.double()).float()
    return f if bias is None else f + bias


@pytest.mark.parametrize("rows, cols, out", [(2, 64, 48), (5, 576, 96), (9, 1536, 64)])
def test_the_register_tiles_give_their_float32_arithmetics_bits(rows, cols, out):
    """Bit for bit against the arithmetic both register tiles (AVX512-VNNI and AVX2) spell out: so
    the two instruction sets, never built on one machine together, give the same results."""
    if not int4_linear_supported() or native_module().int4_linear_path(rows) != "registers":
        pytest.skip("this CPU runs these steps on neither register tile")
    weight = q4_1_file_weight(out, cols, seed=rows + cols)[0]
    q, scales, lows = quantize_int4_groups(weight)
    packed = pack_int4(q)
    x, bias = activations(rows, cols, seed=rows), torch.randn(out)
    for b in (None, bias):
        expected = register_tiles_float32(x, packed, scales, lows, b)
        assert torch.equal(int4_linear(x, packed, scales, lows, b), expected)
        assert not torch.equal(expected, int4_linear_reference(x, packed, scales, lows, b).float())  # float32 sums show


@pytest.mark.parametrize("rows", [1, 2, 5])  # residual rows, a whole tile and a tail
def test_a_group_of_the_largest_integers_sums_exactly(rows):
    """Every weight integer 15 against activations at +-127: a group's largest sums (on AVX2 each
    int16 lane adds 16 such products, 30,480, just under 32,767), through the packed weight itself."""
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    k, n = 1536, 64
    q = torch.full((n, k), 15, dtype=torch.uint8)
    scales = torch.full((k // INT4_GROUP, n), 2.0**-6, dtype=torch.float16)
    lows = torch.zeros_like(scales)
    x = torch.full((rows, k), 2.0)
    x[-1] = -2.0  # each group's values equal: int8 127 (and -127) with scale 2 / 127
    expected = int4_linear_reference(x, pack_int4(q), scales, lows, None)
    got = int4_linear(x, pack_int4(q), scales, lows, None)
    assert torch.allclose(expected, torch.full_like(expected, 15 * 2.0**-6 * 2 * k).copysign(x[:, :1]), rtol=1e-5)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_amx_tiles_run_exactly_where_the_cpu_has_amx_int8():
    # so that on such a CPU (this project's machines) the test below compares two different paths
    flags = cpu_flags()
    expected = {"amx_tile", "amx_int8"} <= flags and int4_linear_supported()
    assert native_module().int4_tiles_supported() == expected


# rows: one tile, tails of 1 and 15 rows past whole tiles; cols: one group, odd and even numbers of
# groups (the tiles alternate between two sets); out: one to many 16-output blocks per thread
@pytest.mark.parametrize("rows, cols, out", [(16, 32, 16), (17, 96, 48), (31, 576, 80), (64, 1536, 576),
                                             (130, 160, 208)])
def test_amx_tiles_give_the_register_tiles_results_bit_for_bit(rows, cols, out):
    module = native_module()
    q, scales, lows = quantize_int4_groups(q4_1_file_weight(out, cols, seed=rows)[0])
    packed = pack_int4(q)
    x = activations(rows, cols, seed=cols)
    bias = torch.randn(out)
    if not module.int4_tiles_supported():  # a CPU without them: the path is refused by name, not run
        with pytest.raises(RuntimeError, match="no AMX-INT8 tiles here"):
            module.int4_linear(x, packed, scales, lows, bias, path="int8_tiles")
        return
    for b in (None, bias):
        on_tiles = module.int4_linear(x, packed, scales, lows, b, path="int8_tiles")
        on_registers = module.int4_linear(x, packed, scales, lows, b, path="registers")
        assert on_tiles.shape == (rows, out) and torch.equal(on_tiles, on_registers)
        assert torch.equal(on_tiles[5:9], module.int4_linear(x[5:9], packed, scales, lows, b))  # rows alone


def test_steps_take_the_tiles_where_the_cpu_has_amx():
    flags, module = cpu_flags(), native_module()
    amx_int8 = {"amx_tile", "amx_int8"} <= flags and int4_linear_supported()
    amx_bf16 = amx_int8 and {"amx_bf16", "avx512_bf16", "avx512vbmi"} <= flags
    assert module.int4_bf16_tiles_supported() == amx_bf16
    assert module.int4_linear_path(1) == module.int4_linear_path(15) == "registers"
    assert module.int4_linear_path(16) == module.int4_linear_path(63) == ("int8_tiles" if amx_int8 else "registers")
    assert module.int4_linear_path(64) == module.int4_linear_path(2048) == (
        "bf16_tiles" if amx_bf16 else "int8_tiles" if amx_int8 else "registers")


# rows: under one tile, one pair of tiles and a tail; out: an odd number of blocks (one block alone
# at the end of a thread's share) and an even one; cols: one group to the MLP's 1536
@pytest.mark.parametrize("rows, cols, out", [(5, 32, 16), (32, 96, 48), (70, 576, 80), (64, 1536, 576),
                                             (130, 160, 208)])
def test_bf16_tiles_match_their_reference(rows, cols, out):
    module = native_module()
    weight = q4_1_file_weight(out, cols, seed=rows + 1)[0]
    q, scales, lows = quantize_int4_groups(weight)
    packed = pack_int4(q)
    x = activations(rows, cols, seed=rows + 2)
    bias = torch.randn(out)
    if not module.int4_bf16_tiles_supported():  # a CPU without them: the path is refused by name, not run
        with pytest.raises(RuntimeError, match="no AMX-BF16 tiles here"):
            module.int4_linear(x, packed, scales, lows, bias, path="bf16_tiles")
        return
    for b in (None, bias):
        expected = int4_linear_bf16_reference(x, packed, scales, lows, b)
        got = module.int4_linear(x, packed, scales, lows, b, path="bf16_tiles")
        assert got.shape == (rows, out)
        assert (got - expected).abs().max() <= 2e-6 * expected.abs().max() * (cols // INT4_GROUP), (rows, cols, out)
    # no worse than the int8 activation groups against what the weight stands for
    exact = x @ weight.t()
    on_tiles = module.int4_linear(x, packed, scales, lows, None, path="bf16_tiles")
    on_registers = module.int4_linear(x, packed, scales, lows, None, path="registers")
    assert (on_tiles - exact).norm() <= (on_registers - exact).norm() * 1.01


def test_an_unknown_path_is_refused():
    q, scales, lows = quantize_int4_groups(torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="path: auto, bf16_tiles, int8_tiles or registers"):
        native_module().int4_linear(torch.zeros(2, 64), pack_int4(q), scales, lows, None, path="fast")


def test_a_mis_shaped_weight_is_refused():
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    q, scales, lows = quantize_int4_groups(torch.randn(32, 64))
    packed = pack_int4(q)
    with pytest.raises(RuntimeError, match="packed uint8"):
        int4_linear(torch.zeros(2, 64), packed.reshape(2, 8, 64), scales, lows, None)
    with pytest.raises(RuntimeError, match="the weight's K"):
        int4_linear(torch.zeros(2, 32), packed, scales, lows, None)
    with pytest.raises(RuntimeError, match="float16"):
        int4_linear(torch.zeros(2, 64), packed, scales.float(), lows, None)


# rows: the residual one-row step, tiles and tails, more than one 64-row chunk; out: one pair, an
# odd number of pairs (one thread takes more), many; cols: one group to the MLP's 1536
@pytest.mark.parametrize("rows, cols, out", [(1, 32, 32), (1, 1536, 576), (2, 64, 96), (3, 576, 960), (5, 96, 160),
                                             (17, 160, 64), (70, 576, 3072), (130, 1536, 576)])
def test_the_pairs_layout_gives_the_register_tiles_results_bit_for_bit(rows, cols, out):
    """kernels/int4_registers.h: each pair of 16-output blocks holds, group after group, block 0's
    256 bytes of the group, block 1's, then the group's 32 scales and 32 lows; the product over it
    is the blocks layout's on the register tiles, bit for bit."""
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    module = native_module()
    q, scales, lows = quantize_int4_groups(q4_1_file_weight(out, cols, seed=rows + out)[0])
    packed = pack_int4(q)
    pairs = module.pack_int4_pairs(packed, scales, lows)
    groups = cols // INT4_GROUP
    assert pairs.shape == (out // 32, groups, 640) and pairs.dtype == torch.uint8
    blocks = packed.view(out // 16, groups, 256)
    halves = [t.view(groups, out // 32, 32).transpose(0, 1).contiguous().view(torch.uint8).view(out // 32, groups, 64)
              for t in (scales, lows)]
    assert torch.equal(pairs, torch.cat([blocks[0::2], blocks[1::2], *halves], dim=2))
    x = activations(rows, cols, seed=cols + 3)
    for b in (None, torch.randn(out)):
        got = module.int4_pairs_linear(x, pairs, b)
        assert got.shape == (rows, out)
        assert torch.equal(got, module.int4_linear(x, packed, scales, lows, b, path="registers")), (rows, cols, out)


def test_a_product_gives_the_same_results_whatever_ran_before_it():
    """A thread's products keep their int8 activations and a one-row step's two halves in buffers
    of the thread, grown and reused (kernels/int4_linear.cpp): a product after larger and smaller
    ones, and a one-row step after many rows, gives what it gave the first time, bit for bit, and
    what the reference gives."""
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    module = native_module()
    shapes = [(1, 576, 64), (1, 1536, 576), (70, 1536, 96), (3, 96, 32), (1, 64, 32), (130, 576, 64)]
    weights, inputs = {}, {}
    for rows, cols, out in shapes:
        q, scales, lows = quantize_int4_groups(q4_1_file_weight(out, cols, seed=cols + out)[0])
        weights[(cols, out)] = (pack_int4(q), scales, lows)
        inputs[(rows, cols)] = activations(rows, cols, seed=rows + cols)

    def product(rows, cols, out, pairs):
        packed, scales, lows = weights[(cols, out)]
        x = inputs[(rows, cols)]
        if pairs:
            return module.int4_pairs_linear(x, module.pack_int4_pairs(packed, scales, lows), None)
        return module.int4_linear(x, packed, scales, lows, None, path="registers")

    for pairs in (False, True):
        first = {shape: product(*shape, pairs) for shape in shapes}
        for shape in reversed(shapes + shapes[::2]):
            assert torch.equal(product(*shape, pairs), first[shape]), (shape, pairs)
        for (rows, cols, out), got in first.items():
            packed, scales, lows = weights[(cols, out)]
            want = int4_linear_reference(inputs[(rows, cols)], packed, scales, lows, None)
            assert (got - want).abs().max() <= 2e-6 * want.abs().max() * (cols // INT4_GROUP), (rows, cols, out)


@pytest.mark.parametrize("rows", [1, 3, 70])  # the residual one-row step, a tail, more than a 64-row chunk
def test_a_product_added_in_place_is_the_product_added_after(rows):
    """int4_pairs_linear_add (the native decoder's residual sums) gives out + int4_pairs_linear(x)
    bit for bit, bias or none, and refuses rows it cannot add into."""
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    module = native_module()
    q, scales, lows = quantize_int4_groups(q4_1_file_weight(96, 576, seed=rows)[0])
    pairs = module.pack_int4_pairs(pack_int4(q), scales, lows)
    x = activations(rows, 576, seed=rows + 1)
    for bias in (None, torch.randn(96)):
        out = torch.randn(rows, 96)
        want = out + module.int4_pairs_linear(x, pairs, bias)
        module.int4_pairs_linear_add(x, pairs, bias, out)
        assert torch.equal(out, want), (rows, bias is None)
    for wrong in (torch.zeros(rows, 64), torch.zeros(rows, 96, dtype=torch.bfloat16), torch.zeros(rows, 192)[:, ::2]):
        with pytest.raises(RuntimeError, match=r"out: contiguous float32 \(M, N\)"):
            module.int4_pairs_linear_add(x, pairs, None, wrong)


def test_a_mis_shaped_pairs_weight_is_refused():
    if not int4_linear_supported():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    module = native_module()
    q, scales, lows = quantize_int4_groups(torch.randn(48, 64))
    with pytest.raises(RuntimeError, match="N a multiple of 32"):  # three blocks: no whole pairs
        module.pack_int4_pairs(pack_int4(q), scales, lows)
    q, scales, lows = quantize_int4_groups(torch.randn(32, 64))
    pairs = module.pack_int4_pairs(pack_int4(q), scales, lows)
    with pytest.raises(RuntimeError, match="float16"):
        module.pack_int4_pairs(pack_int4(q), scales.float(), lows)
    with pytest.raises(RuntimeError, match=r"uint8 pairs \(N/32, K/32, 640\)"):
        module.int4_pairs_linear(torch.zeros(2, 64), pairs.view(1, 4, 320), None)
    with pytest.raises(RuntimeError, match="the weight's K"):
        module.int4_pairs_linear(torch.zeros(2, 32), pairs, None)
