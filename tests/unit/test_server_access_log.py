"""One JSON access-log line per request, with token counts from the generation routes."""

from __future__ import annotations

import json
import logging

import pytest

from tests.helpers.server import MODEL, PROMPT_IDS, REPLY_LEN, chat, events, make_client

FIELDS = {"request_id", "method", "path", "route", "status", "prompt_tokens", "completion_tokens", "latency_ms"}


@pytest.fixture
def client():
    return make_client(api_keys=("k",), headers={"Authorization": "Bearer k"})


@pytest.fixture
def access_lines(caplog):
    logger = logging.getLogger("lmserve.access")
    propagate = logger.propagate
    logger.propagate = False  # records reach caplog once, through its handler here
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lmserve.access")

    def lines() -> list[dict]:
        return [json.loads(r.getMessage()) for r in caplog.handler.records if r.name == "lmserve.access"]

    yield lines
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate


def test_one_line_per_request_with_every_field(client, access_lines):
    chat(client)
    client.get("/v1/models")
    client.get("/nope")
    lines = access_lines()
    assert len(lines) == 3
    assert all(set(line) == FIELDS for line in lines)
    assert [(line["method"], line["route"], line["status"]) for line in lines] == [
        ("POST", "/v1/chat/completions", 200), ("GET", "/v1/models", 200), ("GET", "unmatched", 404)]
    assert lines[1]["prompt_tokens"] is None and lines[1]["completion_tokens"] is None
    assert all(line["latency_ms"] > 0 for line in lines)
    assert len({line["request_id"] for line in lines}) == 3


def test_non_streaming_chat_logs_its_token_counts(client, access_lines):
    body = chat(client).json()
    (line,) = access_lines()
    assert (line["prompt_tokens"], line["completion_tokens"]) == (len(PROMPT_IDS), REPLY_LEN)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (body["usage"]["prompt_tokens"],
                                                                   body["usage"]["completion_tokens"])


def test_streaming_chat_is_logged_when_the_stream_ends(client, access_lines):
    response = chat(client, stream=True)
    assert events(response)[-1] == "[DONE]"
    (line,) = access_lines()
    assert line["status"] == 200
    assert (line["prompt_tokens"], line["completion_tokens"]) == (len(PROMPT_IDS), REPLY_LEN)


def test_n2_counts_the_prompt_once_and_both_choices(client, access_lines):
    chat(client, n=2)
    (line,) = access_lines()
    assert (line["prompt_tokens"], line["completion_tokens"]) == (len(PROMPT_IDS), 2 * REPLY_LEN)


def test_refused_requests_are_logged_with_their_status(client, access_lines):
    client.post("/v1/chat/completions", json={"messages": []})
    client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    lines = access_lines()
    assert [(line["status"], line["route"]) for line in lines] == [(400, "/v1/chat/completions"), (401, "unmatched")]
    assert lines[0]["prompt_tokens"] is None


def test_request_id_is_echoed_and_logged(client, access_lines):
    given = client.get("/v1/models", headers={"X-Request-Id": "trace-42"})
    fresh = client.get("/v1/models", headers={"X-Request-Id": "not ok\x01"})
    assert given.headers["x-request-id"] == "trace-42"
    assert fresh.headers["x-request-id"] not in ("", "not ok\x01")
    assert [line["request_id"] for line in access_lines()] == ["trace-42", fresh.headers["x-request-id"]]


def test_model_id_path_is_a_template_in_the_log(client, access_lines):
    client.get(f"/v1/models/{MODEL}")
    assert access_lines()[0]["route"] == "/v1/models/{model_id}"


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/models/v1", "/v1/models/%2F", "/v1/models/models/models"])
def test_any_model_id_path_is_logged_under_its_template(client, access_lines, path):
    assert client.get(path).status_code == 404
    line = access_lines()[0]
    assert (line["route"], line["status"]) == ("/v1/models/{model_id}", 404)


def test_a_method_the_route_does_not_serve_is_logged_under_its_template(client, access_lines):
    assert client.post("/v1/models").status_code == 405
    assert access_lines()[0]["route"] == "/v1/models"
