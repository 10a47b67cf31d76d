"""Output constraints of a request -> one checked GrammarSpec (server/requests/constraints.py)."""

from __future__ import annotations

import pytest

from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.requests.constraints import grammar_spec
from tests.helpers.grammar import accepts

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
