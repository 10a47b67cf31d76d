"""`lmserve serve --api-key`: both header styles, OpenAI's 401 shape, public health and docs."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers.live_server import KEYS

KEY = KEYS[0]  # the session's keyed_server (tests/e2e/conftest.py) takes KEY and "second-key"


def test_both_header_styles_and_every_key_work(keyed_server):
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": KEY}, {"Authorization": "Bearer second-key"}):
        assert httpx.get(f"{keyed_server}/v1/models", headers=headers).status_code == 200
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key=KEY, max_retries=0)
    reply = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=2,
                                      temperature=0)
    assert reply.choices[0].text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"},
                                     {"Authorization": KEY}])
def test_missing_or_wrong_key_is_401(keyed_server, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/completions")):
        response = httpx.request(method, f"{keyed_server}{path}", headers=headers, json={"prompt": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_official_client_with_a_wrong_key_raises_authentication_error(keyed_server):
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_health_and_docs_need_no_key(keyed_server):
    assert httpx.get(f"{keyed_server}/health").status_code == 200
    assert httpx.get(f"{keyed_server}/docs").status_code == 200
    assert httpx.get(f"{keyed_server}/openapi.json").status_code == 200
