"""Read GGUF files: metadata as plain Python values, tensors dequantized to float32."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

# Quant types the loader accepts; anything else is refused by name before any work is done.
SUPPORTED_QUANT_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
)


class UnsupportedModelError(ValueError):
    """The file is readable but holds an architecture or quant type lmserve cannot run."""


@dataclass
class GGUFFile:
    """An opened GGUF file: `metadata` maps keys to Python values (str, int, float, bool, lists)."""

    path: Path
    reader: GGUFReader
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        reader = GGUFReader(str(path), "r")
        metadata = {name: field.contents() for name, field in reader.fields.items()}
        # The reader's own view of the metadata is a numpy array per part of every field (~150,000
        # for a 49k-token vocabulary, ~75 MiB): read once into `metadata`, it is let go.
        reader.fields = {}
        return cls(Path(path), reader, metadata)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.reader.tensors]

    def check_quant_types(self) -> None:
        """Raise UnsupportedModelError naming the first tensor whose quant type is not supported."""
        for tensor in self.reader.tensors:
            if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
                raise UnsupportedModelError(
                    f"tensor {tensor.name!r} uses quant type {tensor.tensor_type.name}, which lmserve "
                    f"does not support (supported: {', '.join(sorted(t.name for t in SUPPORTED_QUANT_TYPES))})"
                )

    def iter_tensors(self):
        """Yield (gguf_name, float32 array in PyTorch [out, in] order) for every tensor."""
        for tensor in self.reader.tensors:
            yield tensor.name, self.read_tensor(tensor.name)

    def read_tensor(self, name: str) -> np.ndarray:
        """One tensor, dequantized now: a float32 array in PyTorch [out, in] order."""
        tensor = self._tensors_by_name[name]
        array = dequantize(tensor.data, tensor.tensor_type)
        # GGUF lists dims innermost first; numpy wants them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)

    @functools.cached_property
    def _tensors_by_name(self) -> dict:
        return {t.name: t for t in self.reader.tensors}
