"""Read GGUF files: metadata as plain Python values, tensors dequantized to float32.

The header is parsed here, straight from a memory map: one Python object per metadata value, where
the gguf package's reader builds numpy views for every part of every field (~150,000 for a
49k-token vocabulary; their cost at start-up: bench/RESULTS.md, "Figures the code cites"), whose
freed pieces stay scattered through the heap. Dequantization is the gguf package's, but for the
common block types (gguf_blocks.py).
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape

from lmserve.memory import drop_mapped_pages

# Quant types the loader accepts; anything else is refused by name before any work is done.
SUPPORTED_QUANT_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Sanity bounds for damaged or hostile files. The largest vocabularies have ~260k entries; a
# scalar array costs ~16 bytes of Python objects per item, so an unbounded count could cost 16x
# the file. Arrays of arrays do not occur in models at all.
MAX_ARRAY_ITEMS = 1 << 24
MAX_ARRAY_NESTING = 8
# Metadata value types (GGUF spec): struct codes of the scalars; 8 is a string, 9 an array.
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRUCTS = {code: struct.Struct("<" + code) for code in _SCALAR_CODES.values()}  # compiled once
_STRING, _ARRAY = 8, 9
_PLAIN_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
# A page fault in a file mapping maps the file's pages around it that the page cache holds, which a
# read touched without reading: fault_around_bytes' worth (64 KiB by default), or the whole folio the
# page sits in, which where the page cache keeps large folios is up to PMD size, 2 MiB on x86-64
# (64 KiB margins left 3.7 MiB of the default model resident on Linux 6.18's ext4).
MAPPED_AROUND_BYTES = 2 << 20


class UnsupportedModelError(ValueError):
    """The file is readable but holds an architecture or quant type lmserve cannot run."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: `shape` as GGUF lists it (innermost first); `data` maps the file's bytes
    (float32/float16 values for those types, else the raw blocks, a uint8 row per tensor row)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


@dataclass
class GGUFFile:
    """An opened GGUF file: `metadata` maps keys to Python values (str, int, float, bool, lists)."""

    path: Path
    tensors: list[GGUFTensor]
    metadata: dict[str, Any]
    mapped: np.ndarray | None = None  # the whole file, mapped: where reads drop the pages they touched

    @classmethod
    def open(cls, path: str | Path, arrays: bool = True) -> GGUFFile:
        """Raises ValueError for a file that is not a GGUF lmserve can read, naming the problem.
        `arrays=False` steps over the metadata's arrays (the vocabulary, its merges), each an
        UnreadArray giving only its length: the model's shape and tensors for callers that read no
        vocabulary, in a fifth of the time (the default model's header: 29 against 113 ms here)."""
        header = _Header(np.memmap(path, dtype=np.uint8, mode="r"), str(path), arrays)
        try:
            metadata, tensors = header.read()
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise ValueError(f"{str(path)!r} is truncated or not a valid GGUF file ({exc})") from None
        opened = cls(Path(path), tensors, metadata, header.data)
        opened._drop_pages(0, header.pos)  # the header's values are Python objects now
        return opened

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def check_quant_types(self) -> None:
        """Raise UnsupportedModelError naming the first tensor whose quant type is not supported."""
        for tensor in self.tensors:
            if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
                raise UnsupportedModelError(
                    f"tensor {tensor.name!r} uses quant type {tensor.tensor_type.name}, which lmserve "
                    f"does not support (supported: {', '.join(sorted(t.name for t in SUPPORTED_QUANT_TYPES))})"
                )

    def iter_tensors(self):
        """Yield (gguf_name, float32 array in PyTorch [out, in] order) for every tensor."""
        for tensor in self.tensors:
            yield tensor.name, self.read_tensor(tensor.name)

    def read_tensor(self, name: str) -> np.ndarray:
        """One tensor, dequantized now: a float32 array of its own in PyTorch [out, in] order. The
        file's pages it was read from leave this process's resident set (memory.drop_mapped_pages):
        loading reads each tensor once, and the whole file would otherwise stay resident beside
        the weights made from it (~94 MiB of the default model at the load's peak)."""
        tensor = self._tensors_by_name[name]
        # GGUF lists dims innermost first; numpy wants them outermost first.
        array = _dequantized(tensor.data, tensor.tensor_type, tuple(int(d) for d in reversed(tensor.shape)))
        self._drop_read(tensor.data)
        return array

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor, as read_tensor gives them, reading only their bytes."""
        tensor = self._tensors_by_name[name]
        if len(tensor.shape) != 2:
            raise ValueError(f"tensor {name!r} has {len(tensor.shape)} dimensions, not rows")
        if not 0 <= start <= stop <= tensor.data.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of tensor {name!r}, which has {tensor.data.shape[0]}")
        rows = tensor.data[start:stop]  # a row of values, or of a row's blocks
        array = _dequantized(rows, tensor.tensor_type, (rows.shape[0], int(tensor.shape[0])))
        self._drop_read(rows)
        return array

    def _drop_read(self, data: np.ndarray) -> None:
        """Drop the pages a read of `data` (a view of the mapped file) touched, with those the
        kernel mapped around them: without the margins, each tensor read left up to 64 KiB
        resident at its ends (~17 MiB over the default model's 272 tensors), more with large folios."""
        if self.mapped is not None and data.nbytes:
            offset = data.ctypes.data - self.mapped.ctypes.data
            self._drop_pages(offset - MAPPED_AROUND_BYTES, offset + data.nbytes + MAPPED_AROUND_BYTES)

    def _drop_pages(self, start: int, stop: int) -> None:
        """Drop the resident pages of the file's bytes [start, stop), clipped to the file."""
        start, stop = max(start, 0), min(stop, self.mapped.nbytes)
        if start < stop:
            drop_mapped_pages(self.mapped.ctypes.data + start, stop - start)

    @functools.cached_property
    def _tensors_by_name(self) -> dict:
        return {t.name: t for t in self.tensors}


def _dequantized(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """`data` (a GGUFTensor's, or rows of it) as a float32 array of `shape` that does not share the
    file's memory (an F32 tensor's values are copied), so the file's pages can be dropped."""
    from lmserve.weights.gguf_blocks import FAST_TYPES, dequantize_blocks

    array = dequantize_blocks(data, qtype) if qtype in FAST_TYPES else dequantize(data, qtype)
    array = np.ascontiguousarray(array.reshape(shape), dtype=np.float32)
    return array.copy() if np.may_share_memory(array, data) else array


@dataclass(frozen=True)
class UnreadArray:
    """A metadata array GGUFFile.open(arrays=False) stepped over: its length, and nothing to iterate."""

    count: int

    def __len__(self) -> int:
        return self.count


class _Header:
    """A cursor over a GGUF file's header (little-endian, versions 2 and 3)."""

    def __init__(self, data: np.ndarray, name: str, arrays: bool = True):
        self.data = data  # the whole file, mapped: the tensors are views of it
        self.buffer = memoryview(data)
        self.name = name
        self.arrays = arrays  # False: arrays are stepped over (UnreadArray)
        self.pos = 0

    def read(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        if bytes(self.buffer[:4]) != GGUF_MAGIC:
            raise ValueError(f"{self.name!r} is not a GGUF file (no GGUF magic number at its start)")
        self.pos = 4
        version = self._take("I")
        if version & 0xFFFF == 0 and version:  # the version's bytes are swapped: written big-endian
            raise UnsupportedModelError(f"{self.name!r} is a big-endian GGUF file; lmserve reads little-endian ones")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedModelError(f"{self.name!r} is GGUF version {version}; lmserve reads versions 2 and 3")
        n_tensors, n_values = self._take("Q"), self._take("Q")
        metadata = {}
        for _ in range(n_values):
            key = self._string()
            if key in metadata:
                raise ValueError(f"{self.name!r} holds metadata key {key!r} twice")
            metadata[key] = self._value(self._take("I"))
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("I")
            dims = struct.unpack_from(f"<{n_dims}Q", self.buffer, self.pos)
            self.pos += 8 * n_dims
            entries.append((name, dims, self._take("I"), self._take("Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.name!r}: general.alignment {alignment!r} is not a power of two")
        start = -(-self.pos // alignment) * alignment
        return metadata, self._tensors(start, entries)

    def _tensors(self, start: int, entries: list) -> list[GGUFTensor]:
        tensors, seen = [], set()
        for name, dims, type_id, offset in entries:
            if name in seen:
                raise ValueError(f"{self.name!r} holds tensor {name!r} twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedModelError(f"tensor {name!r} has tensor type {type_id}, unknown to lmserve") from None
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            if any(d >= 1 << 40 for d in dims):
                raise ValueError(f"{self.name!r}: tensor {name!r} has an impossible shape {list(dims)}")
            count = math.prod(dims)  # Python ints: a corrupt size cannot wrap around
            if count % block_size:
                raise ValueError(f"tensor {name!r}: {count} values do not fill {qtype.name} blocks of {block_size}")
            first = start + offset
            last = first + count // block_size * type_size
            if last > len(self.data):
                raise ValueError(f"{self.name!r} is truncated: tensor {name!r} ends past the end of the file")
            shape = tuple(reversed(dims))  # numpy's order: outermost first
            raw = self.data[first:last]
            if qtype in _PLAIN_TYPES:
                array = raw.view(_PLAIN_TYPES[qtype]).reshape(shape)
            else:
                array = raw.reshape(quant_shape_to_byte_shape(shape, qtype))
            tensors.append(GGUFTensor(name, qtype, tuple(dims), array))
        return tensors

    def _take(self, code: str):
        unpack = _STRUCTS[code]
        (value,) = unpack.unpack_from(self.buffer, self.pos)
        self.pos += unpack.size
        return value

    def _string(self) -> str:
        size = self._take("Q")
        end = self.pos + size
        if end > len(self.buffer):
            raise IndexError("a string runs past the end of the file")
        text = str(self.buffer[self.pos:end], "utf-8")
        self.pos = end
        return text

    def _value(self, value_type: int, depth: int = 0) -> Any:
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type, count = self._take("I"), self._take("Q")
            if count > MAX_ARRAY_ITEMS:
                raise ValueError(f"{self.name!r}: a metadata array of {count} items (at most {MAX_ARRAY_ITEMS} read)")
            if item_type == _STRING:
                return self._strings(count)
            if item_type == _ARRAY:
                if depth + 1 >= MAX_ARRAY_NESTING:
                    raise ValueError(f"{self.name!r}: metadata arrays nested over {MAX_ARRAY_NESTING} deep")
                items = [self._value(_ARRAY, depth + 1) for _ in range(count)]
                return items if self.arrays else UnreadArray(count)
            code = self._code(item_type)
            size = count * struct.calcsize(code)
            if self.pos + size > len(self.buffer):
                raise IndexError("an array runs past the end of the file")
            items = struct.unpack_from(f"<{count}{code}", self.buffer, self.pos) if self.arrays else None
            self.pos += size
            return UnreadArray(count) if items is None else list(items)
        return self._take(self._code(value_type))

    def _strings(self, count: int) -> list[str] | UnreadArray:
        """An array of `count` strings (a vocabulary's tokens, its merges): _string's steps in one
        loop, 1.4x as fast on 98,000 strings; stepped over when arrays are not read."""
        buffer, pos, size_of, end_of_file = self.buffer, self.pos, _STRUCTS["Q"].unpack_from, len(self.buffer)
        items = [] if self.arrays else None
        for _ in range(count):
            (size,) = size_of(buffer, pos)
            pos += 8
            end = pos + size
            if end > end_of_file:
                raise IndexError("a string runs past the end of the file")
            if items is not None:
                items.append(str(buffer[pos:end], "utf-8"))
            pos = end
        self.pos = pos
        return UnreadArray(count) if items is None else items

    def _code(self, value_type: int) -> str:
        code = _SCALAR_CODES.get(value_type)
        if code is None:
            raise ValueError(f"{self.name!r}: unknown metadata value type {value_type}")
        return code
