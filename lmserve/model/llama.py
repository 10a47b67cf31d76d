"""Llama-family decoders (Llama 2/3, SmolLM, TinyLlama, Mistral) and Qwen2 (q/k/v biases).

Parameter names mirror Hugging Face checkpoints for loading; `prepare()` then fuses q/k/v and
gate/up into single matrices and casts the projection weights to the serving dtype, or
`quantize()` stores them in a quantized format (model/linear.py, model/weight_formats/). The
residual stream, norms and attention softmax stay in float32. The model is a pure function of its
inputs and the KV cache it is handed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import native_module
from lmserve.model.attention import AttentionMetadata, paged_attention, write_kv
from lmserve.model.config import ModelConfig
from lmserve.model.linear import HeadEmbedding, Linear, fuse_linears, native_linear
from lmserve.model.rope import RotaryEmbedding, apply_rotary
from lmserve.model.unfilled import unfilled_embedding
from lmserve.model.weight_formats.floating import Bf16Panels, packs_bf16
from lmserve.model.weight_formats.int8 import W8A8Weight, int8_matmul_pays
from lmserve.weights.names import FUSED_PARTS  # what prepare() fuses


KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            module = native_module()  # float32 rows: one pass where ATen's is ~5 ops (kernels/decoder.cpp)
            if module is not None:
                return module.rms_norm(x, self.weight, self.eps)
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
        self.o_proj = Linear(self.num_heads * d, h, bias=False)
        self.scale = d ** -0.5

    def prepare(self, dtype: torch.dtype) -> None:  # FUSED_PARTS names what this fuses
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj], dtype)
        del self.q_proj, self.k_proj, self.v_proj
        self.o_proj.to(dtype)

    def forward(self, x, rotary: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None, meta: AttentionMetadata):
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.view(n, self.num_heads, self.head_dim), *rotary)
        k = apply_rotary(k.view(n, self.num_kv_heads, self.head_dim), *rotary)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if cache is not None:  # None: a forward that keeps no KV (whole-context prefills only)
            write_kv(cache, k, v, meta.slot_mapping)
        return self.o_proj(paged_attention(q, k, v, cache, meta, self.scale))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.intermediate_size = i
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = Linear(i, h, bias=False)

    def prepare(self, dtype: torch.dtype) -> None:  # FUSED_PARTS names what this fuses
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj], dtype)
        del self.gate_proj, self.up_proj
        self.down_proj.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.device.type == "cpu":
            module = native_module()  # one pass where ATen's silu and mul are two (kernels/decoder.cpp)
            if module is not None:
                return self.down_proj(module.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rotary, cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rotary, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = unfilled_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (T,), positions (T,), kv_caches, meta) -> hidden (T, hidden_size);
    compute_logits(hidden (N, hidden_size)) -> (N, vocab_size) float32.
    Call prepare() once after the weights are loaded."""

    def __init__(self, config: ModelConfig, max_positions: int, rope_freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config, max_positions, rope_freq_factors)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight  # (a head quantized from rows is tied already)

    def prepare(self, weight_dtype: torch.dtype, embed_dtype: torch.dtype | None = None) -> None:
        """Fuse projections and cast matmul weights to `weight_dtype`. The embedding table is stored
        in `embed_dtype`, by default the same (rows are looked up, then widened: the residual
        stream and norms stay float32). Weights about to be quantized stay float32 until then."""
        for layer in self.model.layers:
            self.prepare_layer(layer, weight_dtype)
        self.prepare_outer(weight_dtype, embed_dtype)

    @staticmethod
    def prepare_layer(layer: DecoderLayer, weight_dtype: torch.dtype) -> None:
        """prepare() for one decoder layer (the loader prepares each as soon as it is filled)."""
        layer.self_attn.prepare(weight_dtype)
        layer.mlp.prepare(weight_dtype)

    def prepare_outer(self, weight_dtype: torch.dtype, embed_dtype: torch.dtype | None = None) -> None:
        """prepare() for the head and the embedding table (a head already quantized, and embeddings
        read from it, are left as they are)."""
        embed_dtype = embed_dtype or weight_dtype
        head = self.lm_head.weight
        if head is not None and head.dtype != weight_dtype:  # a tied head gets its own narrower copy
            self.lm_head.weight = nn.Parameter(head.detach().to(weight_dtype), requires_grad=False)
        embed = self.model.embed_tokens
        if isinstance(embed, nn.Embedding) and embed.weight.dtype != embed_dtype:  # bf16: half the table's memory
            embed.weight = nn.Parameter(embed.weight.detach().to(embed_dtype), requires_grad=False)

    native = None  # a NativeDecoder running the steps' layers (enable_native_layers)

    def enable_native_layers(self) -> bool:
        """Run the layers of every step with a KV cache in C++ (lmserve/kernels/decoder.cpp): the
        same operations in the same order, so the same results, without ~50 Python-level op calls per
        layer.
        Call after prepare, quantize and pack_for_cpu (it holds the weights as they are then).
        False, and nothing changed, off the CPU or where the native kernels are unavailable."""
        module = native_module()
        if module is None or self.device.type != "cpu":
            return False
        layers = self.model.layers
        attn = layers[0].self_attn
        native = module.NativeDecoder(attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                      layers[0].mlp.intermediate_size, layers[0].input_layernorm.eps, attn.scale)
        for layer in layers:
            linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
            native.add_layer([native_linear(module, linear) for linear in linears],
                             layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
        self.native = native
        return True

    def pack_for_cpu(self) -> bool:
        """Lay bf16 projection weights out for the CPU's product (floating.pack_bf16; after prepare
        and quantize); False, and nothing changed, where it has no layout or the weights are not bf16.
        A tied model whose head takes the kernels' panels then reads its embeddings from them
        (HeadEmbedding), its own bf16 table dropped: the same values, one copy."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and m.weight is not None]  # None: a quantized storage
        if not linears or not packs_bf16() or any(m.weight.dtype != torch.bfloat16 for m in linears):
            return False
        for module in linears:
            module.pack_for_cpu()
        embed, head = self.model.embed_tokens, self.lm_head.storage
        if (self.config.tie_word_embeddings and isinstance(head, Bf16Panels) and isinstance(embed, nn.Embedding)
                and embed.weight.dtype == torch.bfloat16):
            self.model.embed_tokens = HeadEmbedding(head)
        return True

    def quantize(self, kind: str, head_kind: str = "int8") -> None:
        """Quantized copies of every projection (Linear.quantize: under "int4" the W4A8 one where the
        kernels run it, else weight-only "int8" / "int4" copies for steps of few tokens and W8A8
        copies for larger steps where int8 products pay, int8_matmul_pays()) and `head_kind` ones of
        the head; after prepare. A tied model's embeddings are then read from the head's W8A8 copy
        (HeadEmbedding), their own table dropped."""
        for layer in self.model.layers:
            self.quantize_layer(layer, kind)
        self.quantize_head(head_kind)

    @staticmethod
    def quantize_layer(layer: DecoderLayer, kind: str, int8_parts: Collection[str] = ()) -> None:
        """quantize() for one prepared decoder layer; under "int4", a module made from one of
        `int8_parts` (its checkpoint modules, "self_attn.v_proj") is int8."""
        w8a8 = int8_matmul_pays()
        for name, module in layer.named_modules():
            if isinstance(module, Linear):
                wider = kind == "int4" and any(part in int8_parts for part in FUSED_PARTS.get(name, (name,)))
                module.quantize("int8" if wider else kind, w8a8)

    def quantize_head(self, head_kind: str) -> None:
        """quantize() for the prepared head; a tied model's embeddings then read its W8A8 copy."""
        self.lm_head.quantize(head_kind, int8_matmul_pays())
        if self.config.tie_word_embeddings and isinstance(self.lm_head.storage, W8A8Weight):
            self.model.embed_tokens = HeadEmbedding(self.lm_head.storage)

    @property
    def head_name(self) -> str:
        """The checkpoint tensor the head is made from: a tied model's embedding table."""
        return "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"

    def quantize_head_rows(self, rows: Callable[[int, int], torch.Tensor]) -> bool:
        """quantize_head("int8") before the embeddings and head are filled, its weight read as
        rows(start, stop) a piece at a time (Linear.quantize_rows), so that loading never holds it
        whole; a tied model's embeddings then read that copy, and the checkpoint's table is not
        filled at all. False, and nothing done, where the copy needs the weight whole."""
        if not self.lm_head.quantize_rows(rows):
            return False
        if self.config.tie_word_embeddings:
            self.model.embed_tokens = HeadEmbedding(self.lm_head.storage)
        return True

    @property
    def device(self) -> torch.device:
        return self.rope.cos.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids).float()
        rotary = self.rope(positions)  # gathered once, shared by every layer
        if (self.native is not None and (meta.num_decodes == 0 or meta.decode_kernel)
                and kv_caches and kv_caches[0] is not None):  # no caches: decoder embeddings
            prefills = [(p.query_start, p.query_len, p.context_len, p.slot_ids) for p in meta.prefills]
            x = self.native.forward(x, *rotary, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                                    meta.slot_mapping, meta.num_decodes, meta.decode_blocks, meta.decode_lens,
                                    meta.block_size, prefills)
            return self.model.norm(x)
        for layer, cache in zip(self.model.layers, kv_caches):
            x = layer(x, rotary, cache, meta)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
