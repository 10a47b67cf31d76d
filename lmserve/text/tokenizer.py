"""Tokenizers built from a GGUF vocabulary or a Hugging Face folder, and chat template rendering.

Encoding runs in the Rust `tokenizers` library (it is on the request path). Decoding joins the
bytes each token contributes, so that `decode` and the streaming detokenizer agree exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import tokenizers
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from lmserve.weights.gguf import GGUFFile

# llama.cpp's token types (`tokenizer.ggml.token_type`).
(
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_CONTROL,
    TOKEN_USER_DEFINED,
    TOKEN_UNUSED,
    TOKEN_BYTE,
) = 1, 2, 3, 4, 5, 6

# Used when a model ships no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp ends generation on these tokens whatever the metadata says (llama-vocab.cpp, "EOG").
_END_OF_GENERATION_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class ChatTemplateError(ValueError):
    """The chat template failed to render; the message is the template's own error message."""


# ---------------------------------------------------------------------------------------------
# Pre-tokenizer split regexes, per `tokenizer.ggml.pre`, transcribed from llama.cpp's llama-vocab.cpp.
# Where llama.cpp rewrites a tokenizer.json regex for std::regex, we keep the original: the
# `tokenizers` library runs Oniguruma, which understands it, and the two are meant to be equal.

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE for one `tokenizer.ggml.pre` name.

    `splits` run in order, each one splitting every piece the previous one produced (matches and
    the text between them both become pieces), as llama.cpp's unicode_regex_split does.
    """

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a vocabulary token is taken whole (llama 3)
    add_bos: bool = False  # llama.cpp's default when the file does not say


def _pre_tokenizer_table() -> dict[str, PreTokenizer]:
    deepseek_coder = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}")
    groups = [  # (space-separated names, rules), in llama-vocab.cpp's order
        ("default", PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
        (
            "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2",
            PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
        ),
        ("dbrx smaug-bpe glm4 chatglm-bpe", PreTokenizer((_LLAMA3,))),
        ("deepseek-coder", PreTokenizer(deepseek_coder)),
        ("falcon", PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
        ("starcoder refact command-r smollm codeshell exaone minerva-7b", PreTokenizer((r"\p{N}", _GPT2))),
        ("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum", PreTokenizer((_GPT2,))),
        ("jina-v1-en jina-v2-code roberta-bpe mpt olmo jais exaone4 trillion granite-docling", PreTokenizer((_GPT2,))),
        ("qwen2 deepseek-r1-qwen kormo megrez stablelm2 hunyuan grok-2", PreTokenizer((_QWEN2,))),
        ("tekken", PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
        ("gpt-4o llama4 minimax-m2", PreTokenizer((_GPT4O,))),
        ("poro-chat bloom gpt3-finnish", PreTokenizer((_PORO,))),
        ("viking", PreTokenizer((_PORO, r"\p{N}"))),
        ("seed-coder", PreTokenizer((_SEED_CODER,))),
    ]
    return {name: pre for names, pre in groups for name in names.split()}


PRE_TOKENIZERS = _pre_tokenizer_table()


def pre_tokenizer_for(name: str) -> PreTokenizer:
    """The split rules for a `tokenizer.ggml.pre` name; ValueError for one lmserve does not know."""
    name = name or "default"  # older files have no pre-tokenizer name
    if name not in PRE_TOKENIZERS:
        # llama.cpp would fall back to "default" with a warning; a silently wrong split is worse.
        raise ValueError(
            f"GGUF pre-tokenizer {name!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    return PRE_TOKENIZERS[name]


# ---------------------------------------------------------------------------------------------
# Token bytes


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {char: byte for byte, char in bytes_to_unicode().items()}


def byte_level_bytes(token: str) -> bytes:
    """A byte-level token's bytes; text outside the byte alphabet (an added token) is taken as is.

    That is the rule of the `tokenizers` ByteLevel decoder, so HF folders decode the same way.
    """
    try:
        return bytes(_UNICODE_TO_BYTE[char] for char in token)
    except KeyError:
        return token.encode("utf-8")


def sentencepiece_bytes(token: str) -> bytes:
    """A SentencePiece token's bytes: `<0xNN>` is that byte, '▁' is a space."""
    match = _BYTE_TOKEN.match(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Chat templates


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (marks assistant text for training masks):
    parsed so such templates load, and rendered as its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers defines it: jinja's own tojson escapes HTML characters, templates expect raw JSON.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers renders them in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# Tokenizer


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
    _template: jinja2.Template | None = field(default=None, init=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes_table)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> Tokenizer:
        """Build from the `tokenizer.ggml.*` metadata of a GGUF file, as llama.cpp would tokenize.

        Supports `gpt2` (byte-level BPE, split by the `tokenizer.ggml.pre` regexes) and `llama`
        (SentencePiece BPE with byte fallback; a '▁' is prefixed to every run of plain text,
        also after a special token, as llama.cpp and the legacy HF Llama tokenizer do).
        """
        meta = gguf.metadata
        model = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if model == "gpt2":
            vocab = _gguf_byte_level_vocab(meta, tokens, types)
        elif model == "llama":
            vocab = _gguf_sentencepiece_vocab(meta, tokens, types)
        else:
            raise ValueError(f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")
        _add_gguf_added_tokens(vocab.backend, tokens, types)
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            backend=vocab.backend,
            token_bytes_table=vocab.token_bytes_table,
            special_ids=frozenset(i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)),
            bos_token_id=bos_id,
            eos_token_ids=_gguf_end_ids(meta, tokens),
            bos_token=tokens[bos_id] if bos_id is not None else None,
            eos_token=tokens[eos_id] if eos_id is not None else None,
            chat_template=meta.get("tokenizer.chat_template"),
            prepend_bos=bos_id is not None and bool(meta.get("tokenizer.ggml.add_bos_token", vocab.add_bos_default)),
            strip_leading_space=vocab.strip_leading_space,
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
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
        kind, strip = _hf_decoder_kind(decoder)
        bos_token, eos_token = (
            _token_text(config.get("bos_token")),
            _token_text(config.get("eos_token")),
        )
        bos_id = backend.token_to_id(bos_token) if bos_token else generation.get("bos_token_id")
        return cls(
            backend=backend,
            token_bytes_table=_hf_token_bytes(backend, kind),
            special_ids=frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special),
            bos_token_id=bos_id,
            eos_token_ids=_hf_end_ids(backend, eos_token, generation),
            bos_token=bos_token,
            eos_token=eos_token,
            chat_template=_hf_chat_template(folder, config),
            prepend_bos=bool(config.get("add_bos_token")) and bos_id is not None and not _adds_bos(backend, bos_id),
            strip_leading_space=strip,
            exact_bytes=kind != "other",
        )

    # --- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token text such as "<|im_start|>" becomes its single id.

        add_special_tokens adds BOS only if the model asks for it. A prompt rendered by a chat
        template that already writes BOS itself should be encoded with add_special_tokens=False.
        """
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

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


# ---------------------------------------------------------------------------------------------
# GGUF helpers


@dataclass
class _GGUFVocab:
    """What differs between the GGUF tokenizer models."""

    backend: tokenizers.Tokenizer
    token_bytes_table: list[bytes]
    add_bos_default: bool  # llama.cpp's default when the file has no add_bos_token
    strip_leading_space: bool


def _gguf_byte_level_vocab(meta: dict, tokens: list[str], types: list[int]) -> _GGUFVocab:
    pre = pre_tokenizer_for(str(meta.get("tokenizer.ggml.pre", "default")))
    backend = _byte_level_backend(tokens, meta["tokenizer.ggml.merges"], pre)
    table = [_gguf_byte_level_bytes(token, token_type) for token, token_type in zip(tokens, types)]
    return _GGUFVocab(backend, table, add_bos_default=pre.add_bos, strip_leading_space=False)


def _gguf_sentencepiece_vocab(meta: dict, tokens: list[str], types: list[int]) -> _GGUFVocab:
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend = _sentencepiece_backend(tokens, meta, add_space_prefix)
    table = [_gguf_sentencepiece_bytes(token, token_type) for token, token_type in zip(tokens, types)]
    return _GGUFVocab(backend, table, add_bos_default=True, strip_leading_space=add_space_prefix)


def _byte_level_backend(tokens: list[str], merges: list[str], pre: PreTokenizer) -> tokenizers.Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=[_split_merge(m) for m in merges],
        ignore_merges=pre.ignore_merges,
    )
    backend = tokenizers.Tokenizer(bpe)
    # The regexes split the raw text; ByteLevel then only respells the bytes of each piece.
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in pre.splits]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _split_merge(merge: str) -> tuple[str, str]:
    # As llama.cpp: the separator is the first space after the first character.
    cut = merge.index(" ", 1)
    return merge[:cut], merge[cut + 1 :]


def _sentencepiece_backend(tokens: list[str], meta: dict, add_space_prefix: bool) -> tokenizers.Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [_split_merge(m) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_scores(tokens, meta["tokenizer.ggml.scores"])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(bpe)
    # A normalizer (not Metaspace) so every run of text between special tokens gets its '▁',
    # which is what llama.cpp does.
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return backend


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens, best merged score first (transformers' generate_merges order, so the results agree)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores):
        local = [
            (token[:cut], token[cut:], score)
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        candidates.extend(local)
    candidates.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control/unknown tokens become special added tokens, user-defined ones plain added tokens,
    so their text in a prompt encodes to their single id (llama.cpp's parse_special)."""
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, k in zip(tokens, types)
        if k in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)


def _gguf_byte_level_bytes(token: str, token_type: int) -> bytes:
    # llama.cpp's converter stores control and user-defined tokens as plain text, the rest byte-spelled.
    if token_type in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
        return token.encode("utf-8")
    return byte_level_bytes(token)


def _gguf_sentencepiece_bytes(token: str, token_type: int) -> bytes:
    if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN):
        return token.encode("utf-8")
    return sentencepiece_bytes(token)


def _gguf_end_ids(meta: dict, tokens: list[str]) -> frozenset[int]:
    keys = (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    )
    ids = {meta[key] for key in keys if meta.get(key) is not None}
    wanted = set(_END_OF_GENERATION_TEXTS)
    ids.update(i for i, token in enumerate(tokens) if token in wanted)
    return frozenset(ids)


# ---------------------------------------------------------------------------------------------
# HF folder helpers


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _hf_decoder_kind(decoder: dict) -> tuple[str, bool]:
    """("byte_level" | "sentencepiece" | "other", strips one leading space) from the decoder JSON."""
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    names = {part.get("type") for part in parts}
    if "ByteLevel" in names:
        return "byte_level", False
    if names & {"ByteFallback", "Metaspace"} or any(
        p.get("content") == " " for p in parts if p.get("type") == "Replace"
    ):
        strip = any(p.get("type") == "Strip" and p.get("start", 0) > 0 for p in parts) or any(
            p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in parts
        )
        return "sentencepiece", strip
    return "other", False


def _hf_token_bytes(backend: tokenizers.Tokenizer, kind: str) -> list[bytes]:
    table = [b""] * backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if kind == "byte_level":
            table[token_id] = byte_level_bytes(token)
        elif kind == "sentencepiece":
            table[token_id] = token.encode("utf-8") if token_id in added else sentencepiece_bytes(token)
        else:
            # WordPiece and the like: a per-token decode is only an approximation of joined text.
            table[token_id] = backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
    return table


def _hf_end_ids(backend: tokenizers.Tokenizer, eos_token: str | None, generation: dict) -> frozenset[int]:
    ids = set()
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        ids.add(backend.token_to_id(eos_token))
    extra = generation.get("eos_token_id")
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return frozenset(ids)


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja if present, else tokenizer_config's chat_template (a string, or a list
    of named templates of which we take "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


def _adds_bos(backend: tokenizers.Tokenizer, bos_id: int) -> bool:
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id
