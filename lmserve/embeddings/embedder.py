"""Embedding models: token-id lists in, one pooled float32 vector per list out.

Two implementations: an encoder (BERT family, its own weights) and the served decoder (the chat
model's weights, run on a private KV cache so the generation engine's cache and scheduler are
never touched). Both are synchronous; EmbeddingWorker runs them off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from lmserve.embeddings.pooling import Pooling, read_sentence_transformer_config
from lmserve.model.attention import AttentionMetadata, PrefillSeq
from lmserve.model.bert import BertModel, load_bert
from lmserve.text.tokenizer import Tokenizer


class Embedder(Protocol):
    """embed(batch) -> (len(batch), dim) float32, row i from batch[i] alone: padding and
    batch-mates do not change a row beyond float rounding. Callers check every list is
    non-empty, at most max_input_tokens long, with ids below vocab_size; callers bound the
    batch size. Not thread-safe: one thread calls embed."""

    tokenizer: Tokenizer
    max_input_tokens: int
    pooling: Pooling  # how token vectors become one, and whether it is L2-normalised

    @property
    def dim(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def embed(self, batch: list[list[int]]) -> torch.Tensor: ...


def pad_right(batch: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> ids (B, L) padded with 0, mask (B, L) True on real tokens."""
    rows = [torch.tensor(ids, dtype=torch.long) for ids in batch]
    ids = pad_sequence(rows, batch_first=True, padding_value=0).to(device)  # (B, L)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]  # (B, L)
    return ids, mask


@dataclass(eq=False)
class EncoderEmbedder:
    """A BERT-family encoder with sentence-transformers pooling."""

    model: BertModel
    tokenizer: Tokenizer
    pooling: Pooling
    max_input_tokens: int

    @classmethod
    def from_folder(cls, folder: str | Path) -> EncoderEmbedder:
        """Weights, tokenizer and pooling from an HF (sentence-transformers) folder."""
        model = load_bert(folder)
        st = read_sentence_transformer_config(folder)
        max_len = min(st.max_seq_length or model.config.max_position_embeddings, model.config.max_position_embeddings)
        return cls(model, Tokenizer.from_hf_folder(folder), st.pooling, max_len)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_right(batch, self.model.embeddings.word_embeddings.weight.device)
        return self.pooling(self.model(ids, mask), mask)  # (B, dim)


@dataclass(eq=False)
class DecoderEmbedder:
    """The chat model's final normed hidden states, pooled. Each text is one causal prefill of a
    flattened batch (no padding inside the model), on a KV cache allocated for this call only."""

    model: torch.nn.Module  # LlamaForCausalLM; its forward signature is used as is
    tokenizer: Tokenizer
    pooling: Pooling
    max_input_tokens: int

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @torch.inference_mode()
    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        device = self.model.device
        lengths = [len(ids) for ids in batch]
        ids = torch.tensor([i for seq in batch for i in seq], dtype=torch.long, device=device)  # (T,)
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])  # (T,)
        # Whole-context prefills attend to their own k and v: no KV cache to keep or read.
        no_cache = [None] * self.model.config.num_hidden_layers
        hidden = self.model(ids, positions, no_cache, _prefill_meta(lengths, device))  # (T, H)
        padded = pad_sequence(list(hidden.split(lengths)), batch_first=True)  # (B, L, H)
        mask = torch.arange(padded.shape[1], device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return self.pooling(padded, mask)


def _prefill_meta(lengths: list[int], device: torch.device) -> AttentionMetadata:
    """Every sequence a whole-context prefill: causal attention within itself only."""
    starts = accumulate(lengths[:-1], initial=0)
    prefills = [PrefillSeq(start, n, n, None) for start, n in zip(starts, lengths)]
    slots = torch.arange(sum(lengths), dtype=torch.long, device=device)  # (T,)
    # by keyword: the engine's metadata grows fields for decoding, which this path never uses
    return AttentionMetadata(slot_mapping=slots, num_decodes=0, decode_blocks=None, decode_lens=None,
                             prefills=prefills)
