"""The one place that maps GGUF tensor names to Hugging Face parameter names."""

from __future__ import annotations

import re

import numpy as np

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# A decoder layer's modules the model multiplies as one (model/llama.py's prepare fuses them), by
# the checkpoint modules they are made from: a choice of format for one is a choice for all
# (weights/dtype.py int8_matrices).
FUSED_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# The same groups by GGUF names ("attn_q").
_GGUF_MODULES = {hf.removesuffix(".weight"): gguf.removesuffix(".weight")
                 for gguf, hf in _LAYER.items() if gguf.endswith(".weight")}
FUSED_MATRICES = tuple(tuple(_GGUF_MODULES[part] for part in parts) for parts in FUSED_PARTS.values())
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 frequency factors, not a module parameter


def gguf_to_hf(name: str) -> str | None:
    """HF name for a GGUF tensor name, or None for a tensor lmserve does not use."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in _LAYER:
        return f"model.layers.{match.group(1)}.{_LAYER[match.group(2)]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for `llama` GGUFs (adjacent-pair RoPE) so the rows
    are in the HF half-split layout. Works for weights (rows, cols) and biases (rows,)."""
    rows = weight.shape[0]
    tail = weight.shape[1:]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *tail)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
