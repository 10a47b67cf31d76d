"""/v1/embeddings through a real server (the shared one: chat model + packaged all-MiniLM-L6-v2)
with the official openai client."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.helpers.embedding_reference import minilm_reference

EMBED_MODEL = "all-MiniLM-L6-v2"
SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome.",
    "The cat sits outside.",
]


@pytest.fixture(scope="module")
def reference():
    return minilm_reference(SENTENCES)


def vectors(response) -> np.ndarray:
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_default_client_call_matches_sentence_transformers(client, reference):
    # The client asks for base64 by default and decodes it into floats itself.
    response = client.embeddings.create(model=EMBED_MODEL, input=SENTENCES)
    ids, expected = reference
    got = vectors(response)
    assert response.model == EMBED_MODEL and [d.index for d in response.data] == list(range(len(SENTENCES)))
    assert got.shape == (len(SENTENCES), 384)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got @ got.T - expected @ expected.T).max() < 1e-4
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(len(i) for i in ids)


def test_float_and_base64_carry_the_same_values(server, client):
    as_float = client.embeddings.create(model=EMBED_MODEL, input=SENTENCES[:2], encoding_format="float")
    raw = httpx.post(f"{server['url']}/v1/embeddings", timeout=60,
                     json={"model": EMBED_MODEL, "input": SENTENCES[:2], "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert isinstance(raw["data"][0]["embedding"], str)
    assert decoded.tolist() == vectors(as_float).tolist()


def test_token_id_inputs(client, reference):
    ids, expected = reference
    response = client.embeddings.create(model=EMBED_MODEL, input=ids[:2])
    assert np.abs(vectors(response) - expected[:2]).max() < 1e-4
    single = client.embeddings.create(model=EMBED_MODEL, input=ids[0])
    assert np.abs(vectors(single)[0] - expected[0]).max() < 1e-4


def test_concurrent_requests_equal_solo_ones(client, reference):
    _, expected = reference

    def one(i: int) -> np.ndarray:
        return vectors(client.embeddings.create(model=EMBED_MODEL, input=SENTENCES[i]))[0]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, [i % len(SENTENCES) for i in range(12)]))
    for i, got in enumerate(results):
        assert np.abs(got - expected[i % len(SENTENCES)]).max() < 1e-4


def test_models_lists_chat_and_embedding_model(server, model_id):
    cards = httpx.get(f"{server['url']}/v1/models").json()["data"]
    assert [(c["id"], c["kind"]) for c in cards] == [(model_id, "chat"), (EMBED_MODEL, "embedding")]
    assert cards[1]["max_model_len"] == 256


def test_chat_model_embeddings_are_unit_vectors(client, model_id, tokenizer):
    texts = ["The sky is blue.", "Grass is green."]
    response = client.embeddings.create(model=model_id, input=texts, encoding_format="float")
    got = vectors(response)
    assert got.shape == (2, 576) and np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    alone = vectors(client.embeddings.create(model=model_id, input="Grass is green.", encoding_format="float"))
    assert np.abs(alone[0] - got[1]).max() < 1e-4
    assert response.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)


@pytest.mark.parametrize("fields, param", [
    ({"input": "hi", "dimensions": 128}, "dimensions"),
    ({"input": "word " * 300}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [[101, 30522]]}, "input[0]"),
])
def test_bad_requests(client, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_MODEL, **fields)
    assert info.value.status_code == 400 and info.value.body["param"] == param


def test_too_long_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_MODEL, input="word " * 300)
    assert "302 tokens" in info.value.body["message"] and "256 tokens" in info.value.body["message"]


def test_an_openai_model_name_and_the_wrong_kind(client):
    # one embedding model: OpenAI's names are served by it, under its own id
    assert client.embeddings.create(model="text-embedding-3-small", input="hi").model == EMBED_MODEL
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=EMBED_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in info.value.body["message"]


# The session's float32 server serves a random 2-layer BERT as tiny-bert beside the chat model, with
# last-token pooling for the chat model (tests/e2e/conftest.py).
def test_an_explicit_embedding_model_folder(float32_server):
    cards = httpx.get(f"{float32_server}/v1/models").json()["data"]
    assert [(c["kind"], c["max_model_len"]) for c in cards] == [("chat", 2048), ("embedding", 64)]
    body = httpx.post(f"{float32_server}/v1/embeddings", json={"input": ["hello", "world"]}, timeout=60).json()
    assert body["model"] == "tiny-bert" and len(body["data"][0]["embedding"]) == 32
    got = np.array([d["embedding"] for d in body["data"]])
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # no modules.json: mean + normalise
    too_long = httpx.post(f"{float32_server}/v1/embeddings", json={"input": "word " * 70}, timeout=60)
    assert too_long.status_code == 400 and "64 tokens" in too_long.json()["error"]["message"]


def test_chat_embedding_pooling_flag_reaches_the_decoder(float32_server, model_id, default_model):
    from lmserve.embeddings.embedder import DecoderEmbedder
    from lmserve.embeddings.pooling import Pooling

    body = httpx.post(f"{float32_server}/v1/embeddings", timeout=60,
                      json={"model": model_id, "input": "Paris is lovely.", "encoding_format": "float"}).json()
    ids = default_model.tokenizer.encode("Paris is lovely.")
    local = {mode: DecoderEmbedder(default_model.model, None, Pooling(mode, True), 2048).embed([ids])[0]
             for mode in ("last", "mean")}
    got = np.array(body["data"][0]["embedding"])
    assert np.abs(got - local["last"].numpy()).max() < 1e-4 < np.abs(got - local["mean"].numpy()).max()
