"""How much memory a checkpoint's weights take once loaded in a serving dtype, read from its header
alone (a GGUF's tensor table, safetensors' JSON headers): what the fleet needs to know before it
loads a model under `--models-memory`.

Layer matrices take the dtype's bytes per element (int4: 4 bits plus a float16 scale and low per
group of 32; int8: a byte plus a float32 scale per row, counted per element as 1/32 more; under
`auto`, an int4 GGUF's matrices held at more bits are int8, dtype.int8_matrices); norms
and biases are counted at bfloat16, or float32 under float32; the token table and the head as
the loader keeps them. The estimate is held to what a loaded model's tensors take (tests).
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path

from lmserve.model.weight_formats.floating import bf16_panels_run
from lmserve.weights.dtype import int8_matrices, serving_dtype

MATRIX_BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0 + 1 / 32, "int4": 0.5 + 4 / 32}
EMBEDDING_NAMES = ("token_embd.weight", "model.embed_tokens.weight")
HEAD_NAMES = ("output.weight", "lm_head.weight")


def estimated_weight_bytes(path: str | Path, dtype: str, device: str = "cpu") -> int:
    """Bytes the weights of the checkpoint at `path` take loaded in `dtype` ("auto" resolved as the
    loader resolves it)."""
    path = Path(path)
    tensors = None
    if not path.is_dir():  # its header, parsed once, its vocabulary stepped over
        from lmserve.weights.gguf import GGUFFile

        tensors = GGUFFile.open(path, arrays=False).tensors
    requested, dtype = dtype, serving_dtype(path, dtype, device, tensors)
    other = 4.0 if dtype == "float32" else 2.0
    shapes = dict(_tensor_shapes(path, tensors))
    wider = int8_matrices(tensors) if tensors is not None and requested == "auto" and dtype == "int4" else frozenset()
    embedding = next((prod(shapes.pop(n)) for n in EMBEDDING_NAMES if n in shapes), 0)
    head = next((prod(shapes.pop(n)) for n in HEAD_NAMES if n in shapes), None)
    total = 0.0
    for name, shape in shapes.items():
        is_layer_matrix = len(shape) == 2 and (name.startswith("blk.") or ".layers." in name)
        total += prod(shape) * (MATRIX_BYTES["int8" if name in wider else dtype] if is_layer_matrix else other)
    shared = device == "cpu" and dtype == "bfloat16" and bf16_panels_run()
    return int(total + _embedding_and_head(dtype, embedding, head, shared))


def _embedding_and_head(dtype: str, embedding: int, head: int | None, bf16_shared: bool = False) -> float:
    """The token table and the output head, as the loader keeps them: float32 shares a tied table;
    bfloat16 keeps a head copy beside the table, except that a tied model whose head is in the
    kernels' panels (`bf16_shared`) reads its embeddings from them; int8 and int4 keep an int8 head,
    and a tied model reads its embeddings from it rather than keeping a table."""
    if dtype == "float32":
        return 4.0 * (embedding + (head or 0))
    if dtype == "bfloat16":
        return 2.0 * (embedding + (head if head is not None else 0 if bf16_shared else embedding))
    if head is None:
        return MATRIX_BYTES["int8"] * embedding
    return 2.0 * embedding + MATRIX_BYTES["int8"] * head


def _tensor_shapes(path: Path, tensors) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's (name, shape): a GGUF's from its `tensors`, a folder's from safetensors' headers."""
    if tensors is None:
        shapes = []
        for file in sorted(path.glob("*.safetensors")):
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            shapes += [(name, tuple(info["shape"])) for name, info in header.items() if name != "__metadata__"]
        return shapes
    return [(tensor.name, tuple(int(d) for d in tensor.shape)) for tensor in tensors]
