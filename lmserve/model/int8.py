"""Projections with int8 weights and int8 activations (W8A8) for steps of many tokens, and with
4-bit weights and int8 activations (W4A8, at the end of this file) for every step under --dtype int4.

Each input row is quantized to int8 with its own scale and multiplied by a per-output-row int8
weight with int32 sums, then scaled back to float32. Where the kernels are built with AVX512-VNNI
the weight is stored packed for their own product (`pack_weight`); elsewhere it stays (N, K) for
torch._int_mm (oneDNN). On this 2-core AVX-512 machine oneDNN's int8 product runs ~1.7x as fast as
its bf16 one at 32-512 rows, from half the weight bytes, and the packed kernel 1.3-2.3x oneDNN's
int8 one at 9-64 rows (about even from 256 rows).

A per-row scale is hostage to a row's largest value, and these models carry a few channels many
times larger than the rest (in SmolLM2's residual stream, 20x the median). So both sides are first
multiplied by a Walsh-Hadamard matrix in blocks of HADAMARD_BLOCK columns: (x H)(W H)^T / B = x W^T,
and x H spreads each large channel evenly over its block. Teacher-forced against float32 on the
default model this takes the prefill's KL from 3.6e-2 to 4.5e-3 (top-1 agreement 0.89 -> 0.98).

`int8_linear` runs the compiled kernel (lmserve/kernels/int8_linear.cpp) when it is built and
`int8_linear_reference` otherwise: the same arithmetic in ATen ops, the same results bit for bit.
"""

from __future__ import annotations

import torch

from lmserve.kernels import cpu_flags, native_module

MIN_ABS_MAX = 1e-12  # kMinAbsMax in kernels/int8_linear.cpp
HADAMARD_BLOCK = 64  # columns mixed together (smaller where K is not a multiple of it)
PACK_OUTPUTS, PACK_DEPTH = 16, 4  # a packed weight's blocks: 16 outputs (int32 lanes) x 4 bytes of K


def int8_matmul_pays() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI), on which the
    W8A8 product was measured ~1.7x bf16's. Elsewhere (unmeasured) larger steps keep bf16 weights."""
    return not cpu_flags().isdisjoint({"avx512_vnni", "avx_vnni"})


def hadamard_block(k: int) -> int:
    """The largest power of two up to HADAMARD_BLOCK dividing k (1: no transform)."""
    block = HADAMARD_BLOCK
    while k % block:
        block //= 2
    return block


def hadamard_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """(M, K) rows times the unnormalized Walsh-Hadamard matrix, blockwise: stage h = 1, 2, 4, ...
    maps each pair (a, b) at distance h to (a + b, a - b), as the kernel's `hadamard` does."""
    rows, cols = x.shape
    h = 1
    while h < block:
        pairs = x.reshape(rows, cols // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        x = torch.stack([a + b, a - b], dim=2).reshape(rows, cols)
        h *= 2
    return x


def rotate_weight(weight: torch.Tensor, block: int) -> torch.Tensor:
    """W H / block for (N, K) W, computed in float64: the weight side of the transform."""
    n, k = weight.shape
    eye = torch.eye(block, dtype=torch.float64)
    h = hadamard_rows(eye, block)  # H itself (symmetric)
    return (weight.double().reshape(n, k // block, block) @ h / block).reshape(n, k).float()


def quantize_rows_reference(x: torch.Tensor, block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float32 -> (M, K) int8 and (M,) float32 scales (after the blockwise transform),
    round half to even."""
    x = hadamard_rows(x, block)
    scales = x.abs().amax(dim=-1).clamp(min=MIN_ABS_MAX) / 127
    q = torch.round(x / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def packs_weights() -> bool:
    """Whether int8_linear here takes weights packed by pack_weight (kernels built with AVX512-VNNI)."""
    module = native_module()
    return module is not None and module.int8_packed_supported()


def can_pack(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return n % PACK_OUTPUTS == 0 and k % PACK_DEPTH == 0


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> (N/16, K/4, 16, 4) uint8 holding weight + 128: for each 16 outputs, K in
    groups of 4, the 16 outputs' 4 bytes together, as the kernel's vpdpbusd takes them."""
    n, k = weight.shape
    shifted = weight.view(torch.uint8) ^ 0x80  # w + 128: the sign bit flipped, no wider copy
    return shifted.reshape(n // PACK_OUTPUTS, PACK_OUTPUTS, k // PACK_DEPTH, PACK_DEPTH).permute(0, 2, 1, 3).contiguous()


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """pack_weight's inverse."""
    blocks, groups = packed.shape[:2]
    weight = (packed.to(torch.int16) - 128).to(torch.int8).permute(0, 2, 1, 3)
    return weight.reshape(blocks * PACK_OUTPUTS, groups * PACK_DEPTH)


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None, block: int = 1) -> torch.Tensor:
    if weight.dtype == torch.uint8:
        weight = unpack_weight(weight)
    xq, x_scales = quantize_rows_reference(x, block)
    out = torch._int_mm(xq, weight.t()).float() * x_scales[:, None] * scales
    return out if bias is None else out + bias.float()


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                block: int) -> torch.Tensor:
    """x (M, K) float32, weight (N, K) int8 quantized after rotate_weight(., block) or its
    pack_weight, scales (N,) float32 -> (M, N) float32."""
    module = native_module()
    if module is None:
        return int8_linear_reference(x, weight, scales, bias, block)
    return module.int8_linear(x, weight, scales, bias, block)


def weight_rows_reference(weight: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, block: int) -> torch.Tensor:
    """Rows `ids` of the float weight that `weight` (int8 (N, K) quantized after rotate_weight(., block),
    or its pack_weight) and `scales` stand for: hadamard_rows(q) * scale, since (W H / block) H = W."""
    ids = ids.long()
    if weight.dtype == torch.uint8:  # output i's bytes sit at [i // 16, :, i % 16, :]
        q = (weight[ids // PACK_OUTPUTS, :, ids % PACK_OUTPUTS, :].to(torch.int16) - 128).reshape(len(ids), -1)
    else:
        q = weight[ids]
    return hadamard_rows(q.float(), block) * scales[ids][:, None]


def int8_weight_rows(weight: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor, block: int) -> torch.Tensor:
    """(T,) ids -> (T, K) float32: weight_rows_reference, on the kernels when they are built."""
    module = native_module()
    if module is None:
        if not ((ids >= 0) & (ids < scales.numel())).all():
            raise IndexError(f"ids out of range [0, {scales.numel()})")
        return weight_rows_reference(weight, scales, ids, block)
    return module.int8_weight_rows(weight, scales, ids, block)


# W4A8: 4-bit weights with int8 activations (kernels/int4_linear.cpp), for --dtype int4 where the
# kernels run. The weight keeps its 4-bit integers q (0..15) with a scale and a low value per group of
# INT4_GROUP input columns (Q4_1's form); activations are quantized to int8 in the same groups.
INT4_GROUP = 32  # input columns per scale/low pair: Q4_0/Q4_1's block, so a Q4 GGUF maps exactly
INT4_PACK_DEPTH = 8  # a packed int4 weight's blocks: 16 outputs x 8 columns of K (two nibbles a byte)
# Steps of at most this many rows (single-token decodes) quantize the activations twice, the int8
# rows and what they missed (kResidualRows in kernels/int4_linear.cpp): ~15 bits instead of 7, for
# 18-21% more time on the 120 projections of a one-row step (measured against the build without).
RESIDUAL_ROWS = 1


def int4_linear_supported() -> bool:
    """Whether int4_linear here runs on the kernels' W4A8 product (built with AVX512-VNNI)."""
    module = native_module()
    return module is not None and module.int4_linear_supported()


def can_pack_int4(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return n % PACK_OUTPUTS == 0 and k % INT4_GROUP == 0


def quantize_int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (N, K) uint8 q in 0..15, (K/G, N) float16 scales and lows, w ~ q * scale + low.
    Each group of INT4_GROUP takes the closer of two grids: Q4_1's (the group's min and max at 0 and
    15) and Q4_0's (w = (q - 8) * d, the value of largest magnitude at q = 0, so d and with it the
    scale may be negative). Weights dequantized from a Q4_1 or a Q4_0 file come back to the file's
    own integers, scales and lows; other weights are rounded to the closer grid."""
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
    return q.to(torch.uint8).view(n, k), scale.t().half().contiguous(), low.t().half().contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in 0..15 -> (N/16, K/8, 16, 4) uint8: byte [j, s, l, b] holds q[16 j + l, 8 s + b]
    in its low nibble and q[16 j + l, 8 s + 4 + b] in its high one (the kernel's vpdpbusd layout)."""
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


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) float32, packed (N/16, K/8, 16, 4) uint8 from pack_int4, scales and lows (K/G, N)
    float16 -> (M, N) float32."""
    if not int4_linear_supported():
        return int4_linear_reference(x, packed, scales, lows, bias)
    return native_module().int4_linear(x, packed, scales, lows, bias)
