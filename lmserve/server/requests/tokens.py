"""Text and token ids in requests -> checked token ids, with a 400 naming the offending field."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve.server.errors import bad_request

if TYPE_CHECKING:
    from lmserve.text.special_text import PromptText
    from lmserve.text.tokenizer import ChatTokenizer


def encode_text(tokenizer: ChatTokenizer, text: str, add_special_tokens: bool, param: str,
                max_num_tokens: int | None = None, parse_special: bool = True) -> list[int]:
    """`text` as token ids; text that is not valid Unicode is a 400 naming `param`, and so is
    text too long to make at most `max_num_tokens` tokens: refused by its length before it is
    tokenized (tokenizing megabytes takes seconds) where the tokenizer bounds its token count.
    `parse_special` false: special-token text is plain text."""
    _check_length(tokenizer, text, param, max_num_tokens)
    if not parse_special:
        return tokenizer.encode_plain(text, add_special_tokens=add_special_tokens)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def encode_prompt(tokenizer: ChatTokenizer, prompt: PromptText, param: str,
                  max_num_tokens: int | None = None) -> list[int]:
    """A rendered chat prompt as token ids, its request's own special-token text plain (see
    ChatTokenizer.encode_prompt); refused as encode_text refuses text."""
    _check_length(tokenizer, prompt.text, param, max_num_tokens)
    return tokenizer.encode_prompt(prompt.text, prompt.plain_spans)


def _check_length(tokenizer: ChatTokenizer, text: str, param: str, max_num_tokens: int | None) -> None:
    # JSON may carry lone surrogates ("\ud800"): valid in a Python str, not encodable as UTF-8.
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode text: {exc.reason}", param=param) from exc
    min_num_tokens = tokenizer.min_num_tokens(data) if max_num_tokens is not None else 0
    if max_num_tokens is not None and min_num_tokens > max_num_tokens:
        raise bad_request(f"'{param}' is too long: its {len(data)} bytes of text make at least {min_num_tokens} "
                          f"tokens, and at most {max_num_tokens} fit this model's context. Please reduce the "
                          "length of the input.", param=param, code="context_length_exceeded")


def checked_token_ids(token_ids: list[int], vocab_size: int, param: str) -> list[int]:
    """The ids, or a 400 naming `param` if one is outside the vocabulary."""
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of range [0, {vocab_size})", param=param)
    return list(token_ids)
