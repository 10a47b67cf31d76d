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


@dataclass(frozen=True, eq=False)
class SpecialTexts:
    """A vocabulary's special-token texts, numbered, and one pattern that finds any of them, the
    longest where several start at one place. Made once per tokenizer, which keeps it
    (Tokenizer.special_text_set): for vocabularies with many special tokens it is dear (102,801 of
    them: 3.3 s), and each request then only matches."""

    texts: tuple[str, ...]
    index: dict[str, int]
    pattern: re.Pattern | None  # None: no special text


def special_texts(texts: Sequence[str]) -> SpecialTexts:
    """SpecialTexts of `texts`. The pattern is a trie (the texts' shared beginnings written once,
    each branch trying longer texts before it ends): an alternation of every text took 4.7 s to
    compile for 102,801 texts and 217 ms a match over a 3,500-character message; the trie 3.3 s
    once and 0.14 ms (bench/RESULTS.md, forty-second sitting)."""
    unique = tuple(sorted({text for text in texts if text}))
    if not unique:
        return SpecialTexts(unique, {}, None)
    try:
        pattern = re.compile(_trie_pattern(unique))
    except (RecursionError, re.error):  # texts nested deeper than Python recurses: the alternation
        pattern = re.compile("|".join(re.escape(text) for text in sorted(unique, key=len, reverse=True)))
    return SpecialTexts(unique, {text: i for i, text in enumerate(unique)}, pattern)


def _trie_pattern(texts: Sequence[str]) -> str:
    trie: dict = {}
    for text in texts:
        node = trie
        for char in text:
            node = node.setdefault(char, {})
        node[""] = {}  # a text ends here

    def pattern(node: dict) -> str:
        literal = []
        while len(node) == 1 and "" not in node:  # a run with one way on: written out, not recursed
            [(char, node)] = node.items()
            literal.append(re.escape(char))
        branches = [re.escape(char) + pattern(child) for char, child in node.items() if char]
        if branches:
            either = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
            rest = f"(?:{either})?" if "" in node else either  # a longer text first, else end here
        else:
            rest = ""
        return "".join(literal) + rest

    return pattern(trie)


class SpecialTextMask:
    """Hides special-token text in a request's strings from a chat template, for one request."""

    def __init__(self, texts: SpecialTexts | Sequence[str]) -> None:
        specials = texts if isinstance(texts, SpecialTexts) else special_texts(texts)
        self.special_texts, self._index, self._specials = specials.texts, specials.index, specials.pattern
        nonce = secrets.token_hex(8)
        # ASCII letters and digits only, matched in either case: they pass tojson, escaping and upper().
        self._placeholder = f"lmsp{nonce}n{{}}e"
        self._placeholders = re.compile(rf"lmsp{nonce}n(\d+)e", re.IGNORECASE)

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
