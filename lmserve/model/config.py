"""Decoder model hyperparameters, read from an HF config.json or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmserve.weights.gguf import UnsupportedModelError

# HF model_type -> the family file that runs it.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_scaling as sorted items

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "")
        if model_type not in HF_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(HF_MODEL_TYPES))})"
            )
        heads = hf["num_attention_heads"]
        max_len = hf.get("max_position_embeddings", 2048)
        if hf.get("sliding_window") and model_type == "mistral":
            max_len = min(max_len, hf["sliding_window"])  # full attention is exact only inside the window
        rope = _hf_rope(hf)
        return cls(
            family=HF_MODEL_TYPES[model_type],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.pop("rope_theta", 10000.0),
            max_position_embeddings=max_len,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", model_type == "qwen2"),
            rope_scaling=tuple(sorted(rope.items())) if rope.get("rope_type", "default") != "default" else None,
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], has_output_weight: bool) -> ModelConfig:
        arch = metadata.get("general.architecture", "")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
            )

        def key(name: str, default: Any = None) -> Any:
            return metadata.get(f"{arch}.{name}", default)

        heads = key("attention.head_count")
        hidden = key("embedding_length")
        vocab = key("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
        return cls(
            family=GGUF_ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv") or heads,
            head_dim=key("attention.key_length") or hidden // heads,
            rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=key("rope.freq_base", 10000.0),
            max_position_embeddings=key("context_length", 2048),
            tie_word_embeddings=not has_output_weight,
            attention_bias=arch == "qwen2",
            rope_scaling=_gguf_rope_scaling(key),
        )


def _hf_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta plus scaling, from either config style (`rope_parameters`, or `rope_theta`
    beside `rope_scaling`)."""
    rope = dict(hf.get("rope_parameters") or {})
    if "rope_theta" in hf:
        rope["rope_theta"] = hf["rope_theta"]
    scaling = hf.get("rope_scaling") or {}
    rope.update(scaling)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    return rope


def _gguf_rope_scaling(key) -> tuple[tuple[str, Any], ...] | None:
    kind = key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported")
    return (("factor", key("rope.scaling.factor", 1.0)), ("rope_type", "linear"))
