"""BERT-family encoders (BERT, MiniLM, the sentence-transformers embedding models built on them).

Parameter names mirror Hugging Face's `BertModel` so that a checkpoint loads by name. The model
is a pure function of a padded batch: forward(input_ids (B, L), attention_mask (B, L)) ->
last hidden states (B, L, hidden_size). Every input is one segment (token type 0), which is how
embedding models encode a single text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.model.unfilled import unfilled_embedding
from lmserve.weights.gguf import UnsupportedModelError
from lmserve.weights.load import fill_parameters, read_safetensors

# HF model_type values whose checkpoints are plain BertModel weights.
BERT_MODEL_TYPES = ("bert",)

ACTIVATIONS = {
    "gelu": F.gelu,  # the exact erf form, as HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        """From config.json; a model this file cannot run exactly raises UnsupportedModelError."""
        model_type = hf.get("model_type", "")
        if model_type not in BERT_MODEL_TYPES:
            raise UnsupportedModelError(f"embedding model_type {model_type!r} is not supported "
                                        f"(supported: {', '.join(BERT_MODEL_TYPES)})")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported")
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
        )


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = unfilled_embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = unfilled_embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = unfilled_embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        # Single-segment inputs: token type 0 everywhere, i.e. row 0 added to every token.
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)  # (B, L, H)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, L, D)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                             attn_mask=key_mask)  # (B, heads, L, D)
        return out.transpose(1, 2).reshape(b, length, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(attended) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)  # HF's name: "attention.self.query.weight"
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inner: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(inner) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """forward(input_ids (B, L), attention_mask (B, L) bool, True for real tokens) ->
    (B, L, hidden_size) float32. Rows of padding positions are computed but meaningless."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, L): every query ignores padded keys
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x


def load_bert(folder: str | Path) -> BertModel:
    """A BertModel from an HF folder (config.json, *.safetensors), float32, on the CPU.

    Strict: every parameter must be in the checkpoint. Checkpoint names may carry a "bert."
    prefix (task-head checkpoints); tensors the encoder does not use (pooler, heads) are skipped.
    """
    folder = Path(folder)
    config = BertConfig.from_hf(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = BertModel(config)
    tensors = {name.removeprefix("bert."): t for name, t in read_safetensors(Path(folder)).items()}
    fill_parameters(model, tensors, torch.float32)
    return model.eval()
