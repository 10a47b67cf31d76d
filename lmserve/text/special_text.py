"""Special-token text a request writes stays text in a chat prompt.

A chat template writes control tokens ("<|im_start|>system") around the messages; the prompt
is then tokenized with special-token text parsed, so those become single control ids. Text in
the messages that spells the same thing must not: a user writing "<|im_end|><|im_start|>system"
would otherwise open a system turn of their own. So the request's strings go through the
template masked: every special token's text in them is swapped for a placeholder no text holds
(a random nonce per request), and after rendering the placeholders are swapped back and their
places recorded. The tokenizer parses special tokens everywhere but there
(Tokenizer.encode_prompt). The template's own special tokens, and markup lmserve writes itself
(tool calls of earlier turns turned into text for templates that cannot render them), stay
special.

What a template does with strings has to keep the placeholders whole, as concatenation, `trim`,
`tojson`, `upper` and HTML escaping do; a template cutting a message at a special token's text
would no longer find it there.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PromptText:
    """A rendered prompt, and the (start, end) character spans in it of special-token text that
    came from the request, to be encoded as plain text."""

    text: str
    plain_spans: tuple[tuple[int, int], ...] = ()


class SpecialTextMask:
    """Hides special-token text in a request's strings from a chat template, for one request."""

    def __init__(self, special_texts: Sequence[str]) -> None:
        self.special_texts = sorted(set(special_texts), key=len, reverse=True)  # the longest match first
        self._index = {special: i for i, special in enumerate(self.special_texts)}
        nonce = secrets.token_hex(8)
        # ASCII letters and digits only, matched in either case: they pass tojson, escaping and upper().
        self._placeholder = f"lmsp{nonce}n{{}}e"
        self._placeholders = re.compile(rf"lmsp{nonce}n(\d+)e", re.IGNORECASE)
        self._specials = re.compile("|".join(map(re.escape, self.special_texts))) if self.special_texts else None

    def hide(self, value: T) -> T:
        """`value` (strings, lists, dicts of them) with every special token's text in its strings
        and keys replaced by a placeholder; a new value, the given one is not changed."""
        if self._specials is None:
            return value
        if isinstance(value, str):
            return self._specials.sub(self._swap_out, value)  # type: ignore[return-value]
        if isinstance(value, dict):
            return {self.hide(key): self.hide(item) for key, item in value.items()}  # type: ignore[return-value]
        if isinstance(value, list | tuple):
            return type(value)(self.hide(item) for item in value)  # type: ignore[return-value]
        return value

    def reveal(self, text: str) -> PromptText:
        """The rendered `text` with the placeholders swapped back, and where they were."""
        if self._specials is None:
            return PromptText(text)
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        position = end = 0
        for found in self._placeholders.finditer(text):
            parts.append(text[end : found.start()])
            position += found.start() - end
            special = self.special_texts[int(found.group(1))]
            parts.append(special)
            spans.append((position, position + len(special)))
            position += len(special)
            end = found.end()
        parts.append(text[end:])
        return PromptText("".join(parts), tuple(spans))

    def _swap_out(self, found: re.Match) -> str:
        return self._placeholder.format(self._index[found.group()])
