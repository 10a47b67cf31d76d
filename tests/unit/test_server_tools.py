"""Tool calling on the request side (plan, grammar, prompt), the reply parser chain, and replies
through the server."""

from __future__ import annotations

import json
import random

import pytest

from lmserve.parsing import HERMES_SYNTAX, MISTRAL_SYNTAX, HermesToolParser, ReplyFormat, ReplyParser, parse_reply
from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.requests.chat_prompt import render_chat, reply_format
from lmserve.server.requests.tools import plan_tools
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine
from tests.helpers.grammar import accepts
from tests.helpers.server import chat, chat_reply, make_client
from tests.helpers.tool_streams import chunkings, streamed_reply

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
ECHO = {"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
USER = [{"role": "user", "content": "hi"}]
MISTRAL_TOKENIZER = ByteTokenizer(chat_template="{{ '[TOOL_CALLS]' }}{{ tools }}")  # only the template is read


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=fields.pop("messages", USER), **fields)


def test_no_tools_or_none_means_no_plan(default_tokenizer):
    assert plan_tools(request(), default_tokenizer) is None
    assert plan_tools(request(tools=[ADD], tool_choice="none"), default_tokenizer) is None


@pytest.mark.parametrize(("fields", "param", "needle"), [
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice", "mul"),
    ({"tools": [ADD], "tool_choice": {"type": "function"}}, "tool_choice", "name"),
    ({"tools": [ADD, ADD]}, "tools[1].function.name", "two tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "retrieval"),
    ({"tools": [{"type": "function"}]}, "tools[0].function", "function"),
])
def test_bad_tool_requests_are_400_naming_the_field(default_tokenizer, fields, param, needle):
    with pytest.raises(APIError) as error:
        plan_tools(request(**fields), default_tokenizer)
    assert error.value.status_code == 400 and error.value.param == param and needle in error.value.message


def test_required_grammar_accepts_only_calls_to_offered_tools(default_tokenizer, grammar_compiler):
    spec = plan_tools(request(tools=[ADD, ECHO], tool_choice="required"), default_tokenizer).grammar()
    add = HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}')])
    two = HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}'), ("echo", '{"text": "x"}')])
    assert accepts(grammar_compiler, spec, add) and accepts(grammar_compiler, spec, two)
    assert not accepts(grammar_compiler, spec, "Sure! " + add)  # required: no text
    assert not accepts(grammar_compiler, spec, HERMES_SYNTAX.render([("mul", '{"a": 1, "b": 2}')]))
    assert not accepts(grammar_compiler, spec, HERMES_SYNTAX.render([("add", '{"a": "one", "b": 2}')]))
    assert not accepts(grammar_compiler, spec, "")


def test_single_call_and_named_grammars(default_tokenizer, grammar_compiler):
    two = HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}'), ("add", '{"a": 3, "b": 4}')])
    one_only = plan_tools(request(tools=[ADD, ECHO], tool_choice="required", parallel_tool_calls=False),
                          default_tokenizer).grammar()
    assert not accepts(grammar_compiler, one_only, two)
    named = plan_tools(request(tools=[ADD, ECHO], tool_choice={"type": "function", "function": {"name": "echo"}}),
                       default_tokenizer).grammar()
    assert accepts(grammar_compiler, named, HERMES_SYNTAX.render([("echo", '{"text": "hi"}')]))
    assert not accepts(grammar_compiler, named, HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}')]))


def test_auto_grammar_allows_text_but_checks_calls(default_tokenizer, grammar_compiler):
    spec = plan_tools(request(tools=[ADD]), default_tokenizer).grammar()
    assert accepts(grammar_compiler, spec, "No tools needed, the answer is 3.")
    assert accepts(grammar_compiler, spec, "Let me add. " + HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}')]))
    assert not accepts(grammar_compiler, spec, "Let me add. " + HERMES_SYNTAX.render([("add", '{"a": 1}')]))


@pytest.mark.parametrize("off_format", [
    '<tool_call>{"name": "add2", "arguments": {"x": 1}}</tool_call>',  # no newline after the tag
    '<tool_call> {"name":"add", "arguments": {}}',
    '<tool_call>\n{"name": "add2", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
])
def test_auto_grammar_constrains_everything_the_parser_reads_as_a_call(default_tokenizer, grammar_compiler,
                                                                        off_format):
    """Seen in a sampled reply: a call written slightly off the format (no newline after the tag)
    slipped past a trigger longer than the parser's opening tag, and was parsed as a call to an
    unknown tool. The grammar must take over at the very tag the parser opens calls at."""
    plan = plan_tools(request(tools=[ADD]), default_tokenizer)
    parsed = parse_reply(ReplyFormat(tool_parser=plan.parser), "Sure. " + off_format)
    assert parsed.tool_calls  # the parser reads these as calls...
    assert not accepts(grammar_compiler, plan.grammar(), "Sure. " + off_format)  # ...so the grammar forbids them


def test_mistral_auto_grammar_takes_over_at_the_parsers_tag(grammar_compiler):
    plan = plan_tools(request(tools=[ADD]), MISTRAL_TOKENIZER)
    off_format = 'Sure. [TOOL_CALLS] [{"name": "add2", "arguments": {"x": 1}}]'  # a space after the tag
    assert parse_reply(ReplyFormat(tool_parser=plan.parser), off_format).tool_calls
    assert not accepts(grammar_compiler, plan.grammar(), off_format)
    call = MISTRAL_SYNTAX.render([("add", '{"a": 1, "b": 2}')])
    assert accepts(grammar_compiler, plan.grammar(), "Sure. " + call)


def test_prompt_of_a_template_without_tools_teaches_hermes_calls(default_tokenizer):
    plan = plan_tools(request(tools=[ADD]), default_tokenizer)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    body = request(messages=[*USER, {"role": "assistant", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "call_1", "content": "5"}])
    text = render_chat(body, default_tokenizer, plan).text
    assert text.startswith("<|im_start|>system\n") and '"name": "add"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text
    assert "<tool_response>\n5\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert reply_format(default_tokenizer, text, plan).tool_parser is plan.parser


def test_streamed_reply_equals_whole_reply_for_any_chunking():
    calls = HERMES_SYNTAX.render([("add", '{"a": 1, "b": {"c": "}</tool_call>"}}')])
    text = "<think>\nadd them\n</think>\n\nI'll call add. " + calls
    plan = plan_tools(request(tools=[ADD]), ByteTokenizer(chat_template="{{ messages }}"))
    fmt = ReplyFormat(tool_parser=plan.parser, reasoning=True)
    whole = parse_reply(fmt, text)
    assert whole.reasoning == "add them" and whole.content == "I'll call add."
    assert [(c.name, json.loads(c.arguments)) for c in whole.tool_calls] == [("add", {"a": 1, "b": {"c": "}</tool_call>"}})]
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), 8))
        parser = ReplyParser(fmt)
        bounds = list(zip([0, *cuts], [*cuts, len(text)]))
        deltas = [parser.feed(text[i:j], final=(i, j) == bounds[-1]) for i, j in bounds]
        assert "".join(d.content for d in deltas) == whole.content
        assert "".join(d.reasoning for d in deltas) == whole.reasoning
        arguments = "".join(c.arguments for d in deltas for c in d.tool_calls)
        assert arguments == whole.tool_calls[0].arguments and parser.num_tool_calls == 1


def test_mistral_template_selects_mistral_calls():
    plan = plan_tools(request(tools=[ADD]), MISTRAL_TOKENIZER)
    assert plan.syntax == MISTRAL_SYNTAX and plan.needs_special_tokens


def test_reply_format_knows_the_offered_tools(default_tokenizer):
    plan = plan_tools(request(tools=[ADD, ECHO]), default_tokenizer)
    fmt = reply_format(default_tokenizer, "", plan)
    assert fmt.tool_names == {"add", "echo"}
    call = parse_reply(fmt, '{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert [(c.name, c.arguments) for c in call.tool_calls] == [("add", '{"a": 1, "b": 2}')]
    assert call.content is None
    assert parse_reply(fmt, '{"name": "mul", "arguments": {}}').content == '{"name": "mul", "arguments": {}}'


def reply_through_server(reply: str, grammar_compiler, stream: bool, **fields) -> tuple:
    """What the server answers a chat offering ADD and ECHO when the model replies `reply`."""
    client = make_client(FakeEngine(reply=reply, max_model_len=4096, grammar=grammar_compiler))
    return chat_reply(chat(client, stream=stream, tools=[ADD, ECHO], **fields), stream)


ADD_CALL = '{"name": "add", "arguments": {"a": 1, "b": 2}}'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("reply", "max_tokens", "expected"), [
    # a bare JSON call, as Qwen2.5 writes one under "auto", is a call
    (ADD_CALL, None, (None, [("add", '{"a": 1, "b": 2}')], "tool_calls")),
    ('{"name": "mul", "arguments": {"a": 1}}', None, ('{"name": "mul", "arguments": {"a": 1}}', [], "stop")),
    # cut by max_tokens inside the second call: the first stands, the second is not content
    (HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}')]) + '\n<tool_call>\n{"name": "echo", "arguments": {"te',
     len(HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}')]) + '\n<tool_call>\n{"name": "echo", "arguments":'),
     (None, [("add", '{"a": 1, "b": 2}')], "length")),
    ("Let me add.\n<tool_call>", len("Let me add.\n<tool"), ("Let me add.", [], "length")),
])
def test_replies_through_the_server(grammar_compiler, stream, reply, max_tokens, expected):
    fields = {"max_tokens": max_tokens} if max_tokens is not None else {}
    assert reply_through_server(reply, grammar_compiler, stream, **fields) == expected


def test_bare_json_call_after_reasoning():
    """Untagged calls are read where the reply starts after the thinking (Qwen3, DeepSeek-R1)."""
    fmt = ReplyFormat(tool_parser=HermesToolParser, reasoning=True, tool_names=frozenset({"add"}))
    text = '<think>\nThe user wants a sum.\n</think>\n\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
    expected = ("The user wants a sum.", "", [("add", '{"a": 1, "b": 2}')])
    for cuts in chunkings(text, num_random=10):
        assert streamed_reply(fmt, text, cuts) == expected, cuts
    whole = parse_reply(fmt, text)
    assert (whole.reasoning, whole.content, [(c.name, c.arguments) for c in whole.tool_calls]) == (
        "The user wants a sum.", None, [("add", '{"a": 1, "b": 2}')])
