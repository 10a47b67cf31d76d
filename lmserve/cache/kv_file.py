"""The saved-prefix file: the KV blocks of a token sequence's leading full blocks, and enough about
the model that wrote them to refuse the file in another.

Layout, integers little-endian:

    magic b"LMSKVPFX" | format version (u32) | header length (u32) | header | data | digest

The header is UTF-8 JSON: {"identity": KVFileIdentity's fields, "token_ids": [...]}, the tokens
covering num_blocks * block_size. The data, layer after layer: that layer's keys, then its values,
each (num_kv_heads, num_blocks, block_size, head_dim) in kv_dtype, the cache's own layout (heads
lead). The digest is blake2b-256 of everything before it. A file is written whole or not at all
(a temporary file beside it, renamed over it once synced); a reader checks the framing and the
size when it opens the file and the digest in verify(), before anything reaches the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO

import torch

from lmserve.cache.kv_cache import row_width

MAGIC = b"LMSKVPFX"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
DIGEST_BYTES = 32
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}  # int8: rows with a scale
KV_DTYPE_NAMES = {dtype: name for name, dtype in KV_DTYPES.items()}
FINGERPRINT_SAMPLE_BYTES = 1 << 20
READ_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True)
class KVFileIdentity:
    """What must match for KV written by one engine to be valid in another."""

    family: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    dtype: str  # the serving dtype: int8 weights compute other keys and values than bf16 ones
    kv_dtype: str  # a KV_DTYPES name
    weights: str  # checkpoint_fingerprint of the weights

    @property
    def row_width(self) -> int:
        """Elements of a cached row: head_dim, and an int8 row's 4-byte scale (model/attention.py)."""
        return row_width(self.head_dim, KV_DTYPES[self.kv_dtype])

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one head's keys (or values) in one layer."""
        return self.block_size * self.row_width * KV_DTYPES[self.kv_dtype].itemsize

    def data_bytes(self, num_blocks: int) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * num_blocks * self.block_bytes

    def differences(self, other: KVFileIdentity) -> list[tuple[str, object, object]]:
        """(field name, this one's value, the other's) for each field that differs."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name))
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def checkpoint_fingerprint(model_path: str | Path) -> str | None:
    """A hash telling checkpoints apart without reading all their weights: the size of each file
    the model is loaded from (the .gguf; a folder's config.json and *.safetensors) and 1 MiB at its
    start, middle and end. Contents, not names, so a moved or renamed checkpoint keeps its
    fingerprint and a file replaced at the same path does not. None when nothing is on disk there."""
    path = Path(model_path)
    files = [path] if path.is_file() else [path / "config.json", *sorted(path.glob("*.safetensors"))]
    files = [file for file in files if file.is_file()]
    if not files:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        size = file.stat().st_size
        digest.update(struct.pack("<q", size))
        with open(file, "rb") as handle:
            for offset in sorted({0, max(0, (size - FINGERPRINT_SAMPLE_BYTES) // 2),
                                  max(0, size - FINGERPRINT_SAMPLE_BYTES)}):
                handle.seek(offset)
                digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def write_kv_file(path: Path, identity: KVFileIdentity, token_ids: list[int],
                  layers: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the file atomically. `layers` yields each layer's (keys, values), each
    (num_kv_heads, len(token_ids) // block_size, block_size, head_dim)."""
    header = json.dumps({"identity": asdict(identity), "token_ids": list(token_ids)}).encode()
    num_blocks = len(token_ids) // identity.block_size
    shape = (identity.num_key_value_heads, num_blocks, identity.block_size, identity.row_width)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
            _write(out, digest, PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header)
            num_layers = 0
            for keys, values in layers:
                assert keys.shape == values.shape == shape, (keys.shape, shape)
                _write(out, digest, _raw_bytes(keys))
                _write(out, digest, _raw_bytes(values))
                num_layers += 1
            assert num_layers == identity.num_hidden_layers
            out.write(digest.digest())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it could otherwise lose it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(out: BinaryIO, digest, data) -> None:
    digest.update(data)
    out.write(data)


def _raw_bytes(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)


class KVFile:
    """An open saved-prefix file whose framing and size have been checked (open_kv_file)."""

    def __init__(self, path: Path, handle: BinaryIO, identity: KVFileIdentity, token_ids: list[int],
                 data_offset: int):
        self.path = path
        self.identity = identity
        self.token_ids = token_ids
        self.num_blocks = len(token_ids) // identity.block_size
        self._handle = handle
        self._data_offset = data_offset

    def check(self, expected: KVFileIdentity) -> None:
        """ValueError naming every field in which this file's model differs from `expected`."""
        differences = self.identity.differences(expected)
        if differences:
            listed = "; ".join(f"{name}: the file's {theirs!r}, this engine's {ours!r}"
                               for name, theirs, ours in differences)
            raise ValueError(f"{self.path} was saved by another model or KV layout ({listed})")

    def verify(self) -> None:
        """ValueError unless the digest matches everything before it."""
        end = self._data_offset + self.identity.data_bytes(self.num_blocks)
        digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
        self._handle.seek(0)
        for start in range(0, end, READ_CHUNK_BYTES):
            digest.update(self._handle.read(min(READ_CHUNK_BYTES, end - start)))
        if self._handle.read(DIGEST_BYTES) != digest.digest():
            raise ValueError(f"{self.path} is corrupt: its checksum does not match its contents")

    def layers(self, first: int, count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) of blocks [first, first + count), each
        (num_kv_heads, count, block_size, head_dim)."""
        assert 0 <= first and first + count <= self.num_blocks
        if count == 0:
            return
        self._handle.seek(self._data_offset)
        for _ in range(self.identity.num_hidden_layers):
            keys = self._read_part()[:, first:first + count]
            values = self._read_part()[:, first:first + count]
            yield keys, values

    def _read_part(self) -> torch.Tensor:
        """The next keys or values of all blocks, (num_kv_heads, num_blocks, block_size, head_dim)."""
        ident = self.identity
        buffer = bytearray(ident.num_key_value_heads * self.num_blocks * ident.block_bytes)
        self._handle.readinto(buffer)
        shape = (ident.num_key_value_heads, self.num_blocks, ident.block_size, ident.row_width)
        return torch.frombuffer(buffer, dtype=KV_DTYPES[ident.kv_dtype]).view(shape)


@contextmanager
def open_kv_file(path: Path) -> Iterator[KVFile]:
    """Open a saved-prefix file; ValueError, naming the path, for anything but one of ours of the
    size its header promises (FileNotFoundError when there is none)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        header_length = _read_preamble(path, handle, size)
        identity, token_ids = _parse_header(path, handle.read(header_length))
        data_offset = PREAMBLE.size + header_length
        expected = data_offset + identity.data_bytes(len(token_ids) // identity.block_size) + DIGEST_BYTES
        if size != expected:
            state = "truncated" if size < expected else "corrupt"
            raise ValueError(f"{path} is {state}: it holds {size} bytes, its header promises {expected}")
        yield KVFile(path, handle, identity, token_ids, data_offset)


def _read_preamble(path: Path, handle: BinaryIO, size: int) -> int:
    """The header's length, after the magic and the version are checked."""
    preamble = handle.read(PREAMBLE.size)
    if preamble[: len(MAGIC)] != MAGIC[: len(preamble)]:
        raise ValueError(f"{path} is not a saved prefix file (it does not start with {MAGIC!r})")
    if len(preamble) < PREAMBLE.size:
        raise ValueError(f"{path} is truncated: it holds {size} bytes, less than its preamble")
    _, version, header_length = PREAMBLE.unpack(preamble)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this lmserve reads version {FORMAT_VERSION}")
    if PREAMBLE.size + header_length + DIGEST_BYTES > size:
        raise ValueError(f"{path} is truncated: it holds {size} bytes, less than its header promises")
    return header_length


def _parse_header(path: Path, header: bytes) -> tuple[KVFileIdentity, list[int]]:
    try:
        parsed = json.loads(header)
        identity = KVFileIdentity(**parsed["identity"])
        token_ids = parsed["token_ids"]
        valid = (all(isinstance(getattr(identity, name), int) and getattr(identity, name) > 0
                     for name in ("num_hidden_layers", "num_key_value_heads", "head_dim", "block_size"))
                 and identity.kv_dtype in KV_DTYPES and isinstance(token_ids, list)
                 and all(isinstance(t, int) for t in token_ids) and len(token_ids) % identity.block_size == 0)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is corrupt: its header does not parse ({exc})") from exc
    if not valid:
        raise ValueError(f"{path} is corrupt: its header holds impossible values")
    return identity, token_ids
