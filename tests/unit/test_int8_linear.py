"""W8A8 projections (model/weight_formats/int8.py, kernels/int8_linear.cpp): the compiled kernel
against the ATen reference bit for bit, the blockwise Hadamard transform against the matrix it
stands for, and what the transform is for: a row with one large channel quantizes far better after
it. The packed weights of the AVX512-VNNI product: their layout and the product's tiles, tails and
row chunks. Rows of the float weight read back from a W8A8 copy (a tied head's copy is the
embedding table)."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import cpu_flags, native_module
from lmserve.memory import LOAD_PIECE_BYTES
from lmserve.model.weight_formats.int8 import (
    W8A8Weight,
    can_pack,
    hadamard_block,
    hadamard_rows,
    int8_linear,
    int8_linear_reference,
    int8_weight_rows,
    pack_weight,
    packs_weights,
    quantize_int8,
    quantize_rows_reference,
    rotate_weight,
    rotated_int8,
    rotated_int8_reference,
    unpack_weight,
    weight_rows_reference,
)


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


@pytest.mark.parametrize("rows, cols, scale", [(1, 576, 1.0), (37, 576, 1e-4), (64, 96, 3e4), (9, 24, 1.0), (5, 7, 1.0)])
def test_the_kernels_w8a8_copy_of_a_weight_is_the_torch_one_bit_for_bit(rows, cols, scale):
    """rotated_int8 (a weight's W8A8 copy, a tied head's included) on the kernels where they are
    built: the same int8 values and bfloat16 scales as quantize_int8(rotate_weight(.)), whose
    float64 matrix product it replaces by the transform's stages in float64."""
    assert native_module() is not None, "native kernels not built: run python -m lmserve.kernels"
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, cols, generator=generator) * torch.exp(2 * torch.randn(rows, cols, generator=generator))
    weight *= scale
    if rows > 1:
        weight[1] = 0.0  # a zero row: the smallest scale, q 0
    block = hadamard_block(cols)
    q, scales = rotated_int8(weight, block)
    q_ref, scales_ref = rotated_int8_reference(weight, block)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16
    assert torch.equal(q, q_ref) and torch.equal(scales.view(torch.int16), scales_ref.view(torch.int16))


@pytest.mark.parametrize("block", [1, 8])
def test_the_kernels_w8a8_copy_rounds_half_to_even_as_torch_does(block):
    """Rows whose transform is exactly these values (hadamard_rows of them, since H H = block I):
    scale exactly 1, and ties that round half to even."""
    assert native_module() is not None, "native kernels not built: run python -m lmserve.kernels"
    values = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 63.5, -126.5]])
    weight = hadamard_rows(values, block)
    assert torch.equal(rotate_weight(weight, block), values)
    for q, scales in (rotated_int8(weight, block), rotated_int8_reference(weight, block)):
        assert scales.float().tolist() == [1.0]
        assert q.tolist() == [[127, 0, 2, 2, 0, -2, 64, -126]]


def test_a_non_finite_weight_row_gives_that_row_a_non_finite_scale_on_both_paths():
    assert native_module() is not None, "native kernels not built: run python -m lmserve.kernels"
    weight = torch.randn(4, 64)
    weight[1, 5] = float("nan")
    weight[2, 9] = float("inf")
    native, reference = rotated_int8(weight, 64), rotated_int8_reference(weight, 64)
    for _, scales in (native, reference):
        assert not scales[[1, 2]].float().isfinite().any() and scales[[0, 3]].float().isfinite().all()
    assert torch.equal(native[0][[0, 3]], reference[0][[0, 3]])
    assert not native[0][[1, 2]].any()  # nothing of such a row is kept


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


def test_packed_layout_groups_four_bytes_of_sixteen_outputs_and_round_trips():
    weight = torch.randint(-127, 128, (32, 8), dtype=torch.int8)
    weight[0, 0], weight[1, 0] = -127, 127
    packed = pack_weight(weight)
    assert packed.shape == (2, 2, 16, 4) and packed.dtype == torch.uint8
    # block 1 (outputs 16-31), group 1 (columns 4-7), lane 3 (output 19): weight + 128
    assert packed[1, 1, 3].tolist() == [v + 128 for v in weight[19, 4:8].tolist()]
    assert packed[0, 0, 0, 0].item() == 1 and packed[0, 0, 1, 0].item() == 255
    assert torch.equal(unpack_weight(packed), weight)
    assert can_pack(weight) and not can_pack(weight[:24]) and not can_pack(weight[:, :6])


def test_packed_products_exist_exactly_where_the_cpu_has_avx512_vnni_or_avx2():
    # so that on such a CPU (x86-64 from Haswell and Zen on) the packed tests below cannot pass unrun
    flags = cpu_flags()
    assert packs_weights() == (("avx512_vnni" in flags and "avx512bw" in flags) or {"avx2", "fma"} <= flags)


# rows: full 4-row tiles, 1-3 row tails, more than one 64-row chunk; out: 1-4 blocks of 16 per
# thread's share (tails of 1, 2, 3 blocks); cols: Hadamard blocks 4 to 64, a K with a 64-byte tail
@pytest.mark.parametrize("rows, cols, out", [(1, 4, 16), (2, 24, 48), (3, 576, 960), (5, 96, 80), (7, 36, 112),
                                             (64, 576, 3072), (130, 1536, 576), (67, 100, 208)])
def test_packed_product_matches_the_reference_bit_for_bit(rows, cols, out):
    if not packs_weights():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    x, weight, bias = w8a8_case(rows, cols, out, seed=rows + cols)
    block = hadamard_block(cols)
    q, scales = quantize_int8(rotate_weight(weight, block))
    packed = pack_weight(q)
    for b in (None, bias):
        expected = int8_linear_reference(x, q, scales.float(), b, block)
        assert torch.equal(int8_linear(x, packed, scales.float(), b, block), expected)
        assert torch.equal(int8_linear_reference(x, packed, scales.float(), b, block), expected)


def test_packed_products_take_the_amx_tiles_where_the_cpu_has_them():
    # so that on such a CPU (this project's machines) the test below compares two different paths
    module = native_module()
    amx = {"amx_tile", "amx_int8"} <= cpu_flags() and packs_weights()
    assert module.int8_linear_path(16, 64) == module.int8_linear_path(4096, 1536) == ("int8_tiles" if amx else "registers")
    assert module.int8_linear_path(15, 64) == "registers"
    assert module.int8_linear_path(64, 100) == "registers"  # K not in whole 64-column steps


# rows: one tile, one and two pairs of tiles with tails; out: an odd number of 16-output blocks (a
# block alone at the end of a thread's share) and even ones; cols: one step of 64 to the MLP's 1536
@pytest.mark.parametrize("rows, cols, out", [(16, 64, 16), (31, 128, 48), (33, 576, 80), (100, 1536, 576)])
def test_amx_tiles_give_the_register_kernels_results_bit_for_bit(rows, cols, out):
    module = native_module()
    x, weight, bias = w8a8_case(rows, cols, out, seed=rows)
    block = hadamard_block(cols)
    q, scales = quantize_int8(rotate_weight(weight, block))
    packed = pack_weight(q)
    if module.int8_linear_path(rows, cols) != "int8_tiles":  # a CPU without them: refused by name, not run
        assert "amx_int8" not in cpu_flags()
        with pytest.raises(RuntimeError, match="no AMX-INT8 tiles for this weight here"):
            module.int8_linear(x, packed, scales.float(), bias, block, path="int8_tiles")
        return
    for b in (None, bias):
        on_tiles = module.int8_linear(x, packed, scales.float(), b, block, path="int8_tiles")
        assert torch.equal(on_tiles, module.int8_linear(x, packed, scales.float(), b, block, path="registers"))
        assert torch.equal(on_tiles, int8_linear_reference(x, q, scales.float(), b, block))
    with pytest.raises(RuntimeError, match="path: auto, int8_tiles or registers"):
        module.int8_linear(x, packed, scales.float(), None, block, path="fast")


@pytest.mark.parametrize("rows", [5, 20])  # the register kernel, and the AMX tiles where there are any
def test_packed_product_sums_saturated_rows_without_overflow(rows):
    if not packs_weights():
        pytest.skip("this CPU has neither AVX512-VNNI nor AVX2")
    # every activation and weight at +-127: the largest sums the unsigned-offset trick must undo
    k = 1536
    x = torch.full((rows, k), 3.0)
    x[1] = -3.0
    x[2, ::2] = -3.0
    weight = torch.full((32, k), 127, dtype=torch.int8)
    weight[16:] = -127
    scales = torch.ones(32)
    expected = int8_linear_reference(x, weight, scales, None, 1)
    assert expected.abs().max().item() == pytest.approx(127 * k * 3.0)  # int32 sums of 127 * 127 * k
    assert torch.equal(int8_linear(x, pack_weight(weight), scales, None, 1), expected)


def test_a_mis_shaped_packed_weight_is_refused():
    module = native_module()
    packed = pack_weight(torch.zeros(32, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="packed uint8"):
        module.int8_linear(torch.zeros(2, 8), packed.reshape(2, 2, 64), torch.ones(32), None, 1)
    with pytest.raises(RuntimeError, match="the weight's K"):
        module.int8_linear(torch.zeros(2, 12), packed, torch.ones(32), None, 1)


@pytest.mark.parametrize("cols, out", [(576, 96), (96, 48), (24, 16), (36, 32)])
@pytest.mark.parametrize("packed", [False, True])
def test_weight_rows_give_back_the_float_weight_bit_for_bit_with_the_reference(cols, out, packed):
    weight = w8a8_case(1, cols, out, seed=cols)[1]
    block = hadamard_block(cols)
    q, scales = quantize_int8(rotate_weight(weight, block))
    stored = pack_weight(q) if packed else q
    ids = torch.tensor([out - 1, 0, 5, 5, out // 2, 17 % out])  # repeats, the first and last rows
    rows = int8_weight_rows(stored, scales.float(), ids, block)
    assert torch.equal(rows, weight_rows_reference(stored, scales.float(), ids, block))
    assert torch.equal(weight_rows_reference(q, scales.float(), ids, block), rows)  # packed or not, the same
    # within the int8 grid's rounding of the rotated rows, carried back through the transform
    step = (weight[ids].abs().amax(dim=1, keepdim=True) / 127)
    assert (rows - weight[ids]).abs().max() < step.max() * 2
    assert (rows - weight[ids]).norm() < 0.02 * weight[ids].norm()


@pytest.mark.parametrize("bad", [-1, 48])
def test_weight_rows_refuse_an_id_out_of_range(bad):
    q, scales = quantize_int8(rotate_weight(torch.randn(48, 64), 64))
    with pytest.raises((RuntimeError, IndexError), match="out of range"):
        int8_weight_rows(pack_weight(q), scales.float(), torch.tensor([0, bad]), 64)


@pytest.mark.parametrize("rows", [16, 112, 4096 + 48])  # within one piece, and over several with a short last one
def test_a_w8a8_copy_made_from_rows_a_piece_at_a_time_is_the_whole_weights(rows):
    weight = torch.randn(rows, 576)
    asked = []

    def read(start: int, stop: int) -> torch.Tensor:
        asked.append((start, stop))
        return weight[start:stop]

    block = hadamard_block(576)
    quantized, scales = rotated_int8(weight, block)  # the whole weight's copy, in one pass
    pieces = W8A8Weight.quantize_rows(read, tuple(weight.shape))
    assert pieces.packed and torch.equal(pieces.weight, pack_weight(quantized))
    assert torch.equal(pieces.scales, scales.float()) and pieces.block == block
    whole = W8A8Weight.quantize(weight, pack=True)
    assert torch.equal(whole.weight, pieces.weight) and torch.equal(whole.scales, pieces.scales)
    assert asked[0][0] == 0 and asked[-1][1] == rows and all(a[1] == b[0] for a, b in zip(asked, asked[1:]))
    assert max(stop - start for start, stop in asked) * 576 * 4 <= max(LOAD_PIECE_BYTES, 16 * 576 * 4)
