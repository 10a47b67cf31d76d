"""Text and token ids in requests -> checked token ids, with a 400 naming the offending field."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve.server.errors import bad_request

if TYPE_CHECKING:
    from lmserve.text.tokenizer import ChatTokenizer


def encode_text(tokenizer: ChatTokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
    """`text` as token ids; text that is not valid Unicode is a 400 naming `param`."""
    # JSON may carry lone surrogates ("\ud800"): valid in a Python str, not encodable as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode text: {exc.reason}", param=param) from exc
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def checked_token_ids(token_ids: list[int], vocab_size: int, param: str) -> list[int]:
    """The ids, or a 400 naming `param` if one is outside the vocabulary."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of range [0, {vocab_size})", param=param)
    return list(token_ids)
