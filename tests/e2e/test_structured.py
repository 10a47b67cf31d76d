"""Structured output and tool calling through the real server, read back with the openai client."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                           "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"],
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def assert_valid_calls(message, allowed: set[str]) -> list[tuple[str, dict]]:
    assert message.tool_calls, message
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def stream_message(client, **kwargs):
    """Rebuild a choice's message from streamed deltas, as a client would."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                if piece.id is not None:
                    assert piece.index not in calls and piece.type == "function"
                    calls[piece.index] = {"name": piece.function.name, "arguments": ""}
                calls[piece.index]["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_always_calls_an_offered_tool_with_valid_arguments(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, tool_choice="required",
                                              n=8, temperature=1.0, max_tokens=120, parallel_tool_calls=False)
    for choice in response.choices:
        assert len(assert_valid_calls(choice.message, {"get_weather", "add"})) == 1
        assert choice.message.content is None
        assert choice.finish_reason == "tool_calls"


def test_parallel_required_calls_are_all_valid(client, model_id):
    # A sampled choice makes one call about a quarter of the time (8 runs of n=4 counted): with 8
    # choices, all of them single calls is a 1-in-65,000 chance (with 4 it failed one suite run)
    response = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, tool_choice="required",
                                              n=8, temperature=1.0, max_tokens=160)
    for choice in response.choices:
        message = choice.message
        if choice.finish_reason == "length":  # cut after the first call: the last may be unfinished
            if not _parses(message.tool_calls[-1].function.arguments):
                message.tool_calls = message.tool_calls[:-1]
        else:
            assert choice.finish_reason == "tool_calls" and message.content is None
        assert_valid_calls(message, {"get_weather", "add"})
    assert any(len(choice.message.tool_calls) > 1 for choice in response.choices)  # calls in parallel


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_named_tool_choice_calls_that_tool(client, model_id):
    choice_arg = {"type": "function", "function": {"name": "add"}}
    response = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, tool_choice=choice_arg,
                                              n=8, temperature=1.0, max_tokens=80, parallel_tool_calls=False)
    for choice in response.choices:
        calls = assert_valid_calls(choice.message, {"add"})
        assert len(calls) == 1
        assert choice.finish_reason == "stop"  # as OpenAI answers a forced function


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_streamed_tool_calls_agree_with_non_streamed(float32_client, sampling):
    # On the float32 path: the second request finds the prompt in the prefix cache, and only there
    # are its logits the same bits as the first's (under int4 a greedy run may then part ways).
    client = float32_client
    kwargs = dict(model=client.models.list().data[0].id, messages=ASK, tools=TOOLS, tool_choice="required",
                  max_tokens=120, **sampling)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = stream_message(client, **kwargs)
    assert calls and [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert content == (whole.message.content or "") and finish == whole.finish_reason
    assert whole.finish_reason in ("tool_calls", "length")  # the small model may go on calling until max_tokens


def test_auto_calls_are_valid_when_made(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, n=6, temperature=1.0,
                                              max_tokens=120)
    for choice in response.choices:
        if choice.message.tool_calls:
            assert_valid_calls(choice.message, {"get_weather", "add"})
            assert "<tool_call>" not in (choice.message.content or "")
        else:
            assert choice.message.content


def test_tool_results_round_trip(client, model_id):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    response = client.chat.completions.create(model=model_id, messages=messages, tools=TOOLS, max_tokens=30,
                                              temperature=0)
    baseline = client.chat.completions.create(model=model_id, messages=ASK, tools=TOOLS, max_tokens=1)
    assert response.choices[0].message.content or response.choices[0].message.tool_calls
    # the call and its result reached the prompt: <tool_call> and <tool_response> turns, ~30 tokens
    assert response.usage.prompt_tokens > baseline.usage.prompt_tokens + 20


def test_json_schema_response_format_streamed_and_not(client, model_id):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 50000000}},
              "required": ["city", "population"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    kwargs = dict(model=model_id, messages=[{"role": "user", "content": "A big city, as JSON."}],
                  response_format=fmt, temperature=1.0, seed=3, max_tokens=60)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(whole), schema)
    content, calls, _ = stream_message(client, **kwargs)
    assert content == whole and calls == []


def test_extension_constraints(client, model_id):
    ask = [{"role": "user", "content": "Pick one."}]
    cases = [({"choice": ["red", "green"]}, r"red|green"),
             ({"regex": r"[0-9]{4}-[0-9]{2}"}, r"[0-9]{4}-[0-9]{2}"),
             ({"grammar": 'root ::= "yes" | "no"'}, r"yes|no"),
             ({"guided_choice": ["up", "down"]}, r"up|down"),
             ({"structured_outputs": {"regex": "[A-Z]{3}"}}, r"[A-Z]{3}")]
    for extra, pattern in cases:
        text = client.completions.create(model=model_id, prompt="Answer:", max_tokens=20, temperature=1.0,
                                         extra_body=extra).choices[0].text
        assert re.fullmatch(pattern, text), (extra, text)
        reply = client.chat.completions.create(model=model_id, messages=ask, max_tokens=20, temperature=1.0,
                                               extra_body=extra).choices[0].message.content
        assert re.fullmatch(pattern, reply), (extra, reply)


@pytest.mark.parametrize(("kwargs", "param", "needle"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "response_format", "objec"),
    ({"extra_body": {"regex": "(a"}}, "regex", "parenthesis"),
    ({"extra_body": {"grammar": "root ::= "}}, "grammar", "EBNF"),
    ({"extra_body": {"regex": "a", "choice": ["b"]}}, "choice", "at most one"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tools", "combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters", "object"),
])
def test_invalid_constraints_are_400_naming_the_problem(client, model_id, kwargs, param, needle):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_id, messages=ASK, max_tokens=5, **kwargs)
    body = error.value.body
    assert body["param"] == param and needle in body["message"], body
