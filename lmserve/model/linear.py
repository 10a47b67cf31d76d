"""The projection decoder layers are built from (`Linear`, y = x W^T + b), with W held in one of the
weight formats of model/weight_formats/; which one, for each --dtype and CPU, is decided here
(`Linear.quantize`). Also the kernels' view of a Linear (`native_linear`), fused projections, and a
tied model's embeddings read from its head's W8A8 or bf16-panel copy (`HeadEmbedding`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmserve.model.weight_formats import WeightStorage
from lmserve.model.weight_formats.floating import Bf16Panels, FloatWeight, pack_bf16
from lmserve.model.weight_formats.int4 import Int4WeightOnly, can_pack_int4, int4_linear_supported, quantize_w4a8
from lmserve.model.weight_formats.int8 import Int8WeightOnly, W8A8Weight, can_pack, int8_matmul_pays, packs_weights

# Steps of at most this many tokens run a weight-only copy: at a few rows the product is bound by
# the bytes of weights read, and weight-only int8/int4 kernels read a half or a quarter of bf16's;
# larger steps are compute-bound and run W8A8 where the CPU has int8 dot products, bf16 elsewhere
# (the crossovers, measured against bf16: bench/RESULTS.md, "Figures the code cites").
SMALL_STEP_TOKENS = {Int8WeightOnly: 4, Int4WeightOnly: 8}
# Where the W8A8 weight is packed for the kernels' VNNI product, that product is ahead of the
# weight-only int8 kernel from 1 row (bench/RESULTS.md, the same section): int8 needs no small-step
# copy at all. int4 has no entry: the builds that pack run the W4A8 product, which serves int4
# weights at every step.
PACKED_SMALL_STEP_TOKENS = {Int8WeightOnly: 0}


@dataclass(frozen=True, eq=False)
class SmallStepCopy:
    """A weight-only copy of a Linear's weight for steps of at most `max_tokens` tokens."""

    storage: Int8WeightOnly | Int4WeightOnly
    max_tokens: int


class Linear(nn.Linear):
    """A projection whose weight `storage` may be narrower than the activations (inputs are cast or
    quantized to it, outputs come back in their dtype). The checkpoint's float weight is the
    `weight` parameter, so it loads by its checkpoint name and moves with the model; assigning it
    makes it the storage (FloatWeight). quantize() and pack_for_cpu() replace it by another format,
    and quantize() may add a weight-only copy for steps of few tokens (`small_step_copy`)."""

    storage: WeightStorage
    small_step_copy: SmallStepCopy | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "weight" and value is not None:  # built, loaded, tied or cast: the float weight serves
            super().__setattr__("storage", FloatWeight(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copy = self.small_step_copy
        storage = copy.storage if copy is not None and x.shape[0] <= copy.max_tokens else self.storage
        return storage.forward(x, self.bias)

    def pack_for_cpu(self) -> None:
        """Replace a bf16 weight by its layout for the CPU's product (floating.pack_bf16)."""
        self._replace_weight(pack_bf16(self.weight.detach()))

    def quantize(self, kind: str, w8a8: bool = True) -> None:
        """Replace the weight by quantized copies. "int4" where the kernels' W4A8 product runs
        (int4_linear_supported(): AVX512-VNNI or AVX2; N % 16 and K % 32): one copy, the weight's
        4-bit integers with int8 activations, for every step. Otherwise a weight-only copy for small
        steps ("int4" falls back to int8 where the shape rules do not hold) and a W8A8 one for larger
        steps (int8 activations); where the packed W8A8 product serves every step, no weight-only
        copy. w8a8=False (no int8 dot products: int8_matmul_pays) keeps the weight, cast to bf16, for
        the larger steps instead."""
        weight = self.weight.detach()
        if kind == "int4" and int4_linear_supported() and can_pack_int4(weight):
            self._replace_weight(quantize_w4a8(weight))
            return
        small_format = Int4WeightOnly if kind == "int4" and can_pack_int4(weight) else Int8WeightOnly
        large = W8A8Weight.quantize(weight, pack=packs_weights()) if w8a8 else None
        limits = PACKED_SMALL_STEP_TOKENS if large is not None and large.packed else SMALL_STEP_TOKENS
        max_tokens = limits[small_format]
        if max_tokens > 0:
            self.small_step_copy = SmallStepCopy(small_format.quantize(weight), max_tokens)
        if large is not None:
            self._replace_weight(large)  # every step now runs on one of the copies
        else:
            self.to(torch.bfloat16)  # weight and bias, as prepare() casts an unquantized bf16 model

    def quantize_rows(self, rows: Callable[[int, int], torch.Tensor]) -> bool:
        """quantize("int8") of a weight not filled yet, read as rows(start, stop) a piece at a time
        (W8A8Weight.quantize_rows), where that gives one copy for every step: a W8A8 weight the
        kernels pack, on a CPU where int8 products pay, with no weight-only copy beside it
        (PACKED_SMALL_STEP_TOKENS). False, and nothing done, elsewhere (a weight-only copy for small
        steps, or bf16 for large ones, needs the weight whole)."""
        if not (int8_matmul_pays() and packs_weights() and can_pack(self.weight)
                and PACKED_SMALL_STEP_TOKENS[Int8WeightOnly] == 0):
            return False
        self._replace_weight(W8A8Weight.quantize_rows(rows, tuple(self.weight.shape)))
        return True

    def _replace_weight(self, storage: WeightStorage) -> None:
        self.weight = None
        self.storage = storage


# kernels/decoder.cpp's NativeLinear fields, in the order its constructor takes them, with the
# values of a Linear that uses none of them.
NATIVE_LINEAR_DEFAULTS = {
    "weight": None, "bias": None, "layout": 0, "outputs": 0,  # a float weight: plain, oneDNN-packed or panels
    "narrow": 0, "narrow_weight": None, "narrow_scales": None, "small_step_tokens": 0,  # a small-step copy
    "wide_weight": None, "wide_scales": None, "wide_block": 1,  # W8A8
    "int4_weight": None, "int4_scales": None, "int4_lows": None,  # W4A8
}


def native_linear(module, linear: Linear):
    """The kernels' view of a Linear: the same tensors, not copies."""
    fields = dict(NATIVE_LINEAR_DEFAULTS, bias=None if linear.bias is None else linear.bias.detach())
    fields.update(linear.storage.native_fields())
    copy = linear.small_step_copy
    if copy is not None:
        fields.update(copy.storage.native_fields(), small_step_tokens=copy.max_tokens)
    assert fields.keys() == NATIVE_LINEAR_DEFAULTS.keys(), fields.keys()
    return module.NativeLinear(*fields.values())


def fuse_linears(parts: list[nn.Linear], dtype: torch.dtype) -> Linear:
    """One Linear computing all of `parts` side by side (one matmul instead of several)."""
    weight = torch.cat([p.weight.detach() for p in parts]).to(dtype)
    has_bias = parts[0].bias is not None
    fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]).to(dtype), requires_grad=False)
    return fused


class HeadEmbedding(nn.Module):
    """A tied model's token embeddings read from its head's copy (`rows`): one table instead of two.
    A W8A8 head is half the bytes of the bf16 table it replaces, its rows within int8 rounding of the
    file's Q8_0 ones (bench/RESULTS.md, "Figures the code cites"); a bf16 head in the kernels'
    panels (Bf16Panels) gives the bf16 table's own values."""

    def __init__(self, head: W8A8Weight | Bf16Panels):
        super().__init__()
        self.head = head  # the head's own tensors, not copies

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.rows(input_ids)
