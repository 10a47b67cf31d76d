"""float32 and bf16 weights: inputs are cast to the weight's dtype and outputs back (bf16 weights
halve the bytes read per token). float32 products run the kernels' f32_linear on the CPU
(kernels/f32_linear.cpp: batch-invariant by construction, and faster than torch's:
bench/RESULTS.md, twenty-eighth sitting), torch's elsewhere; bf16 ones torch's, on the CPU with the
weight in oneDNN's blocked layout, so each matmul stops re-laying it out (faster, the same values:
bench/RESULTS.md, "Figures the code cites")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmserve.kernels import native_module

PACK_BATCH_HINT = 64  # rows oneDNN picks the blocked weight layout for (any row count works)


@dataclass(frozen=True, eq=False)
class FloatWeight:
    """The checkpoint's weight in float32 or bf16, as F.linear takes it."""

    weight: torch.Tensor  # (N, K) float32 or bfloat16: the Linear's `weight` parameter itself

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight.dtype == torch.float32 and self.weight.device.type == "cpu":
            module = native_module()
            if module is not None:
                return module.f32_linear(x.float(), self.weight, bias).to(x.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)

    def native_fields(self) -> dict[str, Any]:
        return {"weight": self.weight.detach()}


@dataclass(frozen=True, eq=False)
class OneDNNPackedWeight:
    """A bf16 weight in oneDNN's blocked layout: the same values, no extra memory."""

    weight: torch.Tensor  # opaque oneDNN tensor holding the (N, K) bfloat16 weight

    @classmethod
    def pack(cls, weight: torch.Tensor) -> OneDNNPackedWeight:
        """(N, K) bf16 -> its blocked layout."""
        return cls(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, bias, "none", [None], "")
        return out.to(x.dtype)

    def native_fields(self) -> dict[str, Any]:
        return {"weight": self.weight, "packed": True}
