"""Tokenizers built from a GGUF vocabulary or a Hugging Face folder, and chat template rendering.

Encoding runs in the Rust `tokenizers` library (it is on the request path). Decoding joins the
bytes each token contributes, so that `decode` and the streaming detokenizer agree exactly.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2
import tokenizers
from tokenizers import AddedToken

from lmserve.text.fim import FimTokens, fim_from_gguf, fim_from_vocabulary
from lmserve.text.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    compile_chat_template,
)
from lmserve.text import hf_vocab
from lmserve.text.gguf_vocab import read_gguf_vocab
from lmserve.text.length_bound import LengthBound, length_bound
from lmserve.text.special_text import SpecialTexts, special_texts
from lmserve.weights.gguf import GGUFFile

__all__ = ["ChatTemplateError", "ChatTokenizer", "Tokenizer"]

# Starts a text encoded by the plain backend so the text is not the input's first piece (some
# pre-tokenizers prefix '▁' to that one only); an added token of the plain copy only.
_ANCHOR = "\ue000lmserve-anchor\ue001"


@runtime_checkable
class ChatTokenizer(Protocol):
    """What the HTTP server uses of a tokenizer: text <-> token ids, each token's bytes, and the
    chat template. `Tokenizer` below is the implementation; the server's tests use a fake."""

    chat_template: str | None  # None: the model has none (ChatML is rendered)
    bos_token: str | None
    eos_token: str | None
    fim: FimTokens  # fill-in-the-middle tokens, for /infill and `suffix`

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def encode_plain(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As encode, with special-token text encoded as the plain text it spells."""
        ...

    def encode_prompt(self, text: str, plain_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """A rendered prompt (no special tokens added): special-token text is parsed except in `plain_spans`."""
        ...

    @property
    def special_texts(self) -> tuple[str, ...]:
        """The texts encode parses as special tokens, such as "<|im_start|>"."""
        ...

    @property
    def special_text_set(self) -> SpecialTexts:
        """special_texts, with the pattern that finds them, made once (chat requests mask them)."""
        ...

    def min_num_tokens(self, data: bytes) -> int:
        """A lower bound on the tokens the UTF-8 text `data` encodes to; 0 if none is known."""
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The prompt text; raises a ValueError (ChatTemplateError) when the template refuses the messages."""
        ...


@dataclass(eq=False)
class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    Build with `from_gguf` or `from_hf_folder`. `decode` is the concatenation of `token_bytes`
    (special tokens dropped when asked), decoded as UTF-8 with U+FFFD for invalid bytes; for
    SentencePiece vocabularies one leading space is dropped, as `tokenizers` does. No
    clean-up of spaces before punctuation is applied.
    """

    backend: tokenizers.Tokenizer = field(repr=False)
    token_bytes_table: list[bytes] = field(repr=False)  # index = token id
    special_ids: frozenset[int] = field(repr=False)
    bos_token_id: int | None
    eos_token_ids: frozenset[int]
    bos_token: str | None  # texts the chat template sees as bos_token / eos_token
    eos_token: str | None
    chat_template: str | None = field(repr=False)
    prepend_bos: bool  # encode(add_special_tokens=True) puts bos_token_id first
    strip_leading_space: bool  # SentencePiece: decode drops the space the encoder prefixed
    exact_bytes: bool = True  # False: token bytes are approximations, decode goes through the backend
    fim: FimTokens = FimTokens()  # fill-in-the-middle tokens; all None for a model without them
    length_bound: LengthBound | None = None  # see min_num_tokens; None: no bound is known
    _template: jinja2.Template | None = field(default=None, init=False, repr=False)
    _plain: tokenizers.Tokenizer | None = field(default=None, init=False, repr=False)  # see _plain_backend

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes_table)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build from the `tokenizer.ggml.*` metadata of a GGUF file, as llama.cpp would tokenize
        (see gguf_vocab.read_gguf_vocab for the supported tokenizer models)."""
        meta = gguf.metadata
        vocab = read_gguf_vocab(meta)
        tokens = meta["tokenizer.ggml.tokens"]
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            backend=vocab.backend,
            token_bytes_table=vocab.token_bytes_table,
            special_ids=vocab.special_ids,
            bos_token_id=bos_id,
            eos_token_ids=vocab.end_ids,
            bos_token=tokens[bos_id] if bos_id is not None else None,
            eos_token=tokens[eos_id] if eos_id is not None else None,
            chat_template=meta.get("tokenizer.chat_template"),
            prepend_bos=bos_id is not None and bool(meta.get("tokenizer.ggml.add_bos_token", vocab.add_bos_default)),
            strip_leading_space=vocab.strip_leading_space,
            fim=fim_from_gguf(meta, vocab.backend.token_to_id),
            length_bound=length_bound(vocab.backend, vocab.token_bytes_table),
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face folder: tokenizer.json, and if present tokenizer_config.json
        (chat_template, bos/eos, add_bos_token), chat_template.jinja and generation_config.json
        (eos_token_id, an int or a list).

        `encode(add_special_tokens=True)` runs tokenizer.json's post-processor (BERT's [CLS]/[SEP],
        Llama's BOS); BOS is prepended on top only if add_bos_token asks and it did not add one.
        """
        folder = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        # Some tokenizer.json files pad or truncate (MiniLM pads to 128): encode returns the text's
        # ids only; length limits are the engine's to enforce with a clear error.
        backend.no_padding()
        backend.no_truncation()
        config = hf_vocab.read_json(folder / "tokenizer_config.json")
        generation = hf_vocab.read_json(folder / "generation_config.json")
        kind, strip = hf_vocab.decoder_kind(backend)
        bos_token, eos_token = (
            hf_vocab.token_text(config.get("bos_token")),
            hf_vocab.token_text(config.get("eos_token")),
        )
        bos_id = backend.token_to_id(bos_token) if bos_token else generation.get("bos_token_id")
        table = hf_vocab.token_bytes_table(backend, kind)
        return cls(
            backend=backend,
            token_bytes_table=table,
            special_ids=frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special),
            bos_token_id=bos_id,
            eos_token_ids=hf_vocab.end_ids(backend, eos_token, generation),
            bos_token=bos_token,
            eos_token=eos_token,
            chat_template=hf_vocab.chat_template(folder, config),
            prepend_bos=(bool(config.get("add_bos_token")) and bos_id is not None
                         and not hf_vocab.adds_bos(backend, bos_id)),
            strip_leading_space=strip,
            exact_bytes=kind != "other",
            fim=fim_from_vocabulary(backend.token_to_id),
            length_bound=length_bound(backend, table) if kind != "other" else None,
        )

    # --- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token text such as "<|im_start|>" becomes its single id.

        add_special_tokens adds BOS only if the model asks for it. A prompt rendered by a chat
        template that already writes BOS itself should be encoded with add_special_tokens=False.
        """
        # encode_batch, not encode: it lets go of the GIL while it works, so a worker thread
        # tokenizing megabytes does not stop the event loop (encode holds the GIL throughout).
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_plain(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As encode, with special-token text encoded as the plain text it spells (llama.cpp's
        parse_special false); special tokens are still added as add_special_tokens asks."""
        backend = self._plain_backend() if self._spells_special(text) else self.backend
        ids = backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_prompt(self, text: str, plain_spans: Sequence[tuple[int, int]] = ()) -> list[int]:
        """A prompt a chat template rendered, adding no special tokens (the template holds its
        BOS): special-token text is parsed everywhere except in `plain_spans`, the (start, end)
        character spans of text the request wrote (lmserve/text/special_text.py).

        A run of text between two of the template's special tokens that holds such a span is
        encoded as encode_plain encodes it, so the prompt is tokenized as if the request's text
        had never spelled a special token; without any, this is encode(text, False).
        """
        encoding = self.backend.encode_batch([text], add_special_tokens=False)[0]
        ids, offsets = encoding.ids, encoding.offsets
        forged = [i for i, token_id in enumerate(ids)
                  if token_id in self.special_ids and _overlaps(offsets[i], plain_spans)]
        if not forged:
            return ids
        forged_set = set(forged)
        trusted = [i for i, token_id in enumerate(ids) if token_id in self.special_ids and i not in forged_set]
        for first, last in reversed(_runs_around(forged, trusted, len(ids))):  # right to left: indexes hold
            start = offsets[first - 1][1] if first > 0 else 0
            end = offsets[last + 1][0] if last + 1 < len(ids) else len(text)
            ids[first : last + 1] = self._plain_run(text[start:end], at_start=start == 0)
        return ids

    @functools.cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The texts encode parses as special tokens, such as "<|im_start|>" (read once: 165 ms for
        a vocabulary of 102,801 of them)."""
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values() if t.special)

    @functools.cached_property
    def special_text_set(self) -> SpecialTexts:
        """special_texts with the pattern that finds them, made on first use and kept while the
        tokenizer is: 3.2 s once for 102,801 texts, where every chat request took 0.6 s."""
        return special_texts(self.special_texts)

    def _plain_run(self, text: str, at_start: bool) -> list[int]:
        if at_start:
            return self._plain_backend().encode_batch([text], add_special_tokens=False)[0].ids
        return self._plain_backend().encode_batch([_ANCHOR + text], add_special_tokens=False)[0].ids[1:]

    def _spells_special(self, text: str) -> bool:
        """Whether encode could parse a special token in `text`. Only such a text needs the plain
        copy of the backend; a text without one encodes alike in both, and the copy is dear to
        build (bench/RESULTS.md, twenty-eighth sitting). A special token matched on normalized
        text could match where its own text does not occur: with one, every text counts."""
        pattern = self.special_text_set.pattern
        return self._special_normalized or (pattern is not None and pattern.search(text) is not None)

    @functools.cached_property
    def _special_normalized(self) -> bool:
        """Whether a special token is matched on normalized text (see _spells_special)."""
        return any(t.special and t.normalized for t in self.backend.get_added_tokens_decoder().values())

    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token text as plain text, and knows _ANCHOR."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            plain.add_tokens([AddedToken(_ANCHOR, special=False, normalized=False)])
            self._plain = plain
        return self._plain

    def min_num_tokens(self, data: bytes) -> int:
        """A lower bound on how many tokens the UTF-8 text `data` encodes to, so that a text that
        cannot fit a context is refused by its length, untokenized; 0 when this tokenizer has no
        such bound (lmserve/text/length_bound.py says when it has)."""
        return self.length_bound.min_num_tokens(data) if self.length_bound is not None else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (see the class docstring for the exact rule)."""
        if not self.exact_bytes:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        table, special = self.token_bytes_table, self.special_ids
        if skip_special_tokens:
            data = b"".join([table[i] for i in ids if i not in special])
        else:
            data = b"".join([table[i] for i in ids])
        text = data.decode("utf-8", errors="replace")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The exact UTF-8 bytes this token contributes to decoded text (maybe a partial character)."""
        return self.token_bytes_table[token_id]

    def is_special(self, token_id: int) -> bool:
        """Control/special tokens: the ones decode(skip_special_tokens=True) leaves out."""
        return token_id in self.special_ids

    # --- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` with the model's chat template (plain ChatML if it has none).

        `extra` become template variables (e.g. documents, enable_thinking). Any template error,
        including raise_exception(...) inside the template, raises ChatTemplateError.
        """
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra}
        try:
            if self._template is None:
                self._template = compile_chat_template(self.chat_template or CHATML_TEMPLATE)
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, TypeError) as error:
            # TypeError: a template doing arithmetic on what it did not expect, e.g. content=None.
            raise ChatTemplateError(str(error)) from error
        except RecursionError as error:  # a value nested deeper than rendering it (tojson) can go
            raise ChatTemplateError("the messages nest too deeply to render") from error


def _overlaps(offsets: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    """Whether the characters `offsets` covers meet one of `spans` (in order, not overlapping)."""
    start, end = offsets
    before_end = bisect.bisect_left(spans, (end,))  # spans starting before `end`
    return before_end > 0 and spans[before_end - 1][1] > start


def _runs_around(forged: list[int], trusted: list[int], num_tokens: int) -> list[tuple[int, int]]:
    """(first, last) token indexes of each run of tokens between two trusted special tokens (or
    an end of the prompt) that holds forged ones, in order; both lists are in order."""
    runs: list[tuple[int, int]] = []
    for index in forged:
        after = bisect.bisect_right(trusted, index)  # the first trusted token after `index`
        first = trusted[after - 1] + 1 if after > 0 else 0
        last = trusted[after] - 1 if after < len(trusted) else num_tokens - 1
        if not runs or runs[-1] != (first, last):
            runs.append((first, last))
    return runs
