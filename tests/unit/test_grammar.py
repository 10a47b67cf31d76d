"""The grammar compiler's cache, on the default model's vocabulary."""

from __future__ import annotations

import json

from lmserve.request import GrammarSpec
from lmserve.sampling.grammar import DEFAULT_CACHE_BYTES, GrammarCompiler


def schema(i: int) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))


def test_compiled_grammar_cache_is_bounded(default_tokenizer):
    # every request may bring a new schema or tool set: the cache must not grow with them
    limit = 4 * 2**20
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, cache_bytes=limit)
    for i in range(12):
        compiler.compile(schema(i))
    assert 0 < compiler.cache_bytes <= limit
    compiled = compiler.compile(schema(11))  # the newest is still served (and still compiles)
    assert compiled is not None


def test_the_cache_is_bounded_by_default(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)
    assert compiler._compiler.cache_limit_bytes == DEFAULT_CACHE_BYTES > 0  # xgrammar's own default: unbounded
