"""int8 weights: W8A8 (int8 activations too) for steps of many tokens, and weight-only copies
(bf16 activations, torch's kernel) for steps of few, where reading the weight is the cost (4-bit
weights with int8 activations, W4A8, are in int4.py beside this file).

W8A8: each input row is quantized to int8 with its own scale and multiplied by a per-output-row int8
weight with int32 sums, then scaled back to float32. Where the kernels are built with AVX512-VNNI
the weight is stored packed for their own product (`pack_weight`); elsewhere it stays (N, K) for
torch._int_mm (oneDNN). From half the weight bytes both outrun bf16, and the packed product
oneDNN's int8 one up to about 256 rows (bench/RESULTS.md, "Figures the code cites").

A per-row scale is hostage to a row's largest value, and these models carry a few channels many
times larger than the rest. So both sides are first multiplied by a Walsh-Hadamard matrix in blocks
of HADAMARD_BLOCK columns: (x H)(W H)^T / B = x W^T, and x H spreads each large channel evenly over
its block (what that does to the error against float32: the same section).

`int8_linear` runs the compiled kernel (lmserve/kernels/int8_linear.cpp) when it is built and
`int8_linear_reference` otherwise: the same arithmetic in ATen ops, the same results bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmserve.kernels import cpu_flags, native_module
from lmserve.memory import LOAD_PIECE_BYTES

MIN_ABS_MAX = 1e-12  # kMinAbsMax in kernels/int8_rows.h
HADAMARD_BLOCK = 64  # columns mixed together (smaller where K is not a multiple of it)
PACK_OUTPUTS, PACK_DEPTH = 16, 4  # a packed weight's blocks: 16 outputs (int32 lanes) x 4 bytes of K


def int8_matmul_pays() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI), on which the
    W8A8 product outruns bf16's (bench/RESULTS.md, "Figures the code cites"), or the kernels' packed
    W8A8 product runs here on AVX2 (packs_weights), where bf16 has no instructions of its own.
    Elsewhere larger steps keep bf16 weights."""
    return not cpu_flags().isdisjoint({"avx512_vnni", "avx_vnni"}) or packs_weights()


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
    """Whether int8_linear here takes weights packed by pack_weight (kernels built with AVX512-VNNI or AVX2)."""
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


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (N, K) int8 values and (N,) bf16 scales. The values are
    rounded against the bf16 scales themselves, so int8 * scale is the weight as closely as the
    stored scale allows (the weight-only kernel takes bf16 scales, W8A8 the same ones widened)."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
    quantized = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized, scales


def rotated_int8(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8(rotate_weight(weight, block)): in one pass on the kernels where they are built
    (in torch ops, a tied head's was the largest part of a model's load: bench/RESULTS.md, thirteenth sitting),
    else rotated_int8_reference."""
    module = native_module()
    if module is not None:
        return module.rotated_int8(weight.float().contiguous(), block)
    return rotated_int8_reference(weight, block)


def rotated_int8_reference(weight: torch.Tensor, block: int, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """rotated_int8 in torch ops, `rows` rows at a time (every step is per row): the transform
    works in float64, which for a whole embedding-sized head is 4x its float32 bytes."""
    parts = [quantize_int8(rotate_weight(part.float(), block)) for part in weight.split(rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


@dataclass(frozen=True, eq=False)
class W8A8Weight:
    """A weight's Hadamard transform in int8, multiplied by int8 activations (int8_linear)."""

    weight: torch.Tensor  # (N, K) int8 of rotate_weight(W, block), or its pack_weight: (N/16, K/4, 16, 4) uint8
    scales: torch.Tensor  # (N,) float32
    block: int  # Hadamard block of K's columns (hadamard_block)

    @classmethod
    def quantize(cls, weight: torch.Tensor, pack: bool) -> W8A8Weight:
        """(N, K) float -> its W8A8 copy, packed for the kernels' product where `pack` and its shape allow."""
        if pack and can_pack(weight):
            return cls.quantize_rows(lambda start, stop: weight[start:stop], tuple(weight.shape), weight.shape[0])
        block = hadamard_block(weight.shape[1])
        quantized, scales = rotated_int8(weight, block)
        return cls(quantized, scales.float(), block)

    @classmethod
    def quantize_rows(cls, rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int],
                      piece: int | None = None) -> W8A8Weight:
        """The packed copy of a weight of `shape` that packs (can_pack), read as rows(start, stop)
        `piece` rows at a time (by default memory.LOAD_PIECE_BYTES of float32, whole packed groups of
        rows): the same bytes whatever the pieces (every step of the copy is per row), without the
        whole float weight or its unpacked copy ever held (a tied head's table is the largest tensor
        of a small model: 113 MB of float32 for the default one's)."""
        n, k = shape
        block = hadamard_block(k)
        piece = piece or max(1, LOAD_PIECE_BYTES // (4 * k * PACK_OUTPUTS)) * PACK_OUTPUTS
        packed = torch.empty(n // PACK_OUTPUTS, k // PACK_DEPTH, PACK_OUTPUTS, PACK_DEPTH, dtype=torch.uint8)
        scales = torch.empty(n, dtype=torch.float32)
        for start in range(0, n, piece):
            stop = min(n, start + piece)
            quantized, piece_scales = rotated_int8(rows(start, stop), block)
            packed[start // PACK_OUTPUTS:stop // PACK_OUTPUTS] = pack_weight(quantized)
            scales[start:stop] = piece_scales
        return cls(packed, scales, block)

    @property
    def packed(self) -> bool:
        return self.weight.dtype == torch.uint8

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x.float(), self.weight, self.scales, bias, self.block).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids -> (T, K) float32: those rows of the float weight this copy stands for."""
        return int8_weight_rows(self.weight, self.scales, ids, self.block)

    def native_fields(self) -> dict[str, Any]:
        return {"wide_weight": self.weight, "wide_scales": self.scales, "wide_block": self.block}


@dataclass(frozen=True, eq=False)
class Int8WeightOnly:
    """Per-row int8 weights with bf16 activations, on torch's weight-only kernel."""

    weight: torch.Tensor  # (N, K) int8
    scales: torch.Tensor  # (N,) bfloat16
    NATIVE_KIND = 1  # kInt8 of kernels/decoder.cpp's Narrow

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8WeightOnly:
        return cls(*quantize_int8(weight))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight, self.scales)
        return (out if bias is None else out + bias).to(x.dtype)

    def native_fields(self) -> dict[str, Any]:
        return {"narrow": self.NATIVE_KIND, "narrow_weight": self.weight, "narrow_scales": self.scales}
