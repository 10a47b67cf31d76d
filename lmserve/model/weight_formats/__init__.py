"""How a projection's weight is stored and multiplied, one module per weight type:

    floating.py   float32 and bf16 weights (FloatWeight); bf16 in the kernels' panels (Bf16Panels) or in
                  oneDNN's blocked layout (OneDNNPackedWeight)
    int8.py       int8 weights: W8A8 with int8 activations (W8A8Weight), weight-only (Int8WeightOnly)
    int4.py       4-bit weights: W4A8 with int8 activations (W4A8Weight; W4A8Pairs in one stream a pair of
                  blocks, where the register tiles serve every step), weight-only (Int4WeightOnly)

model/linear.py's Linear holds one of them and picks which (Linear.quantize).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class WeightStorage(Protocol):
    """One way of storing a projection's (N, K) weight, with the product that reads it."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) -> x W^T + bias (M, N), in x's dtype."""

    def native_fields(self) -> dict[str, Any]:
        """Its tensors by the names of kernels/decoder.cpp's NativeLinear fields (the same tensors)."""
