"""What a Hugging Face tokenizer folder says beyond tokenizer.json's backend: tokenizer_config.json
and generation_config.json (special tokens, BOS, the ids that end generation), the chat template,
and each token's bytes as the decoder spells them (Tokenizer.from_hf_folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from lmserve.text.token_bytes import byte_level_bytes, sentencepiece_bytes


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def token_text(value: Any) -> str | None:
    """tokenizer_config spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def decoder_kind(backend: tokenizers.Tokenizer) -> tuple[str, bool]:
    """("byte_level" | "sentencepiece" | "other", strips one leading space) from the backend's decoder."""
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
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


def token_bytes_table(backend: tokenizers.Tokenizer, kind: str) -> list[bytes]:
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


def end_ids(backend: tokenizers.Tokenizer, eos_token: str | None, generation: dict) -> frozenset[int]:
    ids = set()
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        ids.add(backend.token_to_id(eos_token))
    extra = generation.get("eos_token_id")
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return frozenset(ids)


def chat_template(folder: Path, config: dict) -> str | None:
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


def adds_bos(backend: tokenizers.Tokenizer, bos_id: int) -> bool:
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id
