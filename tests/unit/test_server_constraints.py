"""Output constraints of a request -> one checked GrammarSpec (server/constraints.py)."""

from __future__ import annotations

import pytest
import xgrammar as xgr

from lmserve.sampling.grammar import GrammarCompiler
from lmserve.server.requests.constraints import grammar_spec
from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def compiler(default_tokenizer):
    return GrammarCompiler(default_tokenizer, default_tokenizer.vocab_size)


def accepts(compiler, spec, text: str) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    return matcher.accept_string(text) and matcher.is_completed()


def test_vllm_legacy_structural_tag_is_honoured(compiler):
    # vLLM's older response_format: {"type": "structural_tag", "structures": [...], "triggers": [...]}
    fmt = {"type": "structural_tag", "triggers": ["<f="],
           "structures": [{"begin": "<f=add>", "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                           "required": ["a"]}, "end": "</f>"}]}
    spec = grammar_spec(ChatCompletionRequest(messages=USER, response_format=fmt), compiler)
    assert accepts(compiler, spec, 'Sure. <f=add>{"a": 1}</f>')
    assert accepts(compiler, spec, "no call at all")
    assert not accepts(compiler, spec, '<f=add>{"a": "one"}</f>')


def test_structural_tag_without_format_or_structures_is_400(compiler):
    request = ChatCompletionRequest(messages=USER, response_format={"type": "structural_tag"})
    with pytest.raises(APIError) as error:
        grammar_spec(request, compiler)
    assert error.value.status_code == 400 and error.value.param == "response_format.format"
