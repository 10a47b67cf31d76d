"""Strings a JSON body cannot carry as text (lone surrogates, invalid UTF-8): a 400 naming the
field on every route, before the route sees them."""

from __future__ import annotations

import json

import pytest

from lmserve.server.requests.body_text import lone_surrogate_at
from tests.helpers.server import MODEL, make_client

LONE = "\ud800"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("value", "where"), [
    ("fine", None),
    ("an emoji 😀 is a pair, not a lone surrogate", None),
    (LONE, ((), LONE)),
    ({"a": [1, {"b": "x\udfff"}]}, (("a", 1, "b"), "\udfff")),
    ({"a": "ok", "k\udc00": 1}, ((), "\udc00")),  # a bad key: located at its object
    ([[], ["", "\ud83d"]], ((1, 1), "\ud83d")),
    ({"n": 1.5, "b": True, "z": None}, None),
])
def test_lone_surrogate_at(value, where):
    assert lone_surrogate_at(value) == where


def post_raw(client, path: str, body: dict | bytes):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: escapes kept as \ud800
    return client.post(path, content=content, headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def client():
    return make_client(raise_server_exceptions=False)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"model": LONE, "messages": HELLO}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": HELLO, "stop": ["a", LONE]}, "stop[1]"),
    ("/v1/chat/completions", {"messages": HELLO, "chat_template_kwargs": {"Name": LONE}}, "chat_template_kwargs.Name"),
    ("/v1/chat/completions", {"messages": HELLO, "my_extension": LONE}, "my_extension"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", LONE]}, "prompt[1]"),
    ("/completion", {"prompt": "hi", "grammar": LONE}, "grammar"),
    ("/infill", {"input_prefix": LONE}, "input_prefix"),
    ("/v1/embeddings", {"input": LONE}, "input"),
    ("/tokenize", {"model": LONE, "content": "x"}, "model"),
    ("/detokenize", {"tokens": [1], "model": LONE}, "model"),
    ("/v1/models/load", {"model": LONE}, "model"),
    ("/apply-template", {"messages": LONE}, "messages"),
    ("/slots/0?action=save", {"filename": LONE}, "filename"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(client, path, body, param):
    response = post_raw(client, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_unicode")
    assert "U+D800" in error["message"] and param in error["message"]


def test_the_raw_bytes_of_a_surrogate_are_refused_too(client):
    error = post_raw(client, "/tokenize", b'{"content": "a\xed\xa0\x80"}').json()["error"]
    assert (error["param"], error["code"]) == ("content", "invalid_unicode")


def test_invalid_utf8_is_a_400_saying_so(client):
    response = post_raw(client, "/v1/chat/completions", b'{"messages": "\xff\xfe"}')
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_unicode" and "UTF-8" in error["message"]


def test_surrogate_pairs_and_escaped_backslashes_are_text(client):
    response = post_raw(client, "/tokenize", b'{"content": "\\ud83d\\ude00 \\\\ud800"}')
    assert response.status_code == 200, response.text
