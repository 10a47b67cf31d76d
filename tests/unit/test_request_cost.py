"""The limits on what one request may cost: each refused with a 400 naming the limit and its value,
and a request at the limit served."""

from __future__ import annotations

import pytest

from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import MODEL, chat, make_client


def complete(client, **fields):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields})


def refused(response, limit: str, value: int, bound: int, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_costly" and error["param"] == param
    assert f"is {value}, above this server's limit of {bound} ({limit})" in error["message"]


def tool(i: int) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def client():
    return make_client(FakeEngine(max_model_len=100_000))


def test_sequences_are_n_times_the_prompts(client):
    refused(complete(client, prompt=["a"] * 257), "max_sequences", 257, 256, "prompt")
    refused(complete(client, prompt=["a", "b", "c"], n=100), "max_sequences", 300, 256, "prompt")
    assert complete(client, prompt=["a", "b"], n=128).status_code == 200


def test_generated_tokens_are_n_times_max_tokens(client):
    refused(complete(client, n=128, max_tokens=16_385), "max_sequence_tokens", 128 * 16_385, 2**21, "max_tokens")
    refused(chat(client, n=64, max_completion_tokens=40_000), "max_sequence_tokens", 64 * 40_000, 2**21,
            "max_completion_tokens")
    assert complete(client, n=128, max_tokens=16_384).status_code == 200


def test_without_max_tokens_the_rest_of_the_context_counts(client):
    # "hi" with BOS is 3 tokens of the 100,000: 99,997 each
    refused(complete(client, max_tokens=None, n=21), "max_sequence_tokens", 21 * 99_997, 2**21, "max_tokens")


def test_stop_strings_by_count_and_length(client):
    refused(chat(client, stop=[f"s{i}" for i in range(257)]), "max_stop_strings", 257, 256, "stop")
    refused(chat(client, stop="x" * 4097), "max_stop_string_chars", 4097, 4096, "stop")
    assert chat(client, stop=[f"s{i}" for i in range(256)]).status_code == 200
    assert chat(client, stop=["x" * 4096]).status_code == 200


def test_stop_token_ids_by_count(client):
    refused(chat(client, stop_token_ids=[5] * 1025), "max_stop_token_ids", 1025, 1024, "stop_token_ids")
    refused(chat(client, stop=[5] * 1025), "max_stop_token_ids", 1025, 1024, "stop")


def test_logit_bias_by_entries_and_by_the_tokens_of_a_text_key(client):
    refused(chat(client, logit_bias=[[5, 1.0]] * 1025), "max_logit_bias", 1025, 1024, "logit_bias")
    refused(chat(client, logit_bias=[["y" * 1025, 1.0]]), "max_logit_bias", 1025, 1024, "logit_bias")
    assert chat(client, logit_bias={str(i): 1.0 for i in range(2, 258)}).status_code == 200


def test_tools_and_messages_by_count(client):
    refused(chat(client, tools=[tool(i) for i in range(257)]), "max_tools", 257, 256, "tools")
    messages = [{"role": "user", "content": "hi"}] * 4097
    refused(chat(client, messages=messages), "max_messages", 4097, 4096, "messages")
    assert chat(client, messages=messages[:4096]).status_code == 200
