"""Constrained decoding on the real default model, sampled at temperature 1.0 on its int4 path
(what `--dtype auto` serves it as): every output obeys."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmserve.request import FinishReason, GrammarSpec, SamplingParams
from lmserve.sampling.grammar import GrammarCompiler, GrammarError, choice_spec
from tests.helpers.real_engine import chat_ids, make_engine

NUM_SAMPLES = 32  # outputs per schema, sampled together (a step of 32 rows)

SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 20},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["person"],
    },
    "array with minItems": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "minItems": 2, "maxItems": 5}},
        "required": ["colors"],
    },
    "enums": {
        "type": "object",
        "properties": {"size": {"enum": ["small", "medium", "large"]},
                       "flavor": {"type": "string", "enum": ["vanilla", "chocolate", "mint chip"]}},
        "required": ["size", "flavor"],
    },
    "bounded numbers": {
        "type": "object",
        "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 10},
                       "celsius": {"type": "integer", "minimum": -40, "maximum": 50},
                       "score": {"type": "number", "minimum": 0, "maximum": 5}},
        "required": ["count", "celsius", "score"],
    },
    "patterned strings": {
        "type": "object",
        "properties": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{3}-[0-9]{4}$"},
                       "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
        "required": ["phone", "code"],
    },
    # bounds past 128 characters: chunks of 64, then a regex (xgrammar's own form took about a
    # second a row a step here, which would hold this test for most of an hour)
    "long bounded string": {
        "type": "object",
        "properties": {"summary": {"type": "string", "minLength": 130, "maxLength": 160}},
        "required": ["summary"],
    },
}


@pytest.fixture(scope="module")
def engine(int4_model):
    return make_engine(int4_model, kv_bytes=256 << 20, budget=512, max_seqs=64)


@pytest.fixture(scope="module")
def prompt(default_model):
    return chat_ids(default_model.tokenizer, "Reply with a JSON object describing something.")


def sample_texts(engine, prompt, spec: GrammarSpec, n: int, max_tokens: int = 200) -> list[str]:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, grammar=spec)
    outputs = engine.generate([prompt] * n, params)
    return [engine.tokenizer.decode(ids) for ids in outputs]


@pytest.mark.parametrize("name", SCHEMAS)
def test_sampled_json_always_validates_against_the_schema(engine, prompt, name):
    schema = SCHEMAS[name]
    texts = sample_texts(engine, prompt, GrammarSpec("json_schema", json.dumps(schema), strict=True), NUM_SAMPLES,
                         max_tokens=400)  # room for the longest string, even written one character a token
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1  # temperature 1.0 really sampled


def test_json_object_mode_gives_json_objects(engine, prompt):
    """Unbounded objects can outrun max_tokens: a finished output parses, a cut one used every token."""
    spec = GrammarSpec("json_object")
    params = SamplingParams(temperature=1.0, max_tokens=96, grammar=spec)
    for i in range(20):
        engine.add_request(f"object-{i}", prompt, params)
    texts, reasons, counts = {}, {}, {}
    while engine.has_unfinished:
        for output in engine.step().outputs:
            texts[output.request_id] = texts.get(output.request_id, "") + output.text_delta
            counts[output.request_id] = counts.get(output.request_id, 0) + len(output.new_token_ids)
            reasons[output.request_id] = output.finish_reason
    assert FinishReason.STOP in reasons.values()
    for rid, text in texts.items():
        if reasons[rid] == FinishReason.STOP:
            assert isinstance(json.loads(text), dict)
        else:
            assert reasons[rid] == FinishReason.LENGTH and text.startswith("{"), text
            assert counts[rid] == params.max_tokens, text


def test_regex_outputs_always_match(engine, prompt):
    pattern = r"(yes|no), [0-9]{2,3} [a-z]{1,12}"  # bounded: an unbounded tail samples to max_tokens
    for text in sample_texts(engine, prompt, GrammarSpec("regex", pattern), 20):
        assert re.fullmatch(pattern, text), text


def test_choice_outputs_are_one_of_the_choices(engine, prompt):
    choices = ["Paris", "London", "New \"York\"", "Zürich"]
    texts = sample_texts(engine, prompt, choice_spec(choices), 20)
    assert set(texts) <= set(choices)


def test_gbnf_outputs_always_match(engine, prompt):
    grammar = 'root ::= "The answer is " digit digit? "." \ndigit ::= [0-9]'
    for text in sample_texts(engine, prompt, GrammarSpec("ebnf", grammar), 20):
        assert re.fullmatch(r"The answer is [0-9]{1,2}\.", text), text


def test_constrained_and_free_requests_share_a_batch(prompt, default_model):
    """float32, whose greedy output does not depend on the batch it runs in."""
    engine = make_engine(default_model, max_seqs=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    solo = engine.generate([prompt], greedy)[0]
    engine.add_request("free", prompt, greedy)
    constrained = SamplingParams(temperature=1.0, max_tokens=24, grammar=GrammarSpec("regex", "[a-z ]+"))
    for i in range(4):
        engine.add_request(f"constrained-{i}", prompt, constrained)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for output in engine.step().outputs:
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    assert tokens["free"] == solo
    for i in range(4):
        assert re.fullmatch("[a-z ]+", engine.tokenizer.decode(tokens[f"constrained-{i}"]))


def test_grammar_complete_under_ignore_eos_finishes_the_request(engine, prompt):
    params = SamplingParams(temperature=1.0, max_tokens=50, ignore_eos=True, grammar=choice_spec(["yes", "no"]))
    [ids] = engine.generate([prompt], params)
    assert engine.tokenizer.decode(ids) in ("yes", "no")


def test_invalid_grammars_name_the_problem(default_model):
    compiler = GrammarCompiler(default_model.tokenizer, default_model.config.vocab_size)
    cases = [(GrammarSpec("json_schema", '{"type": "objec"}'), "objec"),
             (GrammarSpec("regex", "(a"), "parenthesis"),
             (GrammarSpec("ebnf", 'root ::= "a" | '), "EBNF")]
    for spec, needle in cases:
        with pytest.raises(GrammarError, match=needle):
            compiler.compile(spec)


def test_a_grammar_that_runs_out_of_tokens_ends_its_request_as_unsatisfiable(engine, prompt):
    # "a" is allowed, then nothing: only the runtime can find this dead end. The free request in
    # the same batch goes on.
    engine.add_request("dead-end", prompt, SamplingParams(temperature=1.0, max_tokens=8,
                                                          grammar=GrammarSpec("regex", r"a[^\s\S]")))
    engine.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    finished = {}
    while engine.has_unfinished:
        for output in engine.step().outputs:
            if output.finish_reason is not None:
                finished[output.request_id] = output
    assert finished["dead-end"].finish_reason == FinishReason.UNSATISFIABLE
    assert "allows no token after 1 tokens" in finished["dead-end"].error
    assert finished["free"].finish_reason == FinishReason.LENGTH
