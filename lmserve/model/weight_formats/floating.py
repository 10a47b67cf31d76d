"""float32 and bf16 weights: inputs are cast to the weight's dtype and outputs back (bf16 weights
halve the bytes read per token). float32 products run the kernels' f32_linear on the CPU
(kernels/f32_linear.cpp: batch-invariant by construction, and faster than torch's:
bench/RESULTS.md, twenty-eighth sitting), torch's elsewhere. On the CPU a bf16 weight is laid out
once for its product: in the kernels' panels (Bf16Panels, kernels/bf16_linear.cpp) where the CPU
has AVX512-BF16 and no AMX tiles, 1.6-1.9x oneDNN's speed at the few rows of a decode step and
about even on prompt chunks (bench/RESULTS.md, twenty-ninth sitting); elsewhere in oneDNN's blocked layout,
so each matmul stops re-laying it out (faster than the plain weight, the same values:
bench/RESULTS.md, "Figures the code cites"), and AMX tiles run its larger steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmserve.kernels import native_module

PACK_BATCH_HINT = 64  # rows oneDNN picks the blocked weight layout for (any row count works)
LAYOUT_ONEDNN, LAYOUT_PANELS = 1, 2  # kernels/decoder.cpp's Layout of a float weight (0: plain)


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


def bf16_panels_run() -> bool:
    """Whether bf16 weights take the kernels' panels here (AVX512-BF16, no AMX tiles)."""
    module = native_module()
    return module is not None and module.bf16_linear_supported() and not module.amx_bf16_usable()


def packs_bf16() -> bool:
    """Whether pack_bf16 has a layout here: the kernels' panels, or oneDNN's where it multiplies bf16
    on this CPU (AVX512-BW or AVX-NE-CONVERT; on AVX2 alone its reorder refuses bf16 weights)."""
    return bf16_panels_run() or (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_layout() -> type:
    """The format a bf16 projection weight takes here: the kernels' panels, oneDNN's layout, or the
    plain weight where neither has a bf16 product (packs_bf16)."""
    return Bf16Panels if bf16_panels_run() else OneDNNPackedWeight if packs_bf16() else FloatWeight


def pack_bf16(weight: torch.Tensor) -> Bf16Panels | OneDNNPackedWeight:
    """A bf16 weight laid out for the CPU's fastest product of it (the module's docstring)."""
    return Bf16Panels.pack(weight) if bf16_panels_run() else OneDNNPackedWeight.pack(weight)


@dataclass(frozen=True, eq=False)
class Bf16Panels:
    """A bf16 weight in the kernels' panels of 32 outputs (kernels/bf16_linear.cpp): the same values
    and memory, zeros padding the outputs to 32 and the columns to pairs."""

    panels: torch.Tensor  # (ceil(N/32), ceil(K/2), 32, 2) bfloat16
    out_features: int  # N
    in_features: int  # K

    @classmethod
    def pack(cls, weight: torch.Tensor) -> Bf16Panels:
        """(N, K) bf16 -> its panels."""
        return cls(native_module().bf16_panels(weight), *weight.shape)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return native_module().bf16_linear(x, self.panels, bias, self.out_features).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(T,) ids -> (T, K) float32: those rows of the weight, exactly."""
        return native_module().bf16_panel_rows(self.panels, ids, self.out_features, self.in_features)

    def native_fields(self) -> dict[str, Any]:
        return {"weight": self.panels, "layout": LAYOUT_PANELS, "outputs": self.out_features}


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
        return {"weight": self.weight, "layout": LAYOUT_ONEDNN}
