"""Load a decoder model and its tokenizer from a GGUF file or a Hugging Face folder.

Strict: every model parameter must be filled from the checkpoint, or loading fails naming
what is missing.
"""

from __future__ import annotations

import ctypes
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from lmserve.model.config import ModelConfig
from lmserve.model.registry import build_model
from lmserve.text.tokenizer import Tokenizer
from lmserve.weights.gguf import GGUFFile
from lmserve.weights.names import ROPE_FREQS, gguf_to_hf, unpermute_rope_rows

# "int8": W8A8 (int8 weight copies for steps of few tokens where the kernels cannot pack them);
# "int4": W4A8 at every step where the kernels run it, else int4 copies for steps of few tokens
# and W8A8 for larger ones; bf16 weights for those where the CPU lacks int8 dot products
# (model/llama.py, model/int8.py)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "int8": torch.bfloat16, "int4": torch.bfloat16}
HEAD_KIND = "int8"  # the head of a tied GGUF is Q8_0: int4 would add error (KL 7e-2 measured)
log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu",
               max_positions: int | None = None) -> LoadedModel:
    """Load model and tokenizer from a `.gguf` file or a folder with config.json and *.safetensors."""
    model, config, gguf = load_weights(path, dtype, device, max_positions)
    tokenizer = Tokenizer.from_gguf(gguf) if gguf is not None else Tokenizer.from_hf_folder(path)
    return LoadedModel(model, config, tokenizer)


def load_weights(path: str | Path, dtype: str = "float32", device: str = "cpu",
                 max_positions: int | None = None) -> tuple[torch.nn.Module, ModelConfig, GGUFFile | None]:
    """The model alone; also the opened GGUF file (None for an HF folder) for the tokenizer.
    `dtype` is the matmul weights' and embedding table's dtype; activations and norms stay float32."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    gguf = None
    if path.is_dir():
        config, tensors, freqs = _read_hf_folder(path)
    else:
        gguf = GGUFFile.open(path)
        config, tensors, freqs = _read_gguf(gguf)
    model = build_model(config, max_positions or config.max_position_embeddings, freqs)
    fill_parameters(model, tensors, torch.float32)
    model.tie_weights()
    quantized = dtype in ("int8", "int4") and torch.device(device).type == "cpu"
    if quantized:  # the narrow and int8 copies are taken from the float32 weights
        model.prepare(torch.float32, embed_dtype=DTYPES[dtype])
        model.quantize(dtype, HEAD_KIND)
    else:
        model.prepare(DTYPES[dtype])
        if dtype in ("int8", "int4"):  # the int8/int4 kernels are CPU ones
            log.warning("--dtype %s: no %s kernels on %s; serving bfloat16 weights", dtype, dtype, device)
    if torch.device(device).type == "cpu":
        model.pack_for_cpu()
    del tensors
    return_freed_memory()
    model = model.to(device).eval()
    model.enable_native_layers()
    return model, config, gguf


def _read_gguf(gguf: GGUFFile):
    gguf.check_quant_types()
    config = ModelConfig.from_gguf(gguf.metadata, "output.weight" in gguf.tensor_names())
    tensors: dict[str, np.ndarray] = {}
    freqs = None
    for name, array in gguf.iter_tensors():
        if name == ROPE_FREQS:
            freqs = torch.from_numpy(array.copy())
            continue
        hf_name = gguf_to_hf(name)
        if hf_name is None:
            continue
        tensors[hf_name] = _fix_rope_layout(config, hf_name, array, gguf.architecture)
    return config, tensors, freqs


def _fix_rope_layout(config: ModelConfig, hf_name: str, array: np.ndarray, arch: str) -> np.ndarray:
    # llama.cpp permutes Q/K rows of `llama` GGUFs for adjacent-pair RoPE; qwen2 keeps HF's layout.
    if arch != "llama":
        return array
    if ".q_proj." in hf_name:
        return unpermute_rope_rows(array, config.num_attention_heads)
    if ".k_proj." in hf_name:
        return unpermute_rope_rows(array, config.num_key_value_heads)
    return array


def _read_hf_folder(path: Path):
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    return config, read_safetensors(path), None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's *.safetensors files, by checkpoint name."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} has no *.safetensors files")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def fill_parameters(model: torch.nn.Module, tensors: dict, dtype: torch.dtype) -> None:
    """Assign every parameter of a model built on the meta device from `tensors` (by name);
    a missing parameter or a shape mismatch is a ValueError. A tied lm_head is left out."""
    expected = dict(model.named_parameters())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        tensors.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} parameters, e.g. {missing[:3]}")
    state = {}
    for name, param in expected.items():
        value = torch.as_tensor(np.array(tensors[name]) if isinstance(tensors[name], np.ndarray) else tensors[name])
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"parameter {name}: checkpoint shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
        state[name] = value.to(dtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS, which glibc keeps otherwise: after the weights load, the
    float32 staging copies (~160 MB of resident memory on the default model); once the server's
    engine is up, the GGUF reader's objects (~15 MiB more)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
