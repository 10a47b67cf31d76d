"""The HTTP layer end to end over ASGI, against a fake engine with a byte-level tokenizer.

Responses are parsed with the official `openai` types to pin the exact OpenAI shapes.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.requests import ClientDisconnect

from lmserve.request import SamplingParams
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine
from tests.helpers.server import (
    MODEL,
    PROMPT_IDS,
    REPLY_LEN,
    chat,
    events,
    loading_client,
    make_client,
    wait_until,
)


# ---------------------------------------------------------------- chat, non-streaming


def test_chat_completion_shape_and_usage():
    engine = FakeEngine()
    response = chat(make_client(engine))
    assert response.status_code == 200
    completion = ChatCompletion.model_validate(response.json())
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL and completion.system_fingerprint is None
    [choice] = completion.choices
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", "Hé!")
    assert choice.finish_reason == "stop" and choice.logprobs is None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT_IDS), REPLY_LEN)
    assert usage.total_tokens == len(PROMPT_IDS) + REPLY_LEN
    assert usage.prompt_tokens_details.cached_tokens == 3
    [(request_id, prompt_ids, params)] = engine.calls
    assert request_id == completion.id and prompt_ids == PROMPT_IDS  # no BOS added on top of the template
    assert params.max_tokens == 64 - len(PROMPT_IDS)  # default: the rest of the context


def test_chat_sampling_fields_reach_the_engine():
    engine = FakeEngine()
    fields = dict(
        temperature=0.5,
        top_p=0.9,
        top_k=-1,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logit_bias={"7": -100},
        seed=11,
        stop="\n",
        stop_token_ids=[1],
        ignore_eos=True,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        user="u1",
        max_tokens=50,
        max_completion_tokens=2,
        parallel_tool_calls=True,
        response_format={"type": "text"},
    )
    response = chat(make_client(engine), **fields)
    assert response.status_code == 200, response.json()
    assert response.json()["choices"][0]["finish_reason"] == "length"
    params = engine.calls[0][2]
    assert params == SamplingParams(
        temperature=0.5,
        top_p=0.9,
        top_k=0,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logit_bias=((7, -100.0),),
        seed=11,
        max_tokens=2,
        stop=("\n",),
        stop_token_ids=(1,),
        ignore_eos=True,
        include_stop_str_in_output=True,
        skip_special_tokens=False,
    )


def test_chat_content_parts_and_developer_role():
    engine = FakeEngine()
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    response = make_client(engine).post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 200
    rendered = "system: be brief\nuser: a\nb\nassistant: "
    assert engine.calls[0][1] == ByteTokenizer().encode(rendered, add_special_tokens=False)


def test_chat_n2_separate_requests_seeds_and_usage_counted_once():
    engine = FakeEngine()
    completion = ChatCompletion.model_validate(chat(make_client(engine), n=2, seed=7).json())
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == ["Hé!", "Hé!"]
    assert [call[0] for call in engine.calls] == [f"{completion.id}-0", f"{completion.id}-1"]
    assert [call[2].seed for call in engine.calls] == [7, 8]
    assert completion.usage.prompt_tokens == len(PROMPT_IDS)
    assert completion.usage.completion_tokens == 2 * REPLY_LEN


def test_chat_logprobs_shape():
    response = chat(make_client(), logprobs=True, top_logprobs=3)
    completion = ChatCompletion.model_validate(response.json())
    content = completion.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["H", "\ufffd", "\ufffd", "!"]
    assert [entry.bytes for entry in content] == [[72], [0xC3], [0xA9], [33]]
    assert all(entry.logprob == -0.25 for entry in content)
    top = content[0].top_logprobs
    assert [(t.token, t.logprob, t.bytes) for t in top] == [
        ("H", -0.25, [72]),
        ("x", -2.0, [120]),
        ("y", -9999.0, [121]),
    ]
    assert response.json()["choices"][0]["logprobs"]["refusal"] is None


def test_chat_logprobs_without_top_logprobs_has_empty_alternatives():
    completion = ChatCompletion.model_validate(chat(make_client(), logprobs=True).json())
    assert all(entry.top_logprobs == [] for entry in completion.choices[0].logprobs.content)


def test_missing_model_uses_the_served_one_and_unknown_fields_are_tolerated():
    body = {"messages": [{"role": "user", "content": "hi", "weird": 1}], "some_vendor_flag": True}
    response = make_client().post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["model"] == MODEL


def test_routes_without_v1_prefix():
    client = make_client()
    assert (
        client.post("/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).status_code
        == 200
    )
    assert client.post("/completions", json={"prompt": "x"}).status_code == 200
    assert client.get("/models").json()["data"][0]["id"] == MODEL


# ---------------------------------------------------------------- chat, streaming


def test_chat_stream_order_without_usage():
    payloads = events(chat(make_client(), stream=True))
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    assert all("usage" not in p for p in payloads[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hé!"
    assert payloads[-2]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_stream_include_usage():
    payloads = events(chat(make_client(), stream=True, stream_options={"include_usage": True}))
    assert payloads[-1] == "[DONE]"
    *content, usage_chunk = payloads[:-1]
    assert all(p["usage"] is None for p in content)
    assert usage_chunk["choices"] == []
    usage = ChatCompletionChunk.model_validate(usage_chunk).usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT_IDS), REPLY_LEN)
    assert content[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_n2_interleaves_by_index():
    payloads = events(chat(make_client(), stream=True, n=2, logprobs=True))
    chunks = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == "Hé!"
        assert mine[-1].finish_reason == "stop" and mine[-1].delta.content is None
        assert sum(len(c.logprobs.content) for c in mine if c.logprobs) == REPLY_LEN
    assert [c.choices[0].index for c in chunks[:2]] == [0, 1]  # both role chunks first


def test_stream_error_after_start_is_an_event_then_done(caplog):
    engine = FakeEngine(fail_after=1)
    payloads = events(chat(make_client(engine), stream=True))
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["error"]["type"] == "server_error"
    assert_names_no_internals(payloads[-2]["error"]["message"], "device fell over", caplog)


# ---------------------------------------------------------------- text completions


def test_completion_shape_string_prompt_gets_bos():
    engine = FakeEngine()
    response = make_client(engine).post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}
    )
    completion = Completion.model_validate(response.json())
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    [choice] = completion.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (0, "H", "length", None)
    assert engine.calls[0][1] == [0, 2 + ord("h"), 2 + ord("i")]
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 1)


def test_completion_token_prompts_batch_and_n():
    engine = FakeEngine()
    body = {"prompt": [[5, 6], [7, 8, 9]], "n": 2, "max_tokens": 1}
    completion = Completion.model_validate(make_client(engine).post("/v1/completions", json=body).json())
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert [call[1] for call in engine.calls] == [[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]]
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 4


def test_completion_echo_and_logprobs():
    client = make_client()
    echoed = client.post("/v1/completions", json={"prompt": "hi ", "echo": True, "max_tokens": 1}).json()
    assert echoed["choices"][0]["text"] == "hi H"
    body = {"prompt": "hi", "logprobs": 2, "max_tokens": 2}
    logprobs = Completion.model_validate(client.post("/v1/completions", json=body).json()).choices[0].logprobs
    assert logprobs.tokens == ["H", "\ufffd"]
    assert logprobs.token_logprobs == [-0.25, -0.25]
    assert logprobs.top_logprobs == [{"H": -0.25, "x": -2.0}, {"\ufffd": -0.25, "x": -2.0}]
    assert logprobs.text_offset == [0, 1]


def test_completion_stream_with_usage():
    body = {"prompt": "hi", "stream": True, "echo": True, "stream_options": {"include_usage": True}}
    payloads = events(make_client().post("/v1/completions", json=body))
    assert payloads[-1] == "[DONE]"
    *chunks, usage_chunk = payloads[:-1]
    assert all(p["object"] == "text_completion" and p["usage"] is None for p in chunks)
    assert chunks[0]["choices"][0]["text"] == "hi"  # the echoed prompt first
    assert "".join(p["choices"][0]["text"] for p in chunks) == "hiHé!"
    assert chunks[-1]["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == REPLY_LEN


# ---------------------------------------------------------------- errors


def assert_error(response, status, param=None, *, code=None, contains=()):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    for text in contains:
        assert text in error["message"]
    return error


def test_malformed_json_is_400():
    response = make_client().post(
        "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_wrong_type_names_the_field():
    assert_error(chat(make_client(), temperature="hot"), 400, "temperature", contains=["temperature"])
    # a field of several types: what is wrong with the value, not that another type was wanted
    no_messages = make_client().post("/v1/chat/completions", json={"messages": []})
    assert_error(no_messages, 400, "messages", contains=["at least 1 item"])
    bad_role = {"messages": [{"role": "wizard", "content": "x"}]}
    assert_error(make_client().post("/v1/chat/completions", json=bad_role), 400, "messages[0].role")
    assert_error(make_client().post("/v1/chat/completions", json={}), 400, "messages", contains=["Missing"])
    assert_error(make_client().post("/v1/completions", json={"prompt": {"a": 1}}), 400, "prompt")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "2"}, "n"),
        ({"n": 2.5}, "n"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": "1"}, "logprobs"),
        ({"temperature": True}, "temperature"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"seed": "7"}, "seed"),
        ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_wrong_json_types_are_not_coerced(fields, param):
    assert_error(chat(make_client(), **fields), 400, param)


def test_a_whole_number_with_a_fraction_is_an_integer():
    """JSON Schema's integer, which /openapi.json promises, includes 2.0: taken as 2 wherever an
    integer is, so the engine runs what the integers would have asked for."""
    integers = {"n": 2, "max_tokens": 3, "seed": 7, "top_k": 40, "stop_token_ids": [5], "top_logprobs": 2}
    whole = {"n": 2.0, "max_tokens": 3.0, "seed": 7.0, "top_k": 40.0, "stop_token_ids": [5.0], "top_logprobs": 2.0}
    planned = []
    for numbers in (integers, whole):
        engine = FakeEngine()
        response = chat(make_client(engine), logprobs=True, **numbers)
        assert response.status_code == 200 and len(response.json()["choices"]) == 2, response.text
        planned.append([params for _, _, params in engine.calls])
    assert planned[1] == planned[0]
    first = planned[0][0]
    assert (first.max_tokens, first.top_k, first.logprobs) == (3, 40, 2)


def raw_chat(client, body: str):
    return client.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})


def test_non_finite_numbers_are_400():
    # Python's json module reads NaN and Infinity; they must not reach the sampler.
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    for field, value, param in [
        ("temperature", "NaN", "temperature"),
        ("temperature", "Infinity", "temperature"),
        ("repetition_penalty", "Infinity", "repetition_penalty"),
        ("logit_bias", '{"5": NaN}', "logit_bias.5"),
    ]:
        assert_error(raw_chat(make_client(), f'{{{messages}, "{field}": {value}}}'), 400, param)


def test_seed_outside_64_bits_is_400_not_an_engine_failure():
    assert_error(chat(make_client(), seed=2**64), 400, "seed")
    assert_error(chat(make_client(), seed=-(2**63) - 1), 400, "seed")
    assert chat(make_client(), seed=2**63 - 1, n=2).status_code == 200


def test_logit_bias_key_that_only_looks_like_a_digit_is_text():
    # llama.cpp: a key that is not a token id is text whose tokens get the bias
    assert chat(make_client(), logit_bias={"²": 1}).status_code == 200
    assert chat(make_client(), logit_bias={" 5": 1}).status_code == 200


def test_lone_surrogates_are_400():
    body = '{"messages": [{"role": "user", "content": "hi \\ud800"}]}'
    assert_error(raw_chat(make_client(), body), 400, "messages[0].content", contains=["Unicode"])
    response = make_client().post(
        "/v1/completions", content=b'{"prompt": ["ok", "\\udfff"]}', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "prompt[1]")


def test_sampling_params_rejection_is_400():
    assert_error(chat(make_client(), top_p=0), 400, "top_p", contains=["top_p"])
    assert_error(chat(make_client(), logit_bias={"999": 1}), 400, "logit_bias")
    assert_error(chat(make_client(), stop_token_ids=[258]), 400, "stop_token_ids")


def test_with_one_chat_model_any_name_is_served_by_it_under_its_own_id():
    response = chat(make_client(), model="gpt-4o-mini")  # what clients written for OpenAI send
    assert response.status_code == 200 and response.json()["model"] == MODEL


def test_with_several_chat_models_each_is_served_by_name_and_an_unknown_name_is_404():
    other = FakeEngine(reply="other")
    client = make_client(more_models={"second": other})
    second = chat(client, model="second").json()
    assert (second["model"], second["choices"][0]["message"]["content"]) == ("second", "other")
    assert chat(client).json()["choices"][0]["message"]["content"] == "Hé!"
    error = assert_error(chat(client, model="gpt-4"), 404, "model", code="model_not_found")
    assert "'gpt-4'" in error["message"] and f"'{MODEL}', 'second'" in error["message"]
    assert_error(client.post("/tokenize", json={"content": "a", "model": "gpt-4"}), 404, "model")
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == [MODEL, "second"]


def test_too_long_prompt_names_the_numbers():
    client = make_client(FakeEngine(max_model_len=24))
    n = len(PROMPT_IDS)  # 20
    assert_error(
        chat(client, max_tokens=10),
        400,
        "max_tokens",
        code="context_length_exceeded",
        contains=["10", "24", str(n)],
    )
    assert_error(chat(client, max_completion_tokens=10), 400, "max_completion_tokens", contains=["10", "24"])
    long_prompt = {"prompt": "x" * 23}  # 24 tokens with the BOS: no room for a reply
    assert_error(client.post("/v1/completions", json=long_prompt), 400, "prompt", contains=["24", "24 input"])


def test_a_prompt_mixing_ids_and_lists_is_refused():
    # found by fuzzing the schema: a 500 when the nested list was taken for a token id
    response = make_client().post("/v1/completions", json={"prompt": [5, ["a", 6]]})
    assert_error(response, 400, "prompt", contains=["mixes"])


def test_a_prompt_that_cannot_fit_is_refused_by_its_length_untokenized():
    engine = FakeEngine(max_model_len=24)
    client = make_client(engine)
    encoded: list[str] = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text, **kw: encoded.append(text) or encode(text, **kw)
    for prompt, param in (("x" * 100, "prompt"), (["ok", "y" * 100], "prompt[1]")):
        response = client.post("/v1/completions", json={"prompt": prompt})
        error = assert_error(response, 400, param, code="context_length_exceeded")
        assert "100 bytes" in error["message"] and "at least 25 tokens" in error["message"]
    error = assert_error(chat(client, messages=[{"role": "user", "content": "z" * 100}]), 400, "messages",
                         code="context_length_exceeded")
    assert "at most 23" in error["message"]
    assert all(len(text) < 24 for text in encoded)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "a"},
                            {"type": "image_url", "image_url": {"url": "x"}},
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
    ],
)
def test_unsupported_chat_parameters_are_refused(fields, param):
    error = assert_error(chat(make_client(), **fields), 400, param, code="unsupported_parameter")
    assert "not supported" in error["message"]


def test_parameters_that_do_not_change_output_are_tolerated():
    assert chat(make_client(), store=False, metadata={"a": "b"}, service_tier="auto").status_code == 200


def test_tools_with_tool_choice_none_are_accepted():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat(make_client(), tools=tools, tool_choice="none").status_code == 200


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_unsupported_completion_parameters_are_refused(fields, param):
    response = make_client().post("/v1/completions", json={"prompt": "hi", **fields})
    assert_error(response, 400, param, code="unsupported_parameter")


def test_other_request_errors():
    client = make_client()
    assert_error(client.post("/v1/completions", json={"prompt": ""}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"prompt": []}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"prompt": [1, 300]}), 400, "prompt", contains=["300"])
    assert_error(chat(client, stream_options={"include_usage": True}), 400, "stream_options")
    assert_error(chat(client, top_logprobs=2), 400, "top_logprobs")
    assert_error(chat(client, stop=["ok", ""]), 400, "stop")
    assert_error(chat(client, messages=[]), 400, "messages")
    function_message = [{"role": "function", "content": "42", "name": "f"}]
    assert_error(chat(client, messages=function_message), 400, "messages", contains=["no function role"])
    assert_error(chat(client, tool_choice="required"), 400, "tool_choice", contains=["needs 'tools'"])


def assert_names_no_internals(message: str, internal: str, caplog) -> None:
    """A 5xx message names no code, only the id under which the log has the details."""
    assert internal not in message and "Error" not in message
    reference = message.rsplit(" ", 1)[-1].rstrip(".")
    assert any(reference in record.getMessage() and (internal in record.getMessage() or internal in
                                                    (record.exc_text or "")) for record in caplog.records)


def test_engine_error_is_500_and_server_stays_up(caplog):
    engine = FakeEngine(fail_after=1)
    client = make_client(engine)
    error = assert_error(chat(client), 500)
    assert error["type"] == "server_error"
    assert_names_no_internals(error["message"], "device fell over", caplog)
    engine.fail_after = None
    assert chat(client).status_code == 200


def test_unexpected_exception_is_500_openai_shaped_and_names_no_code(caplog):
    client = make_client(FakeEngine(raise_after=1), raise_server_exceptions=False)
    response = chat(client)
    error = assert_error(response, 500)
    assert error["type"] == "server_error" and response.headers["x-request-id"] in error["message"]
    assert_names_no_internals(error["message"], "kaboom", caplog)
    payloads = events(chat(client, stream=True))
    assert payloads[-1] == "[DONE]"
    assert_names_no_internals(payloads[-2]["error"]["message"], "kaboom", caplog)


def test_unknown_route_is_openai_shaped_404():
    assert_error(make_client().get("/v1/nope"), 404)


# ---------------------------------------------------------------- auth, health, models


def test_api_key_required_when_configured():
    client = make_client(api_keys=("sekret", "other"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        response = client.get("/v1/models", headers=headers)
        error = assert_error(response, 401)
        assert error["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.get("/v1/models", headers={"X-Api-Key": "other"}).status_code == 200
    unauthorised_bad_json = client.post(
        "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}
    )
    assert unauthorised_bad_json.status_code == 401
    assert client.get("/health").status_code == 200


def test_health_and_loading_then_ready():
    with loading_client() as (client, loader):
        assert (client.get("/health").status_code, client.get("/health").json()) == (503, {"status": "loading"})
        response = chat(client)
        assert_error(response, 503, code="model_loading")
        assert response.headers["retry-after"] == "5"
        [card] = client.get("/v1/models").json()["data"]
        assert (card["max_model_len"], card["status"]) == (None, {"value": "loading", "error": None, "progress": None})
        loader.finish(MODEL, FakeEngine())
        wait_until(lambda: client.get("/health").status_code == 200)
        assert client.get("/health").json() == {"status": "ok", **FakeEngine().snapshot()}
        assert chat(client).status_code == 200


def test_models_listing():
    client = make_client()
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert openai.types.Model.model_validate(card).id == MODEL
    assert card["owned_by"] == "lmserve" and card["max_model_len"] == 64
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/other"), 404, "model", code="model_not_found")


def test_openapi_and_docs():
    client = make_client()
    schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_openapi_documents_the_errors_every_operation_can_answer():
    paths = make_client().get("/openapi.json").json()["paths"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "403", "404", "408", "413", "500", "501", "503"} <= set(chat) and "422" not in chat
    assert chat["413"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/ErrorResponse"
    health = paths["/health"]["get"]["responses"]
    assert {"200", "403", "503"} <= set(health) and "401" not in health  # /health needs no key
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    embeddings = paths["/v1/embeddings"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert len(embeddings["anyOf"]) == 2  # OpenAI's answer, and llama.cpp's list for `content`


# ---------------------------------------------------------------- client disconnects


def _scope(path: str, spec_version: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }


async def _call_then_disconnect(app, path: str, body: dict, disconnected: asyncio.Event, spec_version="2.3"):
    """Drive the ASGI app directly: send `body`, then report a disconnect once `disconnected` is set."""
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if sent and disconnected.is_set() and spec_version >= "2.4":
            raise OSError("connection reset")  # how a server reports a gone client under ASGI 2.4
        sent.append(message)

    try:
        await asyncio.wait_for(app(_scope(path, spec_version), receive, send), timeout=5)
    except ClientDisconnect:  # starlette's translation of the failed send
        assert spec_version >= "2.4"
    return sent


@pytest.mark.parametrize("n", [1, 2])  # one sequence is iterated directly, several through pump tasks
def test_stream_disconnect_closes_engine_generators(n):
    """ASGI 2.3 (uvicorn): starlette watches receive() and cancels the stream on disconnect."""
    engine = FakeEngine(hang_after=2)
    app = make_client(engine).app
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "n": n}
    [slot] = app.state.lmserve.fleet.slots()
    held = []

    async def scenario():
        disconnected = asyncio.Event()

        async def hang_up():
            await engine.hanging.wait()
            held.append(slot.leases)  # the stream holds its model while it runs
            disconnected.set()

        waiter = asyncio.create_task(hang_up())
        sent = await _call_then_disconnect(app, "/v1/chat/completions", body, disconnected)
        waiter.cancel()
        # Asserted before asyncio.run's teardown, which would close leftover generators itself.
        assert len(engine.closed_early) == n
        assert sorted(engine.closed_early) == sorted(call[0] for call in engine.calls)
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 200
    assert held == [1] and slot.leases == 0  # and lets it go when the client leaves


def test_stream_send_failure_closes_engine_generators():
    """ASGI 2.4: starlette learns of the disconnect when send() fails, and leaves the generator open."""
    engine = FakeEngine(reply="x" * 40)
    app = make_client(engine).app
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}

    async def scenario():
        disconnected = asyncio.Event()

        async def hang_up():  # once generation runs, the next send fails
            while not engine.calls:
                await asyncio.sleep(0)
            disconnected.set()

        waiter = asyncio.create_task(hang_up())
        await _call_then_disconnect(app, "/v1/chat/completions", body, disconnected, "2.4")
        waiter.cancel()
        assert engine.closed_early == [engine.calls[0][0]]

    asyncio.run(scenario())


def test_nonstream_disconnect_closes_engine_generator():
    engine = FakeEngine(hang_after=1)
    app = make_client(engine).app
    body = {"prompt": "hi"}

    async def scenario():
        disconnected = asyncio.Event()

        async def hang_up():
            await engine.hanging.wait()
            disconnected.set()

        waiter = asyncio.create_task(hang_up())
        sent = await _call_then_disconnect(app, "/v1/completions", body, disconnected)
        waiter.cancel()
        assert engine.closed_early == [engine.calls[0][0]]
        return sent

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 499


def test_closing_the_event_stream_closes_engine_generators():
    from lmserve.server.protocol import ChatCompletionRequest
    from lmserve.server.requests.plan import chat_plan
    from lmserve.server.responses import event_stream
    from lmserve.server.responses.choices import ResponseMeta

    engine = FakeEngine(hang_after=3)
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream=True)
    plan = chat_plan(request, "chatcmpl-x", engine.tokenizer, engine.max_model_len)

    async def scenario():
        chunks = event_stream.chat_events(engine, plan, ResponseMeta("chatcmpl-x", 0, MODEL), False)
        stream = event_stream.with_done(chunks)
        first = [await stream.__anext__() for _ in range(2)]  # the role chunk and "H"
        await stream.aclose()
        assert engine.closed_early == ["chatcmpl-x"]
        return first

    first = asyncio.run(scenario())
    assert '"content":"H"' in first[1]


# ---------------------------------------------------------------- the official client


def test_official_async_client():
    app = make_client(api_keys=("k",)).app

    async def scenario():
        http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="k", http_client=http_client)
        completion = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1
        )
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        models = await client.models.list()
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                response_format={"type": "json_object"},
            )
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
        await http_client.aclose()
        return completion, chunks, text, models, bad.value

    completion, chunks, text, models, bad = asyncio.run(scenario())
    assert completion.choices[0].message.content == "Hé!"
    assert completion.choices[0].logprobs.content[0].top_logprobs[0].token == "H"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hé!"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == REPLY_LEN
    assert text.choices[0].text == "H\ufffd" or text.choices[0].finish_reason == "length"
    assert [m.id for m in models.data] == [MODEL]
    assert bad.body["param"] == "response_format"


def test_official_sync_client_over_testclient():
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=make_client())
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2
    )
    assert [c.message.content for c in completion.choices] == ["Hé!", "Hé!"]
    stream = client.completions.create(model=MODEL, prompt="hi", stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == "Hé!"


# ---------------------------------------------------------------- the event loop stays free


class SlowGrammar:
    """A grammar compiler whose compile blocks until released, as a big schema's does (seconds)."""

    def __init__(self):
        import threading

        self.started, self.release = threading.Event(), threading.Event()

    def compile(self, spec, abandoned=None):
        self.started.set()
        assert self.release.wait(5), "never released"


def test_compiling_a_constraint_does_not_block_other_requests():
    engine = FakeEngine()
    engine.grammar = SlowGrammar()
    app = make_client(engine).app

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            body = {"messages": [{"role": "user", "content": "hi"}], "regex": "[a-z]+"}
            constrained = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            for _ in range(500):
                if engine.grammar.started.is_set() or constrained.done():
                    break
                await asyncio.sleep(0.01)
            assert engine.grammar.started.is_set(), "the compile never started"
            models = await asyncio.wait_for(client.get("/v1/models"), 2)  # answered while compiling
            engine.grammar.release.set()
            return models, await constrained

    models, constrained = asyncio.run(scenario())
    assert models.status_code == 200 and constrained.status_code == 200


# ---------------------------------------------------------------- constraints on a thinking model


class AnyGrammar:
    def compile(self, spec, abandoned=None):
        return spec


def thinking_engine(reply: str) -> FakeEngine:
    """A template that opens <think> in the generation prompt, as DeepSeek-R1 and Qwen3's do."""
    tokenizer = ByteTokenizer(chat_template="{{ messages }}<think>", prompt_suffix="<think>\n")
    return FakeEngine(reply=reply, max_model_len=128, tokenizer=tokenizer, grammar=AnyGrammar())


@pytest.mark.parametrize("stream", [False, True])
def test_constrained_output_of_a_thinking_model_is_content(stream):
    # the grammar shapes the reply from its first token: no reasoning can come first, even though
    # the prompt left <think> open, so the JSON is the content
    client = make_client(thinking_engine('{"a": 1}'))
    response = chat(client, stream=stream, response_format={"type": "json_object"})
    if stream:
        deltas = [e["choices"][0]["delta"] for e in events(response)[:-1] if e["choices"]]
        content = "".join(d.get("content") or "" for d in deltas)
        assert not any(d.get("reasoning_content") for d in deltas)
    else:
        message = response.json()["choices"][0]["message"]
        content = message["content"]
        assert message["reasoning_content"] is None
    assert content == '{"a": 1}'


def test_unconstrained_thinking_model_still_reasons():
    response = chat(make_client(thinking_engine("hmm</think>Hi")))
    message = response.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("hmm", "Hi")


def test_required_tool_call_of_a_thinking_model_is_parsed():
    engine = thinking_engine('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    engine.max_model_len = 1024  # the tools section is in the prompt
    tools = [{"type": "function", "function": {"name": "f"}}]
    response = chat(make_client(engine), tools=tools, tool_choice="required")
    choice = response.json()["choices"][0]
    assert choice["message"]["reasoning_content"] is None and choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["f"]
