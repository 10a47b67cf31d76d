"""Checking what a compiled grammar lets through."""

from __future__ import annotations

import xgrammar as xgr


def accepts(compiler, spec, text: str) -> bool:
    """Whether the grammar accepts `text` as a complete output."""
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    return matcher.accept_string(text) and matcher.is_completed()
