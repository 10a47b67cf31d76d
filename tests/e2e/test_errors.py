"""User-caused errors come back OpenAI-shaped with the right status, and the server keeps serving."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

PARIS = [{"role": "user", "content": "Name the capital of France."}]


def post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(f"{server['url']}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=60)


def assert_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return error


def test_malformed_json_is_400(server):
    assert_error(post(server, "/v1/chat/completions", "{not json", raw=True), 400)


def test_invalid_field_is_400_naming_it(server):
    error = assert_error(post(server, "/v1/chat/completions", {"messages": PARIS, "temperature": "hot"}), 400)
    assert "temperature" in error["message"] or error["param"] == "temperature"


def test_one_chat_model_serves_any_name_under_its_own_id(client, model_id):
    # clients written for OpenAI send its names, as llama.cpp's server serves them
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=PARIS, max_tokens=2)
    assert reply.model == model_id
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-3.5-turbo")  # the listing names only what is served
    assert info.value.body["code"] == "model_not_found"


def test_context_overflow_names_both_numbers(server):
    error = assert_error(post(server, "/v1/completions", {"prompt": "hello " * 100, "max_tokens": 2000}), 400)
    assert "2000" in error["message"] and "2048" in error["message"]


def test_unsupported_parameter_is_400_naming_it(server):
    error = assert_error(post(server, "/v1/completions", {"prompt": "hi", "suffix": "bye"}), 400, param="suffix")
    assert "suffix" in error["message"]


def test_unknown_extra_fields_are_tolerated(server):
    response = post(server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 2, "my_extension": 1})
    assert response.status_code == 200


def test_routes_without_v1_prefix(server):
    assert httpx.get(f"{server['url']}/models").status_code == 200
    assert post(server, "/chat/completions", {"messages": PARIS, "max_tokens": 2}).status_code == 200


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"messages": PARIS, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        busy = httpx.get(f"{server['url']}/health").json()
        assert busy["num_running"] == 1 and busy["num_free_kv_blocks"] < busy["num_kv_blocks"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = httpx.get(f"{server['url']}/health").json()
        if health["num_running"] == 0 and health["num_free_kv_blocks"] == health["num_kv_blocks"]:
            break
        time.sleep(0.05)
    assert health["num_running"] == 0 and health["num_free_kv_blocks"] == health["num_kv_blocks"]
    # And the server still answers.
    assert post(server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 2}).status_code == 200


def test_docs_and_openapi(server):
    assert httpx.get(f"{server['url']}/docs").status_code == 200
    spec = httpx.get(f"{server['url']}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]


def test_wrong_json_types_are_400_not_coerced(server):
    for field, value in (("n", "2"), ("stream", "yes"), ("max_tokens", 2.5), ("logprobs", "1")):
        body = {"messages": PARIS, "max_tokens": 2, field: value}
        assert_error(post(server, "/v1/chat/completions", body), 400, param=field)
    nan = '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    assert_error(post(server, "/v1/chat/completions", nan, raw=True), 400, param="temperature")


def test_bad_values_that_used_to_fail_the_engine_are_400(server):
    # A seed beyond 64 bits failed every request in the same engine step with a 500.
    assert_error(post(server, "/v1/completions", {"prompt": "hi", "seed": 2**70, "max_tokens": 2}), 400, "seed")
    # A key that is not a token id is text, as llama.cpp takes it ("²" biases its tokens); an empty one is a 400.
    assert_error(post(server, "/v1/completions", {"prompt": "hi", "logit_bias": {"": 1}}), 400, "logit_bias")
    body = '{"prompt": "hi \\ud800", "max_tokens": 2}'
    assert_error(post(server, "/v1/completions", body, raw=True), 400, "prompt")


def test_an_unknown_model_id_is_404_where_ids_are_looked_up(server):
    assert post(server, "/v1/completions", {"prompt": "hi", "model": "gpt-4", "max_tokens": 2}).status_code == 200
    assert_error(httpx.get(f"{server['url']}/v1/models/gpt-4"), 404, "model")
    assert_error(post(server, "/models/unload", {"model": "gpt-4"}), 404, "model")


def test_unsupported_chat_parameters_are_400_naming_them(server):
    cases = [({"response_format": {"type": "xml"}}, "response_format.type"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
              "messages[0].content[0]")]
    for fields, param in cases:
        error = assert_error(post(server, "/v1/chat/completions", {"messages": PARIS, **fields}), 400, param)
        assert error["code"] == "unsupported_parameter"


def test_chat_over_context_names_the_numbers(server):
    body = {"messages": PARIS, "max_completion_tokens": 5000}
    error = assert_error(post(server, "/v1/chat/completions", body), 400, "max_completion_tokens")
    assert "5000" in error["message"] and "2048" in error["message"]


def deep_ref_chain(links: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["x"],
                      "additionalProperties": False} for i in range(links)}
    defs[f"d{links}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def test_a_schema_too_deep_to_compile_is_400_on_every_spelling(server):
    # 4,000 links of $ref used to crash the grammar compiler, and with it the server; 1,000 (~130 KB)
    # stay under the size limits, so the depth check is what refuses them
    schema = deep_ref_chain(1_000)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for fields in ({"json_schema": schema}, {"guided_json": schema},
                   {"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}},
                   {"tools": [tool], "tool_choice": "required"}):
        error = assert_error(post(server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 2, **fields}), 400)
        assert "nests deeper than 128 levels" in error["message"], fields.keys()
    assert server["proc"].poll() is None
    assert post(server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 2}).status_code == 200
    nested = post(server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 40, "temperature": 0,
                                                   "json_schema": {**deep_ref_chain(3), "$defs": {
                                                       **deep_ref_chain(3)["$defs"],
                                                       "d3": {"type": "integer", "minimum": 0, "maximum": 9}}}})
    assert isinstance(json.loads(nested.json()["choices"][0]["message"]["content"])["x"]["x"]["x"], int)
