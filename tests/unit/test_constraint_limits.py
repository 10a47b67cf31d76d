"""Constraints refused before compiling (limits, keywords the compiler ignores), constraints no
output can satisfy, and compiles stopped at the timeout or when their request has gone."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import xgrammar as xgr

from lmserve.request import GrammarSpec
from lmserve.sampling.compile_pool import CompileAbandoned
from lmserve.sampling.constraint_limits import GrammarLimits
from lmserve.sampling.grammar import GrammarCompiler, GrammarError, choice_spec
from tests.helpers.grammar import accepts

SMALL = GrammarLimits(max_schema_bytes=200, max_schema_nodes=30, max_choices=3, max_choice_chars=12,
                      max_regex_chars=10, max_grammar_bytes=60, max_grammar_rules=2, max_structural_tags=2)
# Within the limits, minutes to compile: optional properties of one object cost about cubically.
HOSTILE = GrammarSpec("json_schema", json.dumps({"type": "object",
                                                 "properties": {f"p{i}": {"type": "string"} for i in range(1_500)}}))


@pytest.fixture(scope="module")
def small_compiler(default_tokenizer):
    return GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, limits=SMALL)


def tag(num_tags: int) -> str:
    tags = [{"type": "tag", "begin": f"<f{i}>", "end": "</f>", "content": {"type": "json_schema", "json_schema": {}}}
            for i in range(num_tags)]
    return json.dumps({"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f"], "tags": tags}})


@pytest.mark.parametrize("spec, message", [
    (GrammarSpec("json_schema", json.dumps({"enum": ["x" * 200]})), "it has 214 bytes; the limit (max_schema_bytes) is 200"),
    (GrammarSpec("json_schema", json.dumps({"enum": list(range(40))})),
     "it has more than 30 JSON values; the limit (max_schema_nodes) is 30"),
    (choice_spec(["a", "b", "c", "d"]), "it has 4 items; the limit (max_choices) is 3"),
    (choice_spec(["abcdefg", "hijklmn"]), "it has 14 characters in all; the limit (max_choice_chars) is 12"),
    (GrammarSpec("regex", "a{1,2}b{3,4}c"), "it has 13 characters; the limit (max_regex_chars) is 10"),
    (GrammarSpec("ebnf", 'root ::= "' + "x" * 60 + '"'), "it has 71 bytes; the limit (max_grammar_bytes) is 60"),
    (GrammarSpec("ebnf", 'root ::= a b\na ::= "a"\nb ::= "b"'), "it has 3 rules; the limit (max_grammar_rules) is 2"),
])
def test_each_limit_is_named_with_its_value(small_compiler, spec, message):
    with pytest.raises(GrammarError, match=f"^invalid .*: {re.escape(message)}$"):
        small_compiler.compile(spec)


def test_structural_tags_are_counted(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, limits=GrammarLimits(max_structural_tags=2))
    with pytest.raises(GrammarError, match=r"it has 3 tags; the limit \(max_structural_tags\) is 2"):
        compiler.compile(GrammarSpec("structural_tag", tag(3)))
    assert accepts(compiler, GrammarSpec("structural_tag", tag(2)), "text <f1>{}</f>")


def test_the_default_limits_let_real_sizes_through(grammar_compiler):
    labels = [f"label number {i}" for i in range(1_000)]
    assert accepts(grammar_compiler, choice_spec(labels), "label number 999")
    with pytest.raises(GrammarError, match=r"2,049 items; the limit \(max_choices\) is 2,048"):
        grammar_compiler.compile(choice_spec([str(i) for i in range(2_049)]))


@pytest.mark.parametrize("keyword, schema", [
    ("not", {"not": {"type": "integer"}}),
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    ("if", {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
    ("dependentSchemas", {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("dependencies", {"type": "object", "dependencies": {"a": ["b"]}}),
    ("contains", {"type": "array", "items": {"type": "array", "contains": {"const": 5}}}),
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("allOf", {"allOf": [{"type": "integer"}, {"minimum": 5}]}),
    ("unevaluatedProperties", {"type": "object", "unevaluatedProperties": False}),
    ("$dynamicRef", {"$defs": {"x": {"$dynamicRef": "#x"}}, "$ref": "#/$defs/x"}),
    ("maxLength", {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$", "maxLength": 3}}}),
    ("minLength", {"type": "string", "format": "email", "minLength": 8}),
])
def test_keywords_the_compiler_ignores_are_refused_by_name(grammar_compiler, keyword, schema):
    with pytest.raises(GrammarError, match=f"the keyword '{re.escape(keyword)}' .* is not supported"):
        grammar_compiler.compile(GrammarSpec("json_schema", json.dumps(schema)))


@pytest.mark.parametrize("schema, ignored_violation", [
    ({"not": {"type": "integer"}}, "1"),
    ({"type": "object", "properties": {"a": {}}, "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, "[1]"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    ({"allOf": [{"type": "integer"}, {"minimum": 5}]}, "1"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 2}, '"aaa"'),
    *[({"type": "string", "format": name, "maxLength": 1}, f'"{example}"') for name, example in [
        ("date-time", "2026-12-06T06:00:00Z"), ("time", "06:00:00Z"), ("date", "2026-12-06"), ("duration", "P1D"),
        ("email", "a@b.co"), ("hostname", "ab"), ("ipv4", "1.2.3.4"), ("ipv6", "::1"), ("uri", "http://a"),
        ("uri-reference", "/ab"), ("uuid", "12345678-1234-1234-1234-123456789abc"), ("uri-template", "ab"),
        ("json-pointer", "/ab"), ("relative-json-pointer", "0/a")]],
])
def test_xgrammar_does_ignore_them(default_tokenizer, grammar_compiler, schema, ignored_violation):
    # When an xgrammar upgrade starts enforcing one of these, it can come off the refused list.
    info = xgr.TokenizerInfo([default_tokenizer.token_bytes(i) for i in range(default_tokenizer.vocab_size)])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(schema), strict_mode=False)
    matcher = xgr.GrammarMatcher(compiled)
    assert matcher.accept_string(ignored_violation) and matcher.is_completed()


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"not": {"type": "string"}, "allOf": {"type": "integer"}}},  # property names
    {"type": "array", "uniqueItems": False},
    {"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}]}}},  # one schema: enforced
    {"enum": [{"not": 1}], "default": {"if": 2}},  # data, not schemas
    {"type": "string", "format": "color", "maxLength": 7},  # a format xgrammar does not know: the bound holds
])
def test_keywords_without_effect_or_outside_schema_positions_are_let_through(grammar_compiler, schema):
    grammar_compiler.compile(GrammarSpec("json_schema", json.dumps(schema)))


def test_a_tool_schema_with_an_ignored_keyword_is_refused(grammar_compiler):
    tagged = json.loads(tag(1))
    tagged["format"]["tags"][0]["content"]["json_schema"] = {"type": "object", "not": {"required": ["a"]}}
    with pytest.raises(GrammarError, match="the keyword 'not' \\(at /\\)"):
        grammar_compiler.compile(GrammarSpec("structural_tag", json.dumps(tagged)))


@pytest.mark.parametrize("spec", [
    GrammarSpec("json_schema", '{"$ref": "#"}'),
    GrammarSpec("ebnf", "root ::= root"),
    GrammarSpec("regex", r"[^\s\S]"),
])
def test_a_constraint_no_output_can_satisfy_is_refused(grammar_compiler, spec):
    with pytest.raises(GrammarError, match="no output can satisfy it"):
        grammar_compiler.compile(spec)


@pytest.fixture
def hurried_compiler(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size,
                               limits=GrammarLimits(compile_timeout_s=0.5))
    yield compiler
    compiler.close()


def test_a_compile_past_the_timeout_is_refused_and_its_worker_killed(hurried_compiler):
    with pytest.raises(GrammarError, match=r"did not compile within the limit \(compile_timeout_s\) of 0.5 s"):
        hurried_compiler.compile(HOSTILE)
    assert hurried_compiler.num_compile_workers == 0
    assert accepts(hurried_compiler, GrammarSpec("regex", "yes|no"), "no")  # a new worker takes over


def test_an_abandoned_compile_is_stopped(grammar_compiler):
    abandoned = threading.Event()
    abandoned.set()  # the client left before the compile could finish
    with pytest.raises(CompileAbandoned):
        grammar_compiler.compile(HOSTILE, abandoned)
    with pytest.raises(CompileAbandoned):  # and it was not cached as done
        grammar_compiler.compile(HOSTILE, abandoned)


def test_a_hostile_compile_does_not_hold_up_another(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)  # 2 workers, 10 s timeout
    abandoned, outcome = threading.Event(), []
    hostile = threading.Thread(target=lambda: outcome.append(_raised(compiler.compile, HOSTILE, abandoned)))
    hostile.start()
    try:
        assert accepts(compiler, GrammarSpec("regex", "yes|no"), "yes")  # on the other worker, meanwhile
        assert hostile.is_alive()  # the hostile compile is still running (it takes minutes)
    finally:
        abandoned.set()
        hostile.join()
        compiler.close()
    assert outcome == [CompileAbandoned]


def counting_compiles(compiler: GrammarCompiler) -> list[str]:
    """The kinds of the compiles `compiler` sends to its workers from now on."""
    pool, sent = compiler._backend()[1], []
    compile_in_pool = pool.compile
    pool.compile = lambda kind, *args: sent.append(kind) or compile_in_pool(kind, *args)
    return sent


def test_a_burst_of_requests_with_one_new_schema_compiles_it_once(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)
    try:
        sent = counting_compiles(compiler)
        spec = GrammarSpec("json_schema", json.dumps({"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "maxLength": 60}}}))
        invalid = GrammarSpec("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}')
        results = []
        burst = [threading.Thread(target=lambda s=s: results.append(_outcome(compiler.compile, s)))
                 for s in [spec] * 6 + [invalid] * 3]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        assert sorted(sent) == ["json_schema", "json_schema"]  # each spec once, though nine asked
        grammars = [result for result in results if not isinstance(result, str)]
        assert len(grammars) == 6 and all(grammar is grammars[0] for grammar in grammars)
        errors = [result for result in results if isinstance(result, str)]
        assert len(errors) == 3 and len(set(errors)) == 1 and "invalid json schema" in errors[0]
    finally:
        compiler.close()


def test_when_the_request_compiling_a_spec_goes_one_waiting_for_it_compiles_it(default_tokenizer):
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)
    try:
        sent = counting_compiles(compiler)
        first_gone, second_gone, outcomes = threading.Event(), threading.Event(), {}
        first = threading.Thread(target=lambda: outcomes.update(first=_raised(compiler.compile, HOSTILE,
                                                                              first_gone)))
        first.start()
        _until(lambda: len(sent) == 1)  # its compile runs (for minutes)
        second = threading.Thread(target=lambda: outcomes.update(second=_raised(compiler.compile, HOSTILE,
                                                                                second_gone)))
        second.start()
        time.sleep(0.3)
        assert len(sent) == 1 and second.is_alive()  # it waits for the first one's compile
        first_gone.set()
        first.join()
        _until(lambda: len(sent) == 2)  # the second request compiles it now
        assert second.is_alive() and outcomes == {"first": CompileAbandoned}
        second_gone.set()
        second.join()
        assert outcomes == {"first": CompileAbandoned, "second": CompileAbandoned}
    finally:
        compiler.close()


def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _outcome(function, *args):
    """What `function` returned, or the message of the GrammarError it raised."""
    try:
        return function(*args)
    except GrammarError as exc:
        return str(exc)


def _raised(function, *args):
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return type(exc)
    return None


def test_idle_compile_workers_are_stopped_and_a_new_one_starts_when_needed(default_tokenizer):
    # an idle worker holds ~90 MiB of its own, more after a large compile
    compiler = GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size, idle_worker_s=0.3)
    try:
        assert accepts(compiler, GrammarSpec("regex", "yes|no"), "yes")
        assert compiler.num_compile_workers == 1
        deadline = time.monotonic() + 10
        while compiler.num_compile_workers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert compiler.num_compile_workers == 0
        assert accepts(compiler, GrammarSpec("regex", "maybe|no"), "maybe")  # a new worker compiles it
        assert compiler.num_compile_workers == 1
    finally:
        compiler.close()
