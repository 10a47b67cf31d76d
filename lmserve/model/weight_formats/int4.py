"""Projections with 4-bit weights and int8 activations (W4A8, kernels/int4_linear.cpp) for every
step under --dtype int4 where the kernels run it, and weight-only int4 copies (bf16 activations,
torch's kernel) for steps of few tokens where they do not.

W4A8: the weight keeps its 4-bit integers q (0..15) with a scale and a low value per group of INT4_GROUP
input columns (Q4_1's form); activations are quantized to int8 in the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmserve.kernels import native_module
from lmserve.memory import LOAD_PIECE_BYTES
from lmserve.model.weight_formats.int8 import MIN_ABS_MAX, PACK_OUTPUTS

INT4_GROUP = 32  # input columns per scale/low pair: Q4_0/Q4_1's block, so a Q4 GGUF maps exactly
INT4_PACK_DEPTH = 8  # a packed int4 weight's blocks: 16 outputs x 8 columns of K (two nibbles a byte)
# Steps of at most this many rows (single-token decodes) quantize the activations twice, the int8
# rows and what they missed (kResidualRows in kernels/int4_linear.cpp): ~15 bits instead of 7, for
# a fifth more time in a one-row step's projections (bench/RESULTS.md, "Figures the code cites").
RESIDUAL_ROWS = 1


def int4_linear_supported() -> bool:
    """Whether int4_linear here runs on the kernels' W4A8 product (built with AVX512-VNNI or AVX2)."""
    module = native_module()
    return module is not None and module.int4_linear_supported()


def int4_pairs_run() -> bool:
    """Whether W4A8 weights take the pairs layout here (W4A8Pairs): where the W4A8 product runs on
    its register tiles at every step, without the AMX tiles that read the blocks layout."""
    module = native_module()
    return module is not None and module.int4_linear_supported() and not module.int4_tiles_supported()


def can_pack_int4(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return n % PACK_OUTPUTS == 0 and k % INT4_GROUP == 0



def quantize_int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) uint8 q in 0..15, (K/G, N) float16 scales and lows, w ~ q * scale + low.
    Each group of INT4_GROUP takes the closer of two grids: Q4_1's (the group's min and max at 0 and
    15) and Q4_0's (w = (q - 8) * d, the value of largest magnitude at q = 0, so d and with it the
    scale may be negative). Weights dequantized from a Q4_1 or a Q4_0 file come back to the file's
    own integers, scales and lows; other weights are rounded to the closer grid. The kernels' copy
    of it gives the same values (the torch ops were most of a model's load: bench/RESULTS.md,
    twelfth sitting); it is built with AVX-512 or AVX2 (elsewhere the torch ops run)."""
    module = native_module()
    if module is not None and module.int4_quantize_supported():
        q, scale, low = module.quantize_int4_groups(weight.float().contiguous())
        return q, scale.t().contiguous(), low.t().contiguous()
    return quantize_int4_groups_reference(weight)


def quantize_int4_groups_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4_groups in torch ops (where the kernels' copy is not built: int4_quantize_supported)."""
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.uint8)
    scale = torch.empty((n, k // INT4_GROUP), dtype=torch.float16)
    low = torch.empty_like(scale)
    # Rows a piece at a time (memory.LOAD_PIECE_BYTES of float32): whole-weight temporaries would each be
    # mapped and faulted in afresh while loading, which tripled a model's quantizing time.
    rows = max(1, LOAD_PIECE_BYTES // (4 * k))
    for start in range(0, n, rows):
        piece = slice(start, start + rows)
        q[piece], scale[piece], low[piece] = _quantize_rows(weight[piece])
    return q, scale.t().contiguous(), low.t().contiguous()


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4_groups of a few rows, scales and lows still (rows, K/G)."""
    n, k = weight.shape
    groups = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low1 = groups.amin(dim=-1).half().float()
    scale1 = ((groups.amax(dim=-1) - low1) / 15).half().float()
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    scale0 = (extreme / -8).half().float()
    best = None
    for scale, low in ((scale1, low1), (scale0, -8 * scale0)):
        divisor = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: q = 0, w = low
        q = torch.round((groups - low[..., None]) / divisor[..., None]).clamp(0, 15)
        error = (q * scale[..., None] + low[..., None] - groups).abs().amax(dim=-1)
        if best is None:
            best = (q, scale, low, error)
        else:  # Q4_0's grid where it is strictly closer
            closer = error < best[3]
            best = (torch.where(closer[..., None], q, best[0]), torch.where(closer, scale, best[1]),
                    torch.where(closer, low, best[2]), error)
    q, scale, low, _ = best
    return q.to(torch.uint8).view(n, k), scale.half(), low.half()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in 0..15 -> (N/16, K/8, 16, 4) uint8: byte [j, s, l, b] holds q[16 j + l, 8 s + b]
    in its low nibble and q[16 j + l, 8 s + 4 + b] in its high one (the kernel's vpdpbusd layout).
    On the kernels where they are built, else in torch ops (pack_int4_reference)."""
    module = native_module()
    if module is not None:
        return module.pack_int4(q.contiguous())
    return pack_int4_reference(q)


def pack_int4_reference(q: torch.Tensor) -> torch.Tensor:
    """pack_int4 in torch ops."""
    n, k = q.shape
    r = q.reshape(n // PACK_OUTPUTS, PACK_OUTPUTS, k // INT4_PACK_DEPTH, 2, 4)  # [j, l, s, half, b]
    return (r[:, :, :, 0, :] | (r[:, :, :, 1, :] << 4)).permute(0, 2, 1, 3).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse."""
    blocks, steps = packed.shape[:2]
    halves = torch.stack([packed & 0x0F, packed >> 4], dim=3)  # [j, s, l, half, b]
    return halves.permute(0, 2, 1, 3, 4).reshape(blocks * PACK_OUTPUTS, steps * INT4_PACK_DEPTH)


def quantize_groups_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) float32 -> (M, K) int8, (M, K/G) scales and (M, K/G) sums (scale * sum of the group's
    integers), each group of INT4_GROUP columns on its own scale, round half to even."""
    m, k = x.shape
    groups = x.reshape(m, k // INT4_GROUP, INT4_GROUP)
    scales = groups.abs().amax(dim=-1).clamp(min=MIN_ABS_MAX) / 127
    q = torch.round(groups / scales[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(m, k), scales, q.sum(dim=-1) * scales


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """kernels/int4_linear.cpp's arithmetic in float64 (the kernel accumulates in float32):
    sum over groups of x_scale * w_scale * (int sum of q x_q) + w_low * x_sum, for the int8 rows
    and, in steps of at most RESIDUAL_ROWS rows, for the rows of what they missed as well."""
    m, k = x.shape
    q = unpack_int4(packed)
    n, groups = q.shape[0], k // INT4_GROUP
    x = x.float()
    parts = [quantize_groups_reference(x)]
    if m <= RESIDUAL_ROWS:
        xq, x_scales, _ = parts[0]
        parts.append(quantize_groups_reference(x - (xq.float().view(m, groups, INT4_GROUP) * x_scales[..., None]).view(m, k)))
    out = 0
    for xq, x_scales, x_sums in parts:
        dots = torch.einsum("mgc,ngc->mgn", xq.reshape(m, groups, INT4_GROUP).double(),
                            q.reshape(n, groups, INT4_GROUP).double())  # exact: integers below 2^53
        out = out + (dots * x_scales.double()[..., None] * scales.double()[None]
                     + x_sums.double()[..., None] * lows.double()[None]).sum(dim=1).float()
    return out if bias is None else out + bias.float()


def int4_linear_bf16_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """kernels/int4_bf16_tiles.h's arithmetic (steps of many rows on AMX-BF16 tiles) in float64 (the
    tiles accumulate in float32): the weight widened to bfloat16 (q * scale + low, rounded to nearest
    even) times the activations rounded to bfloat16."""
    q = unpack_int4(packed)
    n, k = q.shape
    weight = (q.float().view(n, -1, INT4_GROUP) * scales.t().float()[..., None]
              + lows.t().float()[..., None]).view(n, k)
    out = (x.float().bfloat16().double() @ weight.bfloat16().double().t()).float()
    return out if bias is None else out + bias.float()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) float32, packed (N/16, K/8, 16, 4) uint8 from pack_int4, scales and lows (K/G, N)
    float16 -> (M, N) float32."""
    if not int4_linear_supported():
        return int4_linear_reference(x, packed, scales, lows, bias)
    return native_module().int4_linear(x, packed, scales, lows, bias)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of INT4_GROUP input columns, w = (q - 8) * scale + zero, packed for
    torch's weight-only kernel. Each group's min and max map to 0 and 15, which is how Q4_1 quantizes:
    weights dequantized from a Q4_1 file come back to the file's own integers (and Q4_0's sit on its grid)."""
    n, k = weight.shape
    groups = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    return packed, scale_zero.to(torch.bfloat16)


@dataclass(frozen=True, eq=False)
class W4A8Weight:
    """A weight's 4-bit integers with a float16 scale and low per group, multiplied by int8
    activations in the same groups (int4_linear)."""

    weight: torch.Tensor  # (N/16, K/8, 16, 4) uint8 from pack_int4
    scales: torch.Tensor  # (K/G, N) float16
    lows: torch.Tensor  # (K/G, N) float16

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> W4A8Weight:
        """(N, K) float (can_pack_int4) -> its W4A8 copy."""
        q, scales, lows = quantize_int4_groups(weight)
        return cls(pack_int4(q), scales, lows)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x.float(), self.weight, self.scales, self.lows, bias).to(x.dtype)

    def native_fields(self) -> dict[str, Any]:
        return {"int4_weight": self.weight, "int4_scales": self.scales, "int4_lows": self.lows}


@dataclass(frozen=True, eq=False)
class W4A8Pairs:
    """A W4A8Weight's integers with their scales and lows in one stream per pair of 16-output blocks,
    group after group (kernels/int4_registers.h), for the register tiles: the same results bit for
    bit, and steps of 1-4 rows 1.2-1.5x faster than on the blocks layout, whose scales lie a page
    apart group after group (`python -m bench.int4_layouts`; bench/RESULTS.md, thirtieth sitting)."""

    weight: torch.Tensor  # (N/32, K/G, 640) uint8 from pack_int4_pairs

    @classmethod
    def of(cls, blocks: W4A8Weight) -> W4A8Pairs:
        return cls(native_module().pack_int4_pairs(blocks.weight, blocks.scales, blocks.lows))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return native_module().int4_pairs_linear(x.float(), self.weight, bias).to(x.dtype)

    def native_fields(self) -> dict[str, Any]:
        return {"int4_weight": self.weight, "int4_scales": None, "int4_lows": None}


def quantize_w4a8(weight: torch.Tensor) -> W4A8Weight | W4A8Pairs:
    """(N, K) float (can_pack_int4) -> its W4A8 copy, in the pairs layout where that one serves
    (int4_pairs_run(), N a multiple of 32)."""
    blocks = W4A8Weight.quantize(weight)
    return W4A8Pairs.of(blocks) if int4_pairs_run() and weight.shape[0] % 32 == 0 else blocks


@dataclass(frozen=True, eq=False)
class Int4WeightOnly:
    """Asymmetric 4-bit weights in groups of INT4_GROUP with bf16 activations, on torch's weight-only kernel."""

    weight: torch.Tensor  # torch's int4pack layout of the (N, K) 4-bit integers (quantize_int4)
    scale_zero: torch.Tensor  # (K/G, N, 2) bfloat16: each group's scale and zero
    NATIVE_KIND = 2  # kInt4 of kernels/decoder.cpp's Narrow

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int4WeightOnly:
        """(N, K) float (can_pack_int4) -> its weight-only int4 copy."""
        return cls(*quantize_int4(weight))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        xb = x.to(torch.bfloat16).contiguous()
        out = torch._weight_int4pack_mm_for_cpu(xb, self.weight, INT4_GROUP, self.scale_zero)
        return (out if bias is None else out + bias).to(x.dtype)

    def native_fields(self) -> dict[str, Any]:
        return {"narrow": self.NATIVE_KIND, "narrow_weight": self.weight, "narrow_scales": self.scale_zero}
