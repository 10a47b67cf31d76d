"""Tool calling with real models' chat templates (tests/fixtures/chat_templates; sources in its
README): the prompt each renders for a conversation with tools, the conversation carried on
with the call ids the server hands out, and each model's typical replies read as the right
message and finish_reason, through the server (JSON and SSE) and on every chunking."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmserve.parsing import HermesToolParser, Llama3JsonToolParser, MistralToolParser, ToolParser, parse_reply
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.requests.chat_prompt import render_chat, reply_format
from lmserve.server.requests.tools import plan_tools
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import chat, chat_reply, make_client
from tests.helpers.tool_streams import chunkings, streamed_reply

FIXTURES = Path(__file__).parents[1] / "fixtures" / "chat_templates"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "description": "IANA name"}},
                   "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
QUESTION = {"role": "user", "content": "What's the weather in Paris, and the time there?"}


@dataclass(frozen=True)
class Model:
    template: str  # file in FIXTURES
    bos_token: str | None
    eos_token: str
    end_of_turn: str  # what the template writes after an assistant turn
    parser: type[ToolParser]


KEEP = "keep"  # SmolLM2: the default tokenizer's own special tokens
MODELS = {
    "qwen2.5": Model("Qwen-Qwen2.5-7B-Instruct.jinja", None, "<|im_end|>", "<|im_end|>", HermesToolParser),
    "llama3.1": Model("meta-llama-Llama-3.1-8B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                      Llama3JsonToolParser),
    "llama3.2": Model("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                      Llama3JsonToolParser),
    "mistral-v0.3": Model("mistralai-Mistral-7B-Instruct-v0.3.jinja", "<s>", "</s>", "</s>", MistralToolParser),
    "mistral-nemo": Model("mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", "</s>", MistralToolParser),
    "hermes-2-pro-3": Model("NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja", "<|begin_of_text|>",
                            "<|im_end|>", "<|im_end|>", HermesToolParser),
    "smollm2": Model("HuggingFaceTB-SmolLM2-135M-Instruct.jinja", KEEP, KEEP, "<|im_end|>", HermesToolParser),
}


@pytest.fixture(scope="module")
def tokenizers(default_tokenizer):
    """Per model: the default model's vocabulary with the model's chat template and special
    tokens (only the template and those texts matter here)."""
    result = {}
    for name, model in MODELS.items():
        tokens = {} if model.eos_token == KEEP else {"bos_token": model.bos_token, "eos_token": model.eos_token}
        result[name] = dataclasses.replace(default_tokenizer, chat_template=(FIXTURES / model.template).read_text(),
                                           **tokens)
    return result


# --- the prompt ----------------------------------------------------------------------------------


def call_message(call_id: str) -> dict:
    function = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    call = {"id": call_id, "type": "function", "function": function}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def render(tokenizer, messages: list[dict]) -> str:
    request = ChatCompletionRequest(messages=messages, tools=TOOLS)
    return render_chat(request, tokenizer, plan_tools(request, tokenizer)).text


@pytest.mark.parametrize("name", MODELS)
def test_template_renders_a_conversation_with_tools(tokenizers, name):
    """The tools and the tool result are in the prompt, and the call the template writes for an
    earlier assistant turn reads back as that call: what the model was shown is what we parse."""
    tokenizer, model = tokenizers[name], MODELS[name]
    request = ChatCompletionRequest(messages=[QUESTION], tools=TOOLS)
    plan = plan_tools(request, tokenizer)
    assert plan.parser is model.parser
    call = call_message("abcDEF123")  # 9 alphanumerics: Mistral's templates take no other id
    result = {"role": "tool", "tool_call_id": "abcDEF123", "content": "18 C, sunny"}
    prompt = render(tokenizer, [QUESTION, call, result])
    assert "Current weather in a city" in prompt and "Local time in a timezone" in prompt
    assert "18 C, sunny" in prompt
    asking = render(tokenizer, [QUESTION])
    answered = render(tokenizer, [QUESTION, call])
    assert answered.startswith(asking)
    turn = answered[len(asking):].split(model.end_of_turn)[0]
    reply = parse_reply(reply_format(tokenizer, asking, plan), turn)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert reply.content is None


@pytest.mark.parametrize("name", MODELS)
def test_conversation_goes_on_with_the_ids_the_server_gave(tokenizers, grammar_compiler, name):
    engine = FakeEngine(reply=REPLIES[name][0].text, max_model_len=8192, tokenizer=tokenizers[name],
                        grammar=grammar_compiler)
    client = make_client(engine)
    first = chat(client, messages=[QUESTION], tools=TOOLS).json()["choices"][0]["message"]
    assert first["tool_calls"]
    results = [{"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"} for call in first["tool_calls"]]
    second = chat(client, messages=[QUESTION, first, *results], tools=TOOLS)
    assert second.status_code == 200, second.text
    prompt = tokenizers[name].decode(engine.calls[-1][1], skip_special_tokens=False)
    assert prompt == render(tokenizers[name], [QUESTION, first, *results]) and "18 C, sunny" in prompt


# --- the replies ---------------------------------------------------------------------------------

PARIS = ("get_weather", '{"city": "Paris"}')
CLOCK = ("get_time", '{"timezone": "Europe/Paris"}')


@dataclass(frozen=True)
class Reply:
    text: str  # what the model writes
    content: str | None
    calls: list[tuple[str, str]]
    finish_reason: str
    cut: str | None = None  # max_tokens stops the model here (a prefix of text, at a token's end)


ANSWER = Reply("It is 18 °C and sunny in Paris.", "It is 18 °C and sunny in Paris.", [], "stop")

QWEN25_REPLIES = [
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [PARIS],
          "tool_calls"),
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
          None, [PARIS, CLOCK], "tool_calls"),
    Reply('Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
          "Let me look that up.", [PARIS], "tool_calls"),
    # under "auto", Qwen2.5 often leaves out its tags
    Reply('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS], "tool_calls"),
    Reply('{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
          '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', None, [PARIS, CLOCK], "tool_calls"),
    Reply('{"name": "get_forecast", "arguments": {"city": "Paris"}}',
          '{"name": "get_forecast", "arguments": {"city": "Paris"}}', [], "stop"),
    ANSWER,
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
          None, [PARIS], "length",
          cut='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments'),
]

LLAMA3_REPLIES = [
    Reply('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS], "tool_calls"),
    Reply('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS], "tool_calls"),
    Reply('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS], "tool_calls"),
    Reply('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS],
          "tool_calls"),
    Reply('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
          '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None, [PARIS, CLOCK], "tool_calls"),
    Reply('{"name": "get_forecast", "parameters": {"city": "Paris"}}',
          '{"name": "get_forecast", "parameters": {"city": "Paris"}}', [], "stop"),
    Reply('{"temperature": 18, "unit": "C"}', '{"temperature": 18, "unit": "C"}', [], "stop"),
    ANSWER,
    Reply('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
          '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}', None, [PARIS], "length",
          cut='{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters'),
]

MISTRAL_V3_REPLIES = [
    Reply('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS], "tool_calls"),
    Reply('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
          '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', None, [PARIS, CLOCK], "tool_calls"),
    Reply('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS], "tool_calls"),
    ANSWER,
    Reply('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
          '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', None, [PARIS], "length",
          cut='[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time'),
]

MISTRAL_NEMO_REPLIES = [
    Reply('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS], "tool_calls"),
    Reply('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
          '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]', None, [PARIS, CLOCK], "tool_calls"),
    ANSWER,
    Reply('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [], "length",
          cut='[TOOL_CALLS][{"name": "get_weather", "arguments'),
]

HERMES_REPLIES = [
    # Hermes 2 Pro writes the arguments first, as its model card shows
    Reply('<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>', None, [PARIS],
          "tool_calls"),
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
          None, [PARIS, CLOCK], "tool_calls"),
    Reply('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS], "tool_calls"),
    ANSWER,
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>',
          None, [PARIS], "length",
          cut='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name'),
]

SMOLLM2_REPLIES = [
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [PARIS],
          "tool_calls"),
    Reply('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [PARIS], "tool_calls"),
    Reply('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [PARIS], "tool_calls"),
    ANSWER,
    # its vocabulary has no <tool_call> token: max_tokens can stop inside the tag
    Reply('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
          "I will check.", [], "length", cut="I will check.\n<tool_"),
    Reply('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
          None, [("get_weather", '{"city')], "length",
          cut='<tool_call>\n{"name": "get_weather", "arguments": {"city'),
]

REPLIES = {
    "qwen2.5": QWEN25_REPLIES,
    "llama3.1": LLAMA3_REPLIES,
    "llama3.2": LLAMA3_REPLIES,
    "mistral-v0.3": MISTRAL_V3_REPLIES,
    "mistral-nemo": MISTRAL_NEMO_REPLIES,
    "hermes-2-pro-3": HERMES_REPLIES,
    "smollm2": SMOLLM2_REPLIES,
}
CASES = [pytest.param(name, reply, id=f"{name}-{i}") for name, replies in REPLIES.items()
         for i, reply in enumerate(replies)]


def max_tokens_for(tokenizer, reply: Reply) -> int | None:
    """The max_tokens that stops the model at reply.cut (None: not cut)."""
    if reply.cut is None:
        return None
    ids = tokenizer.encode(reply.text, add_special_tokens=False)
    num_tokens = next(n for n in range(len(ids)) if len(tokenizer.decode(ids[:n])) >= len(reply.cut))
    assert tokenizer.decode(ids[:num_tokens]) == reply.cut, "the cut must fall at the end of a token"
    return num_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(("name", "reply"), CASES)
def test_typical_replies_through_the_server(tokenizers, grammar_compiler, name, reply, stream):
    tokenizer = tokenizers[name]
    max_tokens = max_tokens_for(tokenizer, reply)
    engine = FakeEngine(reply=reply.text, max_model_len=8192, tokenizer=tokenizer, grammar=grammar_compiler)
    fields = {"max_tokens": max_tokens} if max_tokens is not None else {}
    response = chat(make_client(engine), stream=stream, messages=[QUESTION], tools=TOOLS, **fields)
    content, calls, finish_reason = chat_reply(response, stream)
    assert (content or None, calls, finish_reason) == (reply.content, reply.calls, reply.finish_reason)


@pytest.mark.parametrize(("name", "reply"), CASES)
def test_typical_replies_stream_like_they_parse(tokenizers, name, reply):
    """The reply parser the server sets up for this template, fed the reply cut anywhere."""
    tokenizer = tokenizers[name]
    request = ChatCompletionRequest(messages=[QUESTION], tools=TOOLS)
    plan = plan_tools(request, tokenizer)
    fmt = reply_format(tokenizer, render_chat(request, tokenizer, plan).text, plan)
    text, truncated = (reply.text, False) if reply.cut is None else (reply.cut, True)
    whole = parse_reply(fmt, text, truncated)
    assert (whole.content or None, [(c.name, c.arguments) for c in whole.tool_calls]) == (reply.content, reply.calls)
    for cuts in chunkings(text, num_random=10):
        assert streamed_reply(fmt, text, cuts, truncated) == ("", reply.content or "", reply.calls), cuts
