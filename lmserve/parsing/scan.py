"""Small text helpers shared by the incremental parsers."""

from __future__ import annotations


def skip_space(text: str, pos: int) -> int:
    """Index of the first non-whitespace character at or after `pos` (len(text) if none)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def partial_tag_start(text: str, pos: int, tags: tuple[str, ...]) -> int:
    """Where the longest tail of text[pos:] that is a proper prefix of one of `tags` begins
    (len(text) if none): that tail must wait, it may yet become a tag."""
    longest = min(len(text) - pos, max(len(tag) for tag in tags) - 1)
    for length in range(longest, 0, -1):
        tail = text[len(text) - length :]
        if any(tag.startswith(tail) for tag in tags):
            return len(text) - length
    return len(text)


def hold_start(text: str, pos: int, tags: tuple[str, ...]) -> int:
    """Like partial_tag_start, also holding the whitespace before it: whitespace that ends up
    next to a tag is dropped, so it cannot be emitted before we know what follows."""
    start = partial_tag_start(text, pos, tags)
    while start > pos and text[start - 1].isspace():
        start -= 1
    return start


def is_prefix_of_any(text: str, tags: tuple[str, ...]) -> bool:
    """Whether `text` could still grow into one of `tags`."""
    return any(tag.startswith(text) for tag in tags)
