"""Load a decoder model and its tokenizer from a GGUF file or a Hugging Face folder.

Strict: every model parameter must be filled from the checkpoint, or loading fails naming
what is missing.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lmserve.config import DTYPE_CHOICES, DTYPE_NAMES
from lmserve.memory import release_library_pages, return_freed_memory
from lmserve.model.config import ModelConfig
from lmserve.model.registry import build_model
from lmserve.text.tokenizer import Tokenizer
from lmserve.weights import converted
from lmserve.weights.dtype import choose_dtype, gguf_weight_type, hf_dtype_source, int8_matrices, wider_than_int4
from lmserve.weights.gguf import GGUFFile
from lmserve.weights.names import ROPE_FREQS, gguf_to_hf, unpermute_rope_rows

# "int8": W8A8 (int8 weight copies for steps of few tokens where the kernels cannot pack them);
# "int4": W4A8 at every step where the kernels run it, else int4 copies for steps of few tokens
# and W8A8 for larger ones; bf16 weights for those where the CPU lacks int8 dot products
# (model/llama.py, model/weight_formats/)
DTYPES = {kind: getattr(torch, name) for kind, name in DTYPE_NAMES.items()}
HEAD_KIND = "int8"  # the head of a tied GGUF is Q8_0: int4 would add error (bench/RESULTS.md, "Figures the code cites")
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    dtype: str  # the serving dtype it was loaded in (never "auto")


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu",
               max_positions: int | None = None) -> LoadedModel:
    """Load model and tokenizer from a `.gguf` file or a folder with config.json and *.safetensors.
    `dtype` "auto" takes the checkpoint's own (lmserve/weights/dtype.py)."""
    model, config, gguf, dtype = _load(path, dtype, device, max_positions)
    # The library code that made the weights (~25 MiB of the default model's resident set) would be
    # held beside what building the tokenizer allocates: the load's peak (bench/RESULTS.md).
    release_library_pages()
    tokenizer = Tokenizer.from_gguf(gguf) if gguf is not None else Tokenizer.from_hf_folder(path)
    return LoadedModel(model, config, tokenizer, dtype)


def load_weights(path: str | Path, dtype: str = "float32", device: str = "cpu",
                 max_positions: int | None = None) -> tuple[torch.nn.Module, ModelConfig, GGUFFile | None]:
    """The model alone; also the opened GGUF file (None for an HF folder) for the tokenizer.
    `dtype` is the matmul weights' and embedding table's dtype; activations and norms stay float32."""
    model, config, gguf, _ = _load(path, dtype, device, max_positions)
    return model, config, gguf


def _load(path: str | Path, dtype: str, device: str, max_positions: int | None):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    gguf = None
    if path.is_dir():
        config, tensors, freqs = _read_hf_folder(path)
    else:
        gguf = GGUFFile.open(path)
        config, tensors, freqs = _read_gguf(gguf)
    requested, int8_parts = dtype, {}
    if dtype == "auto":
        dtype = _auto_dtype(path, gguf, device)
        if dtype == "int4" and gguf is not None:
            int8_parts = _int8_parts(gguf)
    entry = converted.entry_path(path, requested, dtype, device, max_positions)
    model = converted.load(entry) if entry is not None else None
    if model is None:
        model = build_model(config, max_positions or config.max_position_embeddings, freqs)
        check_parameters(model, tensors)  # before any tensor is read: a missing one fails fast
        model = _fill(model, tensors, dtype, device, int8_parts)
        if entry is not None:
            converted.save(entry, model)
    model.enable_native_layers()
    return model, config, gguf, dtype


def _auto_dtype(path: Path, gguf: GGUFFile | None, device: str) -> str:
    source = hf_dtype_source(path) if gguf is None else "gguf:" + gguf_weight_type(gguf.tensors)
    choice = choose_dtype(source, torch.device(device).type)
    log.info("--dtype auto: %s", choice.reason)
    return choice.dtype


def _int8_parts(gguf: GGUFFile) -> dict[int, frozenset[str]]:
    """dtype.int8_matrices by layer, as module names within it ("self_attn.v_proj"), logged."""
    matrices = int8_matrices(gguf.tensors)
    parts: dict[int, set[str]] = {}
    for name in matrices:
        hf_name = gguf_to_hf(name)
        if hf_name is None:
            continue
        index, _, module = hf_name.removeprefix("model.layers.").removesuffix(".weight").partition(".")
        parts.setdefault(int(index), set()).add(module)
    wider = Counter(t.tensor_type.name for t in gguf.tensors
                    if t.name in matrices and wider_than_int4(t.tensor_type.name))
    if wider:
        held = ", ".join(f"{count} {name}" for name, count in sorted(wider.items()))
        log.info("--dtype auto: int8 for the layer matrices the file holds at more than 4 bits (%s) and the %d "
                 "fused with them", held, len(matrices) - sum(wider.values()))
    return {index: frozenset(names) for index, names in parts.items()}


def _fill(model: torch.nn.Module, tensors: Mapping, dtype: str, device: str,
          int8_parts: Mapping[int, frozenset[str]] | None = None) -> torch.nn.Module:
    """The model's weights from `tensors` in `dtype`; under int4, the modules int8_parts names for a
    layer (by index) are int8."""
    quantized = dtype in ("int8", "int4") and torch.device(device).type == "cpu"
    if not quantized and dtype in ("int8", "int4"):  # the int8/int4 kernels are CPU ones
        log.warning("--dtype %s: no %s kernels on %s; serving bfloat16 weights", dtype, dtype, device)
    # Layer by layer: each layer's tensors are read (dequantized to float32), fused, cast or
    # quantized, and their float32 copies dropped before the next layer is read, so loading holds
    # one layer's float32 weights at a time rather than the whole model's.
    weight_dtype = torch.float32 if quantized else DTYPES[dtype]  # copies are taken from float32
    for index, layer in enumerate(model.model.layers):
        fill_parameters(layer, tensors, torch.float32, prefix=f"model.layers.{index}.")
        model.prepare_layer(layer, weight_dtype)
        if quantized:
            model.quantize_layer(layer, dtype, (int8_parts or {}).get(index, frozenset()))
        # Each layer's float32 copies, freed among the small pieces kept, go back to the OS now
        # rather than after the last layer (~21 MiB of the default model's heap by then).
        return_freed_memory()
    # The head after the layers, a piece at a time where the checkpoint reads rows: its float32
    # table (a tied model's embeddings) is the largest tensor of a small model and is never whole,
    # and the last layer's copies, the largest temporaries, are made before the head's bytes are
    # held (bench/RESULTS.md, thirty-first and thirty-second sittings).
    rows = tensors.row_reader(model.head_name) if quantized and HEAD_KIND == "int8" else None
    head_done = rows is not None and model.quantize_head_rows(lambda start, stop: torch.from_numpy(rows(start, stop)))
    fill_parameters(model, tensors, torch.float32, skip="model.layers.")
    model.tie_weights()
    if quantized and not head_done:  # before the table is cast: a tied head's copy then stands in for it
        model.quantize_head(HEAD_KIND)
    model.prepare_outer(weight_dtype, embed_dtype=DTYPES[dtype])
    if torch.device(device).type == "cpu":
        model.pack_for_cpu()
    del tensors
    return_freed_memory()
    return model.to(device).eval()  # its native layers are the caller's to enable, after any save


class LazyTensors(Mapping):
    """A checkpoint's tensors by HF name, each read (and dequantized) when looked up, not kept; some
    also by rows (row_reader)."""

    def __init__(self, readers: dict[str, Callable[[], np.ndarray | torch.Tensor]],
                 row_readers: dict[str, Callable[[int, int], np.ndarray]] | None = None):
        self._readers = readers
        self._row_readers = row_readers or {}

    def row_reader(self, name: str) -> Callable[[int, int], np.ndarray] | None:
        """rows(start, stop) -> those rows of the 2-D tensor `name`, as a lookup gives them, reading
        only theirs (a ValueError for a tensor of other dimensions); None where the checkpoint does
        not offer it."""
        return self._row_readers.get(name)

    def __getitem__(self, name: str) -> np.ndarray | torch.Tensor:
        return self._readers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def read_model_config(path: Path) -> ModelConfig:
    """The model's shape from its header (a GGUF's metadata, or config.json), no weights read."""
    if path.is_dir():
        return _read_hf_folder(path)[0]
    gguf = GGUFFile.open(path, arrays=False)  # the vocabulary's size is its length
    return ModelConfig.from_gguf(gguf.metadata, "output.weight" in gguf.tensor_names())


def _read_gguf(gguf: GGUFFile):
    gguf.check_quant_types()
    names = gguf.tensor_names()
    config = ModelConfig.from_gguf(gguf.metadata, "output.weight" in names)
    readers, row_readers = {}, {}
    freqs = None
    for name in names:
        if name == ROPE_FREQS:
            freqs = torch.from_numpy(gguf.read_tensor(name))
            continue
        hf_name = gguf_to_hf(name)
        if hf_name is not None:
            readers[hf_name] = functools.partial(_read_gguf_tensor, gguf, config, name, hf_name)
            if not _rope_rows_permuted(hf_name, gguf.architecture):
                row_readers[hf_name] = functools.partial(gguf.read_rows, name)
    return config, LazyTensors(readers, row_readers), freqs


def _read_gguf_tensor(gguf: GGUFFile, config: ModelConfig, name: str, hf_name: str) -> np.ndarray:
    return _fix_rope_layout(config, hf_name, gguf.read_tensor(name), gguf.architecture)


def _rope_rows_permuted(hf_name: str, arch: str) -> bool:
    """llama.cpp permutes Q/K rows of `llama` GGUFs for adjacent-pair RoPE; qwen2 keeps HF's layout."""
    return arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name)


def _fix_rope_layout(config: ModelConfig, hf_name: str, array: np.ndarray, arch: str) -> np.ndarray:
    if not _rope_rows_permuted(hf_name, arch):
        return array
    heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
    return unpermute_rope_rows(array, heads)


def _read_hf_folder(path: Path):
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    return config, lazy_safetensors(path), None


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} has no *.safetensors files")
    return files


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's *.safetensors files, by checkpoint name."""
    tensors = {}
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def lazy_safetensors(folder: Path) -> LazyTensors:
    """The folder's *.safetensors tensors by checkpoint name, each read when looked up."""
    readers = {}
    for file in _safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                readers[name] = functools.partial(_read_safetensor, file, name)
    return LazyTensors(readers)


def _read_safetensor(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(name)


def _expected_parameters(model: torch.nn.Module, prefix: str = "", skip: str | None = None) -> dict:
    """The parameters a checkpoint must fill, by checkpoint name; a tied lm_head is left out."""
    expected = {prefix + name: param for name, param in model.named_parameters()
                if skip is None or not (prefix + name).startswith(skip)}
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    return expected


def check_parameters(model: torch.nn.Module, tensors: Mapping) -> None:
    """ValueError naming what the checkpoint lacks for the (unfilled) model, before any is read."""
    _require(_expected_parameters(model), tensors)


def _require(expected: dict, tensors: Mapping) -> None:
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} parameters, e.g. {missing[:3]}")


def fill_parameters(model: torch.nn.Module, tensors: Mapping, dtype: torch.dtype, prefix: str = "",
                    skip: str | None = None) -> None:
    """Assign every parameter of a module built on the meta device from `tensors`, found by its name
    under `prefix` (a layer's "model.layers.3."), leaving out names starting with `skip`; a
    missing parameter or a shape mismatch is a ValueError. A tied lm_head is left out."""
    expected = _expected_parameters(model, prefix, skip)
    _require(expected, tensors)
    state = {}
    for name, param in expected.items():
        value = tensors[name]
        if isinstance(value, np.ndarray):  # a fresh, writable array is shared, not copied
            value = torch.from_numpy(value if value.flags.writeable else value.copy())
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"parameter {name}: checkpoint shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
        state[name.removeprefix(prefix)] = value.to(dtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)

