"""How few tokens a text of a given byte length can take: lets a server refuse a prompt that
cannot fit a context by its length, before spending seconds tokenizing megabytes of it.

The bound: when decoding a text's tokens gives back at least every byte of the text, and no
token gives back more than B bytes, a text of N bytes takes at least ceil(N / B) tokens.

"Gives back every byte" holds for BPE over bytes (byte-level BPE, SentencePiece-style BPE with
byte fallback): each byte of the text ends up in exactly one token, and what a normalizer or
pre-tokenizer may add ('▁' before a run of text) only adds bytes. One exception is counted: a
byte-level vocabulary without an unknown token silently drops a byte that has no token (SmolLM2
has none for a few control characters), so those bytes are left out of N. It fails wherever
text can be folded, and then there is no bound: an unknown token (a run of text -> one <unk>),
normalizers that fold (NFKC, lowercasing, accent stripping), pre-tokenizers that drop
whitespace (BERT's), added tokens that swallow the whitespace around them (lstrip/rstrip).
The counter-intuitive "tokens <= bytes" (each token covers at least one byte) is true too, but
bounds the other way: it cannot show that a text is too long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import tokenizers
from tokenizers import models

# Bytes valid UTF-8 text can hold: all but C0, C1 and F5-FF.
_TEXT_BYTES = frozenset(b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5)
# Pre-tokenizers that only split text (or respell it, as ByteLevel and Metaspace do), never drop any.
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Split", "Sequence"})


@dataclass(frozen=True)
class LengthBound:
    """The bound for one tokenizer: its longest token, and the bytes it drops."""

    max_bytes_per_token: int
    dropped_bytes: bytes = b""  # byte values with no token, which encoding drops

    def min_num_tokens(self, data: bytes) -> int:
        """The fewest tokens the UTF-8 text `data` can encode to."""
        num_kept_bytes = len(data.translate(None, self.dropped_bytes) if self.dropped_bytes else data)
        return -(-num_kept_bytes // self.max_bytes_per_token)


def length_bound(backend: tokenizers.Tokenizer, token_bytes_table: list[bytes]) -> LengthBound | None:
    """The bound of `backend`, whose tokens decode to `token_bytes_table`; None when there is none."""
    if not (isinstance(backend.model, models.BPE) and _only_adds(_state(backend.normalizer))
            and _only_splits(_state(backend.pre_tokenizer))
            and not any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values())):
        return None
    single_bytes = {raw[0] for raw in token_bytes_table if len(raw) == 1}
    missing = bytes(sorted(_TEXT_BYTES - single_bytes))
    # With an unknown token, a character whose bytes are not all in the vocabulary becomes <unk>,
    # however many bytes it has (and fused with its neighbours): no bound.
    if missing and backend.model.unk_token is not None:
        return None
    return LengthBound(max(len(raw) for raw in token_bytes_table), missing)


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _only_adds(normalizer: dict | None) -> bool:
    """A normalizer that at most prefixes '▁' and spells spaces as '▁' (SentencePiece's)."""
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_only_adds(step) for step in normalizer.get("normalizers", []))
    if kind == "Prepend":
        return True
    return kind == "Replace" and normalizer.get("pattern") == {"String": " "} and normalizer.get("content") == "\u2581"


def _only_splits(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind not in _KEEPING_PRE_TOKENIZERS or (kind == "Split" and pre_tokenizer.get("behavior") == "Removed"):
        return False
    return all(_only_splits(step) for step in pre_tokenizer.get("pretokenizers", []))
