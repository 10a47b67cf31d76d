"""Checking what a compiled grammar lets through."""

from __future__ import annotations

import xgrammar as xgr


def accepts(compiler, spec, text: str) -> bool:
    """Whether the grammar accepts `text` as a complete output."""
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    return matcher.accept_string(text) and matcher.is_completed()


class MarkupTokenizer:
    """Bytes 0-255 are ids 3-258; 0 is </s>, 1 an ordinary control token, 2 Mistral's [TOOL_CALLS]."""

    vocab_size = 259
    eos_token_ids = (0,)
    specials = [b"</s>", b"<ctrl>", b"[TOOL_CALLS]"]

    def token_bytes(self, token_id: int) -> bytes:
        return self.specials[token_id] if token_id < 3 else bytes([token_id - 3])

    def is_special(self, token_id: int) -> bool:
        return token_id < 3
