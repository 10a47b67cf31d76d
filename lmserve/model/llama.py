"""Llama-family decoders (Llama 2/3, SmolLM, TinyLlama, Mistral) and Qwen2 (q/k/v biases).

Parameter names mirror Hugging Face checkpoints for loading; `prepare()` then fuses q/k/v and
gate/up into single matrices and casts the projection weights to the serving dtype. The
residual stream, norms and attention softmax stay in float32. The model is a pure function of
its inputs and the KV cache it is handed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import native_module
from lmserve.model.attention import AttentionMetadata, paged_attention, write_kv
from lmserve.model.config import ModelConfig
from lmserve.model.rope import RotaryEmbedding, apply_rotary
from lmserve.model.unfilled import unfilled_embedding
from lmserve.model.weight_formats.int4 import (INT4_GROUP, can_pack_int4, int4_linear, int4_linear_supported, pack_int4,
                                               quantize_int4_groups)
from lmserve.model.weight_formats.int8 import (can_pack, hadamard_block, int8_linear, int8_matmul_pays, int8_weight_rows,
                                               pack_weight, packs_weights, rotate_weight)

KVCache = tuple[torch.Tensor, torch.Tensor]


# Steps of at most this many tokens use a Linear's narrow copy: at a few rows the product is bound
# by the bytes of weights read, and weight-only int8/int4 kernels read a half or a quarter of bf16's;
# larger steps are compute-bound and run W8A8 (model/weight_formats/int8.py) where the CPU has int8 dot products,
# bf16 elsewhere (crossovers measured against bf16 with bench/engine_loop.py: int8 loses from 8
# rows, int4 from about 12; W8A8 is ahead of bf16 from 8 rows on).
SMALL_STEP_TOKENS = {"int8": 4, "int4": 8}
# Where the W8A8 weight is packed for the kernels' VNNI product (model/weight_formats/int8.py), that product is
# ahead of the weight-only int8 kernel from 1 row (120 projections of the default model, weights
# cycling: 1 row 3.4 ms vs 5.3; 8 rows 5.2 vs 10.6): int8 needs no narrow copy at all. int4 has no
# entry: the builds that pack run the W4A8 product, which serves int4 weights at every step.
PACKED_SMALL_STEP_TOKENS = {"int8": 0}


PACK_BATCH_HINT = 64  # rows oneDNN picks the blocked weight layout for (any row count works)


class Linear(nn.Linear):
    """A projection whose weight may be stored in a narrower dtype than the activations:
    inputs are cast to it and outputs back (bf16 weights halve the bytes read per token).
    After quantize() the weight itself is dropped: under int4 where the kernels run W4A8, one copy
    of its 4-bit integers serves every step; otherwise small steps run on a weight-only int8 or int4
    copy (bf16 activations) and, where the CPU has int8 dot products, larger ones on a W8A8 copy."""

    narrow: tuple | None = None  # ("int8", (N, K) int8, (N,) scales) or ("int4", packed, (K/G, N, 2) scale/zero)
    int4: tuple | None = None  # W4A8 for every step: pack_int4'd (N/16, K/8, 16, 4), (K/G, N) float16 scales, lows
    small_step_tokens = 0  # steps of at most this many tokens run the narrow copy
    wide: tuple | None = None  # (N, K) int8 or its pack_weight, (N,) float32 scales, Hadamard block: larger steps (W8A8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.narrow is not None and x.shape[0] <= self.small_step_tokens:
            kind, weight, scales = self.narrow
            xb = x.to(torch.bfloat16).contiguous()
            if kind == "int4":
                out = torch._weight_int4pack_mm_for_cpu(xb, weight, INT4_GROUP, scales)
            else:
                out = torch._weight_int8pack_mm(xb, weight, scales)
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.int4 is not None:
            return int4_linear(x.float(), *self.int4, self.bias).to(x.dtype)
        if self.wide is not None:
            weight, scales, block = self.wide
            return int8_linear(x.float(), weight, scales, self.bias, block).to(x.dtype)
        if self.packed:
            out = torch.ops.mkldnn._linear_pointwise(x.to(self.weight.dtype), self.weight, self.bias, "none", [None], "")
            return out.to(x.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    packed = False  # weight is a oneDNN-blocked tensor (see pack_for_cpu)

    def pack_for_cpu(self) -> None:
        """Replace a bf16 weight by oneDNN's blocked layout of it, so each matmul stops
        re-laying it out: ~30% faster for 1-128 rows, the same values, no extra memory."""
        weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_BATCH_HINT)
        del self.weight
        self.weight = weight  # a plain attribute: an opaque oneDNN tensor cannot be a Parameter
        self.packed = True

    def quantize(self, kind: str, wide: bool = True) -> str | None:
        """Replace the weight by quantized copies. "int4" where the kernels' W4A8 product runs
        (int4_linear_supported(), N % 16 and K % 32): one copy, the weight's 4-bit integers with
        int8 activations, for every step. Otherwise a narrow copy for small steps and an int8 one of
        its Hadamard transform for larger steps (int8 activations, see model/weight_formats/int8.py). Returns the
        kind serving single-token steps ("int4" falls back to "int8" where the shape rules do not
        hold; None where the packed W8A8 product serves every step). wide=False keeps the weight,
        cast to bf16, for the larger steps instead."""
        weight = self.weight.detach()
        n, k = weight.shape
        if kind == "int4" and wide and int4_linear_supported() and can_pack_int4(weight):
            q, scales, lows = quantize_int4_groups(weight)
            self.int4 = (pack_int4(q), scales, lows)
            self.weight = None
            return "int4"
        narrow_kind = "int4" if kind == "int4" and can_pack_int4(weight) else "int8"
        limits = SMALL_STEP_TOKENS
        if wide:
            block = hadamard_block(k)
            wide_weight, wide_scales = rotated_int8(weight, block)
            if packs_weights() and can_pack(wide_weight):
                wide_weight = pack_weight(wide_weight)
                limits = PACKED_SMALL_STEP_TOKENS
            self.wide = (wide_weight, wide_scales.float(), block)
        self.small_step_tokens = limits[narrow_kind]
        if self.small_step_tokens > 0:
            self.narrow = (narrow_kind, *(quantize_int4 if narrow_kind == "int4" else quantize_int8)(weight))
        if not wide:
            self.to(torch.bfloat16)  # weight and bias, as prepare() casts an unquantized bf16 model
        else:
            self.weight = None  # every step now runs on one of the copies
        return self.narrow[0] if self.narrow is not None else None


NARROW_KINDS = {None: 0, "int8": 1, "int4": 2}  # Narrow in kernels/decoder.cpp


def native_linear(module, linear: Linear):
    """The kernels' view of a Linear: the same tensors, not copies."""
    kind, narrow_weight, narrow_scales = linear.narrow or (None, None, None)
    wide_weight, wide_scales, wide_block = linear.wide or (None, None, 1)
    weight = linear.weight if linear.packed or linear.weight is None else linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    int4_weight, int4_scales, int4_lows = linear.int4 or (None, None, None)
    return module.NativeLinear(weight, bias, linear.packed, NARROW_KINDS[kind], narrow_weight, narrow_scales,
                               linear.small_step_tokens, wide_weight, wide_scales, wide_block,
                               int4_weight, int4_scales, int4_lows)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (N, K) int8 values and (N,) bf16 scales. The values are
    rounded against the bf16 scales themselves, so int8 * scale is the weight as closely as the
    stored scale allows (the weight-only kernel takes bf16 scales, W8A8 the same ones widened)."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
    quantized = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized, scales


def rotated_int8(weight: torch.Tensor, block: int, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8(rotate_weight(weight, block)), `rows` rows at a time (every step is per row):
    the transform works in float64, which for a whole embedding-sized head is 4x its float32 bytes."""
    parts = [quantize_int8(rotate_weight(part.float(), block)) for part in weight.split(rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of INT4_GROUP input columns, w = (q - 8) * scale + zero, packed for
    the CPU kernel. Each group's min and max map to 0 and 15, which is how Q4_1 quantizes: weights
    dequantized from a Q4_1 file come back to the file's own integers (and Q4_0's sit on its grid)."""
    n, k = weight.shape
    groups = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
    return packed, scale_zero.to(torch.bfloat16)


def fuse_linears(parts: list[nn.Linear], dtype: torch.dtype) -> Linear:
    """One Linear computing all of `parts` side by side (one matmul instead of several)."""
    weight = torch.cat([p.weight.detach() for p in parts]).to(dtype)
    has_bias = parts[0].bias is not None
    fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]).to(dtype), requires_grad=False)
    return fused


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

    def prepare(self, dtype: torch.dtype) -> None:
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

    def prepare(self, dtype: torch.dtype) -> None:
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj], dtype)
        del self.gate_proj, self.up_proj
        self.down_proj.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
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


class HeadEmbedding(nn.Module):
    """A tied model's token embeddings read from its head's W8A8 copy (int8_weight_rows): one table
    instead of two. On SmolLM2-135M the bf16 table this replaces took 54 MiB, the packed int8 head
    27; rows come back within int8 rounding of the file's Q8_0 ones."""

    def __init__(self, head: Linear):
        super().__init__()
        self.wide = head.wide  # the head's own tensors, not copies

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight, scales, block = self.wide
        return int8_weight_rows(weight, scales, input_ids, block)


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
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        """Lay bf16 projection weights out for oneDNN (after prepare and quantize); False, and
        nothing changed, where oneDNN is missing or the weights are not bf16."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and m.weight is not None]  # None: quantized
        if not linears or not torch.backends.mkldnn.is_available() or any(m.weight.dtype != torch.bfloat16 for m in linears):
            return False
        for module in linears:
            module.pack_for_cpu()
        return True

    def quantize(self, kind: str, head_kind: str = "int8") -> None:
        """Quantized copies of every projection (Linear.quantize: under "int4" the W4A8 one where the
        kernels run it, else narrow "int8" / "int4" copies for steps of few tokens and W8A8 copies
        for larger steps where int8 products pay, int8_matmul_pays()) and `head_kind` ones of the
        head; after prepare. A tied model's embeddings are then read from the
        head's W8A8 copy (HeadEmbedding), their own table dropped."""
        for layer in self.model.layers:
            self.quantize_layer(layer, kind)
        self.quantize_head(head_kind)

    @staticmethod
    def quantize_layer(layer: DecoderLayer, kind: str) -> None:
        """quantize() for one prepared decoder layer."""
        wide = int8_matmul_pays()
        for module in layer.modules():
            if isinstance(module, Linear):
                module.quantize(kind, wide)

    def quantize_head(self, head_kind: str) -> None:
        """quantize() for the prepared head; a tied model's embeddings then read its W8A8 copy."""
        self.lm_head.quantize(head_kind, int8_matmul_pays())
        if self.config.tie_word_embeddings and self.lm_head.wide is not None:
            self.model.embed_tokens = HeadEmbedding(self.lm_head)

    @property
    def device(self) -> torch.device:
        return self.rope.cos.device

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids).float()
        rotary = self.rope(positions)  # gathered once, shared by every layer
        if (self.native is not None and (meta.num_decodes == 0 or meta.decode_lens is not None)
                and kv_caches and kv_caches[0] is not None):  # no caches: decoder embeddings
            block_size = meta.block_size if meta.num_decodes else 0
            prefills = [(p.query_start, p.query_len, p.context_len, p.slot_ids) for p in meta.prefills]
            x = self.native.forward(x, *rotary, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                                    meta.slot_mapping, meta.num_decodes, meta.decode_blocks, meta.decode_lens,
                                    block_size, prefills)
            return self.model.norm(x)
        for layer, cache in zip(self.model.layers, kv_caches):
            x = layer(x, rotary, cache, meta)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
