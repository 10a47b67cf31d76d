"""The grammar compiler's cache, on the default model's vocabulary."""

from __future__ import annotations

import json
import re

import pytest
import torch
import xgrammar as xgr

from lmserve.request import GrammarSpec
from lmserve.sampling import bounded_strings
from lmserve.sampling.bounded_strings import REGEX_BUDGET
from lmserve.sampling.grammar import DEFAULT_MAX_CACHE_BYTES, GrammarCompiler
from tests.helpers.grammar import MarkupTokenizer


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


def test_a_compile_takes_one_thread_while_the_model_decodes_and_the_models_threads_otherwise(
        default_tokenizer, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the model's threads, whatever this machine has
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "maxLength": 40}}}))
    compiled, threads = [], []
    for busy in (True, False):
        compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, busy=lambda: busy)
        pool = compiler._backend()[1]
        compile_in_pool = pool.compile
        monkeypatch.setattr(pool, "compile", lambda *args: threads.append(args[-1]) or compile_in_pool(*args))
        compiled.append(compiler.compile(spec).serialize_json())
        compiler.close()
    assert threads == [1, 2]
    assert compiled[0] == compiled[1]  # the same grammar, its masks included, on either count


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


def bounded(low: int, high: int | None) -> GrammarSpec:
    length = {"minLength": low} | ({} if high is None else {"maxLength": high})
    return GrammarSpec("json_schema", json.dumps({"type": "object", "required": ["s"],
                                                  "properties": {"s": {"type": "string", **length}}}))


def value(text: str) -> str:
    return '{"s": "' + text + '"}'


# (minLength, maxLength): one regex (up to 128), chunks of 64 then a regex for the rest (with a
# regex for a lower bound before them, or chunks for one over 128), lower bounds alone
@pytest.mark.parametrize("low, high", [(0, 6), (2, 40), (0, 128), (0, 129), (3, 300), (150, 1000), (0, 2000),
                                       (1, None), (130, None)])
def test_string_length_bounds_hold_exactly_in_every_form_the_grammar_takes(low, high):
    compiler = GrammarCompiler(MarkupTokenizer(), 259)
    spec = bounded(low, high)
    longest = high if high is not None else low + 50
    assert accepts(compiler, spec, value("a" * low))
    assert accepts(compiler, spec, value("a" * longest))
    assert accepts(compiler, spec, value("a" * (longest - 3) + '\\"\\u00e9\\n'))  # an escape is one character
    assert not accepts(compiler, spec, value("a" * (longest - 2) + "\x01b"))  # raw control characters are not JSON
    if low:
        assert not accepts(compiler, spec, value("a" * (low - 1)))
    if low >= 2:  # six bytes, one character
        assert not accepts(compiler, spec, value("a" * (low - 2) + "\\u00e9"))
    if high is not None:
        assert not accepts(compiler, spec, value("a" * (high + 1)))
        assert not accepts(compiler, spec, value("a" * (high - 1) + "\\\\\\n"))


def schema_text(*bounds: int) -> str:
    properties = {f"s{i}": {"type": "string", "maxLength": bound} for i, bound in enumerate(bounds)}
    return str(xgr.Grammar.from_json_schema(json.dumps({"type": "object", "properties": properties,
                                                        "required": list(properties)}), any_whitespace=False))


def kept_repetitions(mended: str) -> list[int]:
    """The properties whose bound stayed xgrammar's repetition."""
    return [int(n) for n in re.findall(r"root_prop_(\d+)_characters\{", mended)]


def test_bounds_become_regex_rules_until_the_budget_for_the_vocabulary_is_spent():
    # a regex state holds a precomputed mask (fast to fill, slow to compile), so a grammar writes at
    # most REGEX_BUDGET / vocabulary states; a chunked bound costs its chunk (once) and its last regex
    text = schema_text(100, 1000, 90, 70, 6, 2005)
    mended = bounded_strings.mend(text, REGEX_BUDGET // 512)
    assert kept_repetitions(mended) == [5]  # 100 + (64 + 104) + 90 + 70 + 6 = 434; then 64 + 21 more pass 512
    assert bounded_strings.XGRAMMAR_CHARACTER not in mended  # a repetition left takes JSON's characters
    names = [line.split(" ::= ")[0] for line in mended.splitlines()]
    assert len(names) == len(set(names))
    assert kept_repetitions(bounded_strings.mend(text, REGEX_BUDGET // 256)) == [1, 3, 5]  # half the budget
    assert bounded_strings.mend(schema_text(100, 100), REGEX_BUDGET // 100).count("Regex(") == 1  # one rule, twice


def test_a_tool_arguments_bounded_string_takes_json_characters_and_keeps_its_bound():
    # tool calls compile as structural tags, whose schemas xgrammar writes as it does response formats'
    compiler = GrammarCompiler(MarkupTokenizer(), 259)
    arguments = {"type": "object", "required": ["q"], "properties": {"q": {"type": "string", "maxLength": 5}}}
    spec = GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "tag", "begin": "<call>", "content": {"type": "json_schema", "json_schema": arguments},
        "end": "</call>"}}))
    assert accepts(compiler, spec, '<call>{"q": "ab\\"cd"}</call>')
    assert not accepts(compiler, spec, '<call>{"q": "abcdef"}</call>')
    assert not accepts(compiler, spec, '<call>{"q": "a\tb"}</call>')


def patterned(pattern: str) -> GrammarSpec:
    return GrammarSpec("json_schema", json.dumps({"type": "object", "required": ["s"],
                                                  "properties": {"s": {"type": "string", "pattern": pattern}}}))


@pytest.mark.parametrize("pattern, longest, outside", [
    ("^[a-z ]{0,300}$", 300, "A"),  # chunks, then a regex for the rest
    ("^[0-9]{130,200}$", 200, "x"),
    ("^.{0,300}$", 300, "\x01"),  # a JSON string's characters, as xgrammar writes a pattern's
    ("^.{130,}$", 180, "\x01"),  # no upper bound: chunks, then a regex of the rest and any more
])
def test_a_pattern_of_one_long_counted_atom_keeps_its_language(pattern, longest, outside):
    # xgrammar masks a regex count past 128 one token at a time (8.5 ms a row for [a-z ]{0,300})
    compiler = GrammarCompiler(MarkupTokenizer(), 259)
    spec, low = patterned(pattern), int(re.search(r"\{(\d+)", pattern).group(1))
    fill = "7" if "0-9" in pattern else "a"
    assert accepts(compiler, spec, value(fill * longest)) and accepts(compiler, spec, value(fill * max(low, 1)))
    assert not accepts(compiler, spec, value(fill * (longest - 1) + outside))
    if low > 1:
        assert not accepts(compiler, spec, value(fill * (low - 1)))
    if "," in pattern and not pattern.endswith(",}$"):
        assert not accepts(compiler, spec, value(fill * (longest + 1)))


def test_only_whole_patterns_of_one_long_counted_atom_are_rewritten():
    def rewritten(pattern: str) -> bool:
        schema = json.dumps({"type": "string", "pattern": pattern})
        text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
        return bounded_strings.mend(text, 259) != text
    assert rewritten("^[a-z ]{0,300}$") and rewritten("^\\d{200}$") and rewritten("^.{1,1000}$")
    assert rewritten("^.{130,}$")
    assert not rewritten("^[a-z ]{0,100}$")  # unrolled: fast already
    assert not rewritten("[a-z]{0,300}")  # matched anywhere in the string: left as it is
    assert not rewritten("^(ab){0,300}$") and not rewritten("^x[a-z]{0,300}$")  # more than one atom


def test_a_non_ascii_grammar_the_compiler_refuses_gets_its_parse_error_not_a_decoding_one():
    """The compiler's message quotes the input cut inside a character; the refusal still says
    where and why (with the cut character replaced)."""
    from lmserve.sampling.grammar import GrammarError

    with pytest.raises(GrammarError) as refused:
        GrammarCompiler(MarkupTokenizer(), 259).compile(GrammarSpec("ebnf", "èe"))
    assert str(refused.value).startswith("invalid ebnf: EBNF lexer error at line 1, column 1: Unexpected character")
    assert "codec" not in str(refused.value)
