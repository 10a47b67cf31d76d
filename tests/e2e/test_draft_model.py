"""`lmserve serve --draft-model` end to end: the packaged model in float32 drafted by its own int4
copy answers every request as the float32 server without drafts does, streamed or not, and
/metrics counts the drafts it kept."""

from __future__ import annotations

import httpx
import openai
import pytest

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server
from tests.helpers.prometheus import metric_samples

PROMPTS = ["Write a haiku about the sea.", "List three prime numbers and explain why each is prime."]


@pytest.fixture(scope="module")
def drafted():
    proc, url, _ = start_server("--dtype", "float32", "--no-embedding-model", "-md", str(default_model_path()),
                                "--draft-dtype", "int4")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_drafted_server_answers_as_the_plain_float32_one(drafted, float32_client):
    client = openai.OpenAI(base_url=f"{drafted}/v1", api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    for prompt in PROMPTS:
        request = dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=48)
        expected = float32_client.chat.completions.create(**request).choices[0].message.content
        assert client.chat.completions.create(**request).choices[0].message.content == expected
        streamed = client.chat.completions.create(**request, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected
    samples = metric_samples(httpx.get(f"{drafted}/metrics").text)
    accepted = samples[("lmserve:spec_decode_num_accepted_tokens_total", (("model", model),))]
    drafts = samples[("lmserve:spec_decode_num_draft_tokens_total", (("model", model),))]
    assert 0 < drafts and drafts / 2 < accepted <= drafts  # the int4 copy mostly agrees with float32
