"""Llama-family decoders (Llama 2/3, SmolLM, TinyLlama, Mistral) and Qwen2 (q/k/v biases).

Parameter names mirror Hugging Face checkpoints. The model is a pure function of its inputs
and the KV cache it is handed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.attention import AttentionMetadata, paged_attention, write_kv
from lmserve.model.config import ModelConfig
from lmserve.model.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        bias = config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.scale = d ** -0.5

    def forward(self, x, positions, rope: RotaryEmbedding, cache: KVCache, meta: AttentionMetadata):
        n = x.shape[0]
        q = rope(self.q_proj(x).view(n, self.num_heads, self.head_dim), positions)
        k = rope(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), positions)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        write_kv(cache, k, v, meta.slot_mapping)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, rope, cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (T,), positions (T,), kv_caches, meta) -> hidden (T, hidden_size);
    compute_logits(hidden (N, hidden_size)) -> (N, vocab_size) float32."""

    def __init__(self, config: ModelConfig, max_positions: int, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config, max_positions, rope_freq_factors)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer, cache in zip(self.model.layers, kv_caches):
            x = layer(x, positions, self.rope, cache, meta)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
