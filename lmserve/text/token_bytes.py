"""The bytes a vocabulary token stands for, in the two spellings vocabularies use."""

from __future__ import annotations

import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")



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
