"""Tiny random-weight decoders: HF folders written by transformers and GGUF files written
with the gguf package, for comparing lmserve's model against transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_hf_model(family: str, tie: bool = False, seed: int = 0, **shape):
    """A random transformers model: 2 layers, GQA (4 heads, 2 KV heads), head_dim 16, unless
    `shape` (config fields) says otherwise."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tie)
    common.update(shape)
    if family == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():  # make the biases (zero at init) matter
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model.eval()


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(config, "rope_theta")


def save_hf_folder(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _permute_for_gguf(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py `permute`, verbatim in effect (HF half-split -> adjacent pairs).
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    config = model.config
    out = {}
    for name, param in model.state_dict().items():
        array = param.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = array
        elif name == "model.norm.weight":
            out["output_norm.weight"] = array
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:
                out["output.weight"] = array
        else:
            parts = name.split(".")
            layer, rest = parts[2], ".".join(parts[3:])
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                array = _permute_for_gguf(array, config.num_attention_heads)
            if arch == "llama" and rest.startswith("self_attn.k_proj"):
                array = _permute_for_gguf(array, config.num_key_value_heads)
            out[f"blk.{layer}.{HF_TO_GGUF_LAYER[rest]}"] = array
    return out


def write_gguf(model, path: Path, arch: str, quant: str = "F32", tokenizer_metadata=None,
               tensor_quants: dict[str, str] | None = None) -> Path:
    """Write the model as a GGUF file; 2-D weights in `quant` (F32, F16, Q8_0, ...) or the type
    `tensor_quants` names for that GGUF tensor ("blk.0.attn_v.weight": "Q8_0"), norms in F32."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, value in (tokenizer_metadata or {}).items():
        writer.add_key_value(key, *value)  # (value, type) or, for an array, (values, ARRAY, item type)
    for name, array in gguf_tensors(model, arch).items():
        qtype = gguf.GGMLQuantizationType[(tensor_quants or {}).get(name, quant)]
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)  # shape read from the byte layout
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
