"""`--dtype auto`: the checkpoint's own precision picks the serving dtype.

A GGUF keeps its quantization: the type holding most of its layers' projection weights decides
(4-bit -> int4, which keeps a Q4_0/Q4_1 file's own integers; 5- to 8-bit -> int8, the narrowest
path that loses nothing the file has; F16/BF16 -> bfloat16; F32 -> float32), and under int4 the
layer matrices the file holds at more bits take int8 (int8_matrices: a Q4_K_M's Q6_K ones). A
Hugging Face folder follows its config's `torch_dtype`. Then the CPU is asked: int8 runs on int8 dot
products, int4 on them or on AVX2, bfloat16 on bf16 dot products; a CPU without them gets the next
path it has, and the log says why.

Torch-free, so the benchmark can plan a server's KV cache without importing torch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

from lmserve.cpu import cpu_flags, has_bf16_dot_products, has_int4_products, has_int8_dot_products
from lmserve.weights.names import FUSED_MATRICES

# GGUF tensor type name -> the dtype that keeps it.
GGUF_TYPE_DTYPES = {
    "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4",
    "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8", "Q6_K": "int8", "Q8_0": "int8",
    "F16": "bfloat16", "BF16": "bfloat16", "F32": "float32",
}
# config.json's torch_dtype (or dtype) -> the dtype that keeps it; float16 has no path of its own.
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # a serving dtype (config.DTYPE_NAMES)
    reason: str  # for the log: what in the checkpoint and the CPU chose it


def gguf_weight_type(tensors) -> str:
    """The GGUF type name holding most elements of the layers' matrices (blk.*, two dimensions:
    the projections, not norms, embeddings or head). `tensors` are GGUFFile.tensors entries."""
    counts: Counter[str] = Counter()
    for tensor in tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] += prod(tensor.shape)
    if not counts:
        raise ValueError("the GGUF has no layer weight matrices (blk.*) to choose a dtype from")
    return counts.most_common(1)[0][0]


def wider_than_int4(type_name: str) -> bool:
    """Whether a GGUF tensor type holds more than int4 keeps (Q5_*, Q6_K, Q8_0, the float types)."""
    return GGUF_TYPE_DTYPES.get(type_name, "int4") != "int4"


def int8_matrices(tensors) -> frozenset[str]:
    """The layer matrices (GGUF names) an int4 model of `tensors` serves as int8: those the file holds
    at more than 4 bits, as a Q4_K_M file holds attn_v and half the ffn_down at Q6_K (llama.cpp's
    choice for the tensors the output is most sensitive to), and the matrices multiplied as one with
    them (names.FUSED_MATRICES). int4 would round their 6 or 8 bits to 4."""
    wider = {tensor.name for tensor in tensors if tensor.name.startswith("blk.") and len(tensor.shape) == 2
             and wider_than_int4(tensor.tensor_type.name)}
    fused = set()
    for name in wider:
        block, _, rest = name.partition(".")[2].partition(".")  # blk.<block>.<matrix>.weight
        matrix = rest.partition(".")[0]
        for group in FUSED_MATRICES:
            if matrix in group:
                fused.update(f"blk.{block}.{part}.weight" for part in group)
    return frozenset(wider | fused)


def checkpoint_dtype(source: str) -> str:
    """The dtype that keeps a checkpoint's precision, from a GGUF type name ("gguf:Q4_1") or a
    config.json torch_dtype ("hf:bfloat16"; "hf:" when it names none, which means float32)."""
    kind, _, name = source.partition(":")
    if kind == "gguf":
        if name not in GGUF_TYPE_DTYPES:
            raise ValueError(f"no serving dtype for GGUF tensor type {name}")
        return GGUF_TYPE_DTYPES[name]
    return HF_DTYPES.get(name or "float32", "float32")


def fit_to_device(dtype: str, device: str, flags: frozenset[str]) -> tuple[str, str]:
    """The best path at or below `dtype` that this device runs natively, and why it moved (or "")."""
    if dtype in ("int8", "int4") and device != "cpu":
        return "bfloat16", f"{dtype} kernels are CPU ones; on {device}: bfloat16"
    if device != "cpu":
        return dtype, ""
    moved = "bfloat16" if has_bf16_dot_products(flags) else "float32"
    if dtype == "int8" and not has_int8_dot_products(flags):
        return moved, f"this CPU has no int8 dot products (AVX512-VNNI or AVX-VNNI) for int8: {moved}"
    if dtype == "int4" and not has_int4_products(flags):
        return moved, f"this CPU has no int8 dot products (AVX512-VNNI, AVX-VNNI) nor AVX2 for int4: {moved}"
    if dtype == "bfloat16" and not has_bf16_dot_products(flags):
        return "float32", "this CPU has no bf16 dot products (AVX512-BF16 or AMX-BF16): float32"
    return dtype, ""


def choose_dtype(source: str, device: str = "cpu", flags: frozenset[str] | None = None) -> DtypeChoice:
    """`--dtype auto` for a checkpoint described as in checkpoint_dtype."""
    kept = checkpoint_dtype(source)
    dtype, moved = fit_to_device(kept, device, cpu_flags() if flags is None else flags)
    described = f"GGUF weights are {source[5:]}" if source.startswith("gguf:") else \
        f"config.json's torch_dtype is {source[3:] or 'unset (float32)'}"
    reason = f"{described} -> {kept}" + (f"; {moved}" if moved else "")
    return DtypeChoice(dtype, reason)


def hf_dtype_source(folder: Path) -> str:
    """"hf:<torch_dtype>" from a Hugging Face folder's config.json (newer ones write `dtype`)."""
    config = json.loads((folder / "config.json").read_text())
    return f"hf:{config.get('torch_dtype') or config.get('dtype') or ''}"


def serving_dtype(path: str | Path, requested: str, device: str = "cpu", tensors=None) -> str:
    """`requested` itself, or for "auto" what the checkpoint at `path` chooses (opening a GGUF's
    header unless its `tensors` are given: for callers that have not loaded the checkpoint, such as
    the benchmark and the size estimate)."""
    if requested != "auto":
        return requested
    path = Path(path)
    if path.is_dir():
        return choose_dtype(hf_dtype_source(path), device).dtype
    if tensors is None:
        from lmserve.weights.gguf import GGUFFile

        tensors = GGUFFile.open(path, arrays=False).tensors
    return choose_dtype("gguf:" + gguf_weight_type(tensors), device).dtype
