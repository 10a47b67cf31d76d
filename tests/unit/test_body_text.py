"""Strings a JSON body cannot carry as text (lone surrogates, invalid UTF-8): a 400 naming the
field on every route, before the route sees them."""

from __future__ import annotations

import json

import pytest

from lmserve.server.requests.body_text import MAX_BODY_DEPTH, body_problem
from tests.helpers.server import MODEL, make_client

LONE = "\ud800"
HELLO = [{"role": "user", "content": "hi"}]


SURROGATE = "not valid Unicode text (it holds a lone surrogate, U+{:04X})"


@pytest.mark.parametrize(("value", "where"), [
    ("fine", None),
    ("an emoji 😀 is a pair, not a lone surrogate", None),
    (LONE, ((), SURROGATE.format(0xD800))),
    ({"a": [1, {"b": "x\udfff"}]}, (("a", 1, "b"), SURROGATE.format(0xDFFF))),
    ({"a": "ok", "k\udc00": 1}, ((), "not valid Unicode text (a key holds a lone surrogate, U+DC00)")),
    ([[], ["", "\ud83d"], "\udc00"], ((1, 1), SURROGATE.format(0xD83D))),  # the first in order
    ({"n": 1.5, "b": True, "z": None}, None),
])
def test_body_problem_finds_lone_surrogates(value, where):
    assert body_problem(value) == where


def nested(levels: int):
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_body_problem_bounds_nesting():
    assert body_problem({"a": nested(MAX_BODY_DEPTH - 1)}) is None
    loc, what = body_problem({"a": nested(MAX_BODY_DEPTH)})
    assert loc == ("a", *[0] * (MAX_BODY_DEPTH - 1)) and str(MAX_BODY_DEPTH) in what


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


def test_a_body_nested_too_deeply_is_a_400_naming_where(client):
    body = {"messages": HELLO, "chat_template_kwargs": {"x": nested(MAX_BODY_DEPTH)}}
    error = post_raw(client, "/v1/chat/completions", body).json()["error"]
    assert error["code"] == "nested_too_deeply" and error["param"].startswith("chat_template_kwargs.x[0][0]")


@pytest.mark.parametrize(("body", "what"), [
    (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"messages": "hi", "n": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"messages": "hi", ', "JSON"),
])
def test_bodies_json_cannot_read_say_why(client, body, what):
    response = post_raw(client, "/v1/chat/completions", body)
    assert response.status_code == 400 and what in response.json()["error"]["message"]
