"""errors.py and auth.py: error bodies, validation messages, key checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers

from lmserve.server.errors import error_param, validation_error
from lmserve.server.middleware.auth import key_matches, presented_key
from lmserve.server.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "temperature"), "temperature"),
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "stop", "str"), "stop"),
        (("body", "stop", "list[str]", 2), "stop[2]"),
        (("body", "messages", 1, "content", "list[ContentPart]", 0, "type"), "messages[1].content[0].type"),
        (("body", "logit_bias", "50256"), "logit_bias.50256"),
        (("body",), None),
    ],
)
def test_error_param_paths(loc, param):
    assert error_param(loc) == param


def validation_errors(model, body) -> list[dict]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]


def test_validation_error_messages():
    error = validation_error(validation_errors(ChatCompletionRequest, {"messages": []}))
    assert (error.status_code, error.param) == (400, "messages")
    assert error.message.startswith("Invalid value for 'messages'")
    assert (
        validation_error(
            validation_errors(ChatCompletionRequest, {"messages": [{"role": "user"}], "n": 0})
        ).param
        == "n"
    )
    missing = validation_error(validation_errors(CompletionRequest, {}))
    assert missing.param == "prompt" and missing.message == "Missing required parameter: 'prompt'."
    body = validation_error(
        [
            {
                "type": "json_invalid",
                "loc": ("body", 5),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            }
        ]
    )
    assert body.param is None and body.message == "malformed JSON body: Expecting value"
    assert body.body()["error"] == {
        "message": body.message,
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_presented_key_and_matching():
    assert presented_key(Headers({"Authorization": "Bearer abc"})) == "abc"
    assert presented_key(Headers({"authorization": "bearer  abc "})) == "abc"
    assert presented_key(Headers({"X-Api-Key": "xyz"})) == "xyz"
    assert presented_key(Headers({"Authorization": "Basic abc"})) is None
    assert key_matches("abc", ("zzz", "abc")) and not key_matches("ab", ("abc",))
    assert not key_matches(None, ("abc",))
