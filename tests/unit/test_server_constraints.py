"""Output constraints of a request -> one checked GrammarSpec (server/requests/constraints.py)."""

from __future__ import annotations

import pytest

from lmserve.request import FinishReason
from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.requests.constraints import grammar_spec
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.grammar import accepts
from tests.helpers.server import chat, events, make_client

USER = [{"role": "user", "content": "hi"}]


def test_vllm_legacy_structural_tag_is_honoured(grammar_compiler):
    # vLLM's older response_format: {"type": "structural_tag", "structures": [...], "triggers": [...]}
    fmt = {"type": "structural_tag", "triggers": ["<f="],
           "structures": [{"begin": "<f=add>", "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                           "required": ["a"]}, "end": "</f>"}]}
    spec = grammar_spec(ChatCompletionRequest(messages=USER, response_format=fmt), grammar_compiler)
    assert accepts(grammar_compiler, spec, 'Sure. <f=add>{"a": 1}</f>')
    assert accepts(grammar_compiler, spec, "no call at all")
    assert not accepts(grammar_compiler, spec, '<f=add>{"a": "one"}</f>')


def test_structural_tag_without_format_or_structures_is_400(grammar_compiler):
    request = ChatCompletionRequest(messages=USER, response_format={"type": "structural_tag"})
    with pytest.raises(APIError) as error:
        grammar_spec(request, grammar_compiler)
    assert error.value.status_code == 400 and error.value.param == "response_format.format"


def test_a_choice_over_the_limit_is_400_naming_the_field_and_the_limit(grammar_compiler):
    request = ChatCompletionRequest(messages=USER, choice=[str(i) for i in range(2_049)])
    with pytest.raises(APIError) as error:
        grammar_spec(request, grammar_compiler)
    assert error.value.status_code == 400 and error.value.param == "choice"
    assert error.value.message.startswith("choice: ") and "(max_choices) is 2,048" in error.value.message


@pytest.mark.parametrize("fields, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format", "the keyword 'not'"),
    ({"json_schema": {"$ref": "#"}}, "json_schema", "no output can satisfy it"),
    ({"grammar": "root ::= root"}, "grammar", "no output can satisfy it"),
    ({"regex": r"[^\s\S]"}, "regex", "no output can satisfy it"),
    ({"regex": "x" * 20_000}, "regex", "(max_regex_chars) is 16,384"),
])
def test_refusals_through_the_app_are_400s(grammar_compiler, fields, param, message):
    client = make_client(FakeEngine(grammar=grammar_compiler))
    response = chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_constraint_that_runs_out_of_tokens_is_a_client_error(stream):
    client = make_client(FakeEngine(fail_after=1, fail_reason=FinishReason.UNSATISFIABLE))
    response = chat(client, stream=stream)
    if stream:  # the 200 is sent: the error comes as the last event
        error = events(response)[-2]["error"]  # before [DONE]
    else:
        assert response.status_code == 400
        error = response.json()["error"]
    assert error["code"] == "unsatisfiable_constraint" and error["type"] == "invalid_request_error"
