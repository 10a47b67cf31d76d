"""/v1/embeddings and the two-model server over ASGI, with a fake chat engine and a fake
embedder behind a real EmbeddingWorker. Responses are parsed with the official openai types."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from openai.types import CreateEmbeddingResponse

from lmserve.embeddings.pooling import Pooling
from lmserve.embeddings.worker import EmbeddingWorker
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine
from tests.helpers.server import MODEL, chat, loading_client, make_client, wait_until

EMBED_MODEL = "tiny-embed"
MAX_INPUT = 8


class FakeEmbedder:
    """Byte tokens ([0] + bytes + 2); vector = unit (length, sum of ids, 1, 0) in float32."""

    dim = 4
    vocab_size = 258
    max_input_tokens = MAX_INPUT
    tokenizer = ByteTokenizer()
    pooling = Pooling("mean", normalize=True)

    def embed(self, batch: list[list[int]]) -> torch.Tensor:
        raw = torch.tensor([[len(ids), sum(ids), 1.0, 0.0] for ids in batch])
        return torch.nn.functional.normalize(raw, dim=1)


def expected(ids: list[int]) -> list[float]:
    return FakeEmbedder().embed([ids])[0].tolist()


@pytest.fixture
def client():
    worker = EmbeddingWorker(FakeEmbedder())
    yield make_client(embedding_model_id=EMBED_MODEL, embedder=worker)
    worker.shutdown()


def embed(client, path="/v1/embeddings", **body):
    return client.post(path, json={"model": EMBED_MODEL, **body})


def assert_error(response, status, param, code=None, text=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    if text is not None:
        assert text in error["message"]
    return error


def test_list_of_strings_in_openai_shape(client):
    response = embed(client, input=["ab", "c"])
    assert response.status_code == 200
    parsed = CreateEmbeddingResponse.model_validate(response.json())
    assert (parsed.object, parsed.model) == ("list", EMBED_MODEL)
    assert [(d.object, d.index) for d in parsed.data] == [("embedding", 0), ("embedding", 1)]
    ab, c = [0, 99, 100], [0, 101]  # BOS + byte + 2
    assert np.allclose(parsed.data[0].embedding, expected(ab)) and np.allclose(parsed.data[1].embedding, expected(c))
    assert (parsed.usage.prompt_tokens, parsed.usage.total_tokens) == (5, 5)
    assert set(response.json()) == {"object", "data", "model", "usage"}
    assert set(response.json()["usage"]) == {"prompt_tokens", "total_tokens"}


@pytest.mark.parametrize("value, ids", [
    ("ab", [[0, 99, 100]]),
    ([5, 6, 7], [[5, 6, 7]]),  # token ids are taken as given: no BOS added
    ([[5], [6, 7]], [[5], [6, 7]]),
])
def test_every_input_form(client, value, ids):
    data = embed(client, input=value).json()["data"]
    assert [np.allclose(d["embedding"], expected(i)) for d, i in zip(data, ids)] == [True] * len(ids)
    assert len(data) == len(ids)


def test_base64_is_the_same_little_endian_float32_values(client):
    floats = embed(client, input=["ab", "xyz"], encoding_format="float").json()["data"]
    encoded = embed(client, input=["ab", "xyz"], encoding_format="base64").json()["data"]
    assert len(floats) == len(encoded) == 2
    for f, e in zip(floats, encoded):
        decoded = np.frombuffer(base64.b64decode(e["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.float32(f["embedding"]).tolist()


def test_route_without_prefix_and_default_model(client):
    response = client.post("/embeddings", json={"input": "ab"})
    assert response.status_code == 200 and response.json()["model"] == EMBED_MODEL


def test_dimensions_other_than_native_are_refused(client):
    assert embed(client, input="a", dimensions=4).status_code == 200
    error = assert_error(embed(client, input="a", dimensions=2), 400, "dimensions")
    assert "4" in error["message"] and "2" in error["message"]


def test_too_long_input_names_both_numbers(client):
    error = assert_error(embed(client, input=["ok", "x" * MAX_INPUT]), 400, "input[1]", "context_length_exceeded")
    assert f"{MAX_INPUT + 1} tokens" in error["message"] and f"{MAX_INPUT} tokens" in error["message"]
    assert embed(client, input="x" * (MAX_INPUT - 1)).status_code == 200  # BOS + 7 bytes is the limit


@pytest.mark.parametrize("value, param", [
    ("", "input"), ([], "input"), ([""], "input[0]"), (["a", ""], "input[1]"), ([[1], []], "input[1]"),
])
def test_empty_inputs_are_refused(client, value, param):
    assert_error(embed(client, input=value), 400, param, text="empty")


@pytest.mark.parametrize("value, param", [([258], "input"), ([[1], [-1]], "input[1]")])
def test_out_of_vocabulary_token_ids_are_refused(client, value, param):
    assert_error(embed(client, input=value), 400, param, text="out of range")


@pytest.mark.parametrize("body, param", [
    ({"input": 5}, "input"), ({"input": [1.5]}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
])
def test_malformed_bodies_are_400(client, body, param):
    assert_error(embed(client, **body), 400, param)


def test_too_many_inputs_are_refused(client):
    assert_error(embed(client, input=["a"] * 2049), 400, "input", text="2048")


def test_an_openai_embedding_name_is_served_by_the_one_embedding_model(client):
    body = embed(client, input="a", model="text-embedding-3-small").json()
    assert body["model"] == EMBED_MODEL and body["data"][0]["embedding"] == expected([0, 2 + ord("a")])


def test_chat_routes_refuse_the_embedding_model(client):
    error = assert_error(chat(client, model=EMBED_MODEL), 400, "model", "model_not_supported")
    assert "embedding model" in error["message"]
    assert chat(client).status_code == 200  # the chat model still answers


def test_models_lists_both_with_their_kind(client):
    cards = client.get("/v1/models").json()["data"]
    assert [(c["id"], c["kind"], c["max_model_len"]) for c in cards] == [(MODEL, "chat", 64),
                                                                         (EMBED_MODEL, "embedding", MAX_INPUT)]
    assert client.get(f"/v1/models/{EMBED_MODEL}").json()["kind"] == "embedding"
    assert client.get("/models").json()["data"][0]["object"] == "model"


def test_health_waits_for_the_embedding_model_and_embeddings_answer_503():
    with loading_client(FakeEngine(), embedding_model_id=EMBED_MODEL) as (client, loader):
        assert client.get("/health").status_code == 503
        assert_error(embed(client, input="a"), 503, None, "model_loading")
        assert chat(client).status_code == 200  # the chat model is not held back
        worker = EmbeddingWorker(FakeEmbedder())
        loader.finish(EMBED_MODEL, worker)
        wait_until(lambda: client.get("/health").status_code == 200)
        assert embed(client, input="a").status_code == 200
    assert not worker._thread.is_alive()  # the server's end unloaded it


def test_without_an_embedding_model_only_the_chat_model_is_listed():
    client = make_client()
    assert [c["id"] for c in client.get("/v1/models").json()["data"]] == [MODEL]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/embedding", "/embeddings"])
def test_llama_cpps_content_form_answers_in_its_shape(client, path):
    response = embed(client, path=path, content=["ab", "c"])
    assert response.status_code == 200
    body = response.json()
    assert [item["index"] for item in body] == [0, 1]
    assert np.allclose(body[1]["embedding"], [expected([0, 2 + ord("c")])], atol=1e-6)


@pytest.mark.parametrize("norm", [0, 1, 2, 3])
def test_embd_normalize_against_numpy(client, norm):
    raw = np.array(expected([0, 2 + ord("a"), 2 + ord("b")]))
    reference = {0: raw / (np.abs(raw).max() / 32760.0), 1: raw / np.abs(raw).sum(),
                 2: raw / np.linalg.norm(raw), 3: raw / (np.abs(raw) ** 3).sum() ** (1 / 3)}[norm]
    [item] = embed(client, path="/embedding", content="ab", embd_normalize=norm).json()
    assert np.allclose(item["embedding"][0], reference, rtol=1e-5)


def test_raw_vectors_of_a_normalising_model_are_refused_by_name(client):
    assert_error(embed(client, path="/embedding", content="ab", embd_normalize=-1), 400, "embd_normalize",
                 code="unsupported_parameter")


def test_input_or_content_one_of_them(client):
    assert_error(embed(client, input="a", content="b"), 400, "input")
    assert_error(client.post("/v1/embeddings", json={"model": EMBED_MODEL}), 400, "input")
