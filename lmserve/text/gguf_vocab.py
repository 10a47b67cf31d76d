"""A `tokenizers` backend built from a GGUF file's `tokenizer.ggml.*` metadata, as llama.cpp
tokenizes: the pre-tokenizer regexes per `tokenizer.ggml.pre`, byte-level or SentencePiece BPE,
special tokens, and the ids that end generation."""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from lmserve.text.token_bytes import byte_level_bytes, sentencepiece_bytes

# llama.cpp's token types (`tokenizer.ggml.token_type`).
(
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_CONTROL,
    TOKEN_USER_DEFINED,
    TOKEN_UNUSED,
    TOKEN_BYTE,
) = 1, 2, 3, 4, 5, 6

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
# Vocabularies


@dataclass
class GGUFVocab:
    """A GGUF tokenizer, ready to encode; what Tokenizer.from_gguf needs beyond the metadata."""

    backend: tokenizers.Tokenizer
    token_bytes_table: list[bytes]
    add_bos_default: bool  # llama.cpp's default when the file has no add_bos_token
    strip_leading_space: bool
    special_ids: frozenset[int] = frozenset()
    end_ids: frozenset[int] = frozenset()


def read_gguf_vocab(meta: dict) -> GGUFVocab:
    """Build from `tokenizer.ggml.*`: `gpt2` (byte-level BPE, split by the `tokenizer.ggml.pre`
    regexes) or `llama` (SentencePiece BPE with byte fallback; a '▁' is prefixed to every run of
    plain text, also after a special token, as llama.cpp and the legacy HF Llama tokenizer do)."""
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
    vocab.special_ids = frozenset(i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN))
    vocab.end_ids = _gguf_end_ids(meta, tokens)
    return vocab


def _gguf_byte_level_vocab(meta: dict, tokens: list[str], types: list[int]) -> GGUFVocab:
    pre = pre_tokenizer_for(str(meta.get("tokenizer.ggml.pre", "default")))
    backend = _byte_level_backend(tokens, meta["tokenizer.ggml.merges"], pre)
    table = [_gguf_byte_level_bytes(token, token_type) for token, token_type in zip(tokens, types)]
    return GGUFVocab(backend, table, add_bos_default=pre.add_bos, strip_leading_space=False)


def _gguf_sentencepiece_vocab(meta: dict, tokens: list[str], types: list[int]) -> GGUFVocab:
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend = _sentencepiece_backend(tokens, meta, add_space_prefix)
    table = [_gguf_sentencepiece_bytes(token, token_type) for token, token_type in zip(tokens, types)]
    return GGUFVocab(backend, table, add_bos_default=True, strip_leading_space=add_space_prefix)


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
