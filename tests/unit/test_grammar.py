"""The grammar compiler's cache, on the default model's vocabulary."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from lmserve.request import GrammarSpec
from lmserve.sampling.grammar import DEFAULT_MAX_CACHE_BYTES, GrammarCompiler


def schema(i: int) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))


def test_compiled_grammar_cache_is_bounded(default_tokenizer):
    # every request may bring a new schema or tool set: the cache must not grow with them
    limit = 16 * 2**10
    unbounded = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, max_cache_bytes=2**40)
    bounded = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, max_cache_bytes=limit)
    for i in range(60):
        unbounded.compile(schema(i))
        bounded.compile(schema(i))
    assert unbounded.cache_bytes > 8 * limit  # without eviction these schemas take ~230 KB
    assert 0 < bounded.cache_bytes <= limit


def test_the_cache_is_bounded_by_default(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)
    assert compiler.max_cache_bytes == DEFAULT_MAX_CACHE_BYTES > 0  # xgrammar's own default: unbounded


class MarkupTokenizer:
    """Bytes 0-255 are ids 3-258; 0 is </s>, 1 an ordinary control token, 2 Mistral's [TOOL_CALLS]."""

    vocab_size = 259
    eos_token_ids = (0,)
    specials = [b"</s>", b"<ctrl>", b"[TOOL_CALLS]"]

    def token_bytes(self, token_id: int) -> bytes:
        return self.specials[token_id] if token_id < 3 else bytes([token_id - 3])

    def is_special(self, token_id: int) -> bool:
        return token_id < 3


def test_markup_special_tokens_can_be_written_by_a_grammar_others_cannot():
    compiler = GrammarCompiler(MarkupTokenizer(), 259)
    calls = xgr.GrammarMatcher(compiler.compile(GrammarSpec("regex", r"\[TOOL_CALLS\]x")))
    assert calls.accept_token(2) and calls.accept_token(ord("x") + 3)
    text = xgr.GrammarMatcher(compiler.compile(GrammarSpec("regex", "<ctrl>")))
    assert not text.accept_token(1)  # an ordinary control token never stands in for its text


BOUNDED = {"type": "object", "required": ["colors", "zip"],
           "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2},
                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "name": {"type": "string", "minLength": 2}}}


def accepts(compiler: GrammarCompiler, spec: GrammarSpec, text: str) -> bool:
    """Whether `text`, one byte a token, is a whole output of `spec`."""
    matcher = xgr.GrammarMatcher(compiler.compile(spec), terminate_without_stop_token=True)
    return all(matcher.accept_token(byte + 3) for byte in text.encode()) and matcher.is_terminated()


@pytest.mark.parametrize("text, valid", [
    ('{"colors": ["red", "blue"], "zip": "12345"}', True),
    ('{"colors": ["a\\"b", "\\u00e9\\n"], "zip": "12345", "name": "Al"}', True),  # escapes, one character each
    ('{"colors": ["a\x00b", "blue"], "zip": "12345"}', False),  # a raw control character is not JSON
    ('{"colors": ["a\tb", "blue"], "zip": "12345"}', False),
    ('{"colors": ["red", "blue"], "zip": "12345", "name": "A\x1f"}', False),
    ('{"colors": ["toolong", "blue"], "zip": "12345"}', False),  # the bounds still hold
    ('{"colors": ["red"], "zip": "12345"}', False),
    ('{"colors": ["red", "blue"], "zip": "1234"}', False),
])
def test_length_bounded_strings_take_json_string_characters_only(text, valid):
    # xgrammar alone lets raw control characters into strings with minLength/maxLength (a sampled
    # "\x00" made invalid JSON) and no escapes; json.loads is the judge of what is JSON
    compiler = GrammarCompiler(MarkupTokenizer(), 259)
    spec = GrammarSpec("json_schema", json.dumps(BOUNDED), strict=True)
    assert accepts(compiler, spec, text) == valid
    if valid:
        json.loads(text)
