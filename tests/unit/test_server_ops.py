"""/tokenize, /detokenize, /props and /metrics over ASGI, against the fake engine."""

from __future__ import annotations

import pytest

from lmserve.config import EngineConfig, SchedulerConfig
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine
from tests.helpers.prometheus import metric_samples
from tests.helpers.server import MODEL, chat, loading_client, make_client

TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def ops_engine() -> FakeEngine:
    """The fake engine with a chat template, and the config /props reads."""
    engine = FakeEngine(tokenizer=ByteTokenizer(chat_template=TEMPLATE))
    engine.config = EngineConfig("/models/tiny.gguf", MODEL, scheduler=SchedulerConfig(max_num_seqs=7))
    return engine


@pytest.fixture
def client():
    return make_client(ops_engine())


# ---------------------------------------------------------------- tokenize / detokenize


@pytest.mark.parametrize("path", ["/tokenize", "/v1/tokenize"])
def test_tokenize_ids_and_round_trip(client, path):
    response = client.post(path, json={"content": "Hé"})
    assert response.status_code == 200
    assert response.json() == {"tokens": [ord("H") + 2, 0xC3 + 2, 0xA9 + 2]}
    back = client.post(path.replace("tokenize", "detokenize"), json={"tokens": response.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"content": "Hé"}


def test_tokenize_add_special_puts_bos_first_and_detokenize_keeps_it(client):
    tokens = client.post("/tokenize", json={"content": "a", "add_special": True}).json()["tokens"]
    assert tokens == [0, ord("a") + 2]
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": "<s>a"}


def test_tokenize_with_pieces_gives_bytes_for_partial_utf8(client):
    response = client.post("/tokenize", json={"content": "aé", "with_pieces": True, "model": MODEL})
    assert response.json() == {"tokens": [
        {"id": ord("a") + 2, "piece": "a"},
        {"id": 0xC3 + 2, "piece": [0xC3]},
        {"id": 0xA9 + 2, "piece": [0xA9]},
    ]}


def test_tokenize_refuses_text_that_is_not_unicode(client):
    # JSON may carry a lone surrogate; it cannot be encoded as UTF-8, so it is the client's error
    response = client.post("/tokenize", content=b'{"content": "a\\ud800b"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "content"


@pytest.mark.parametrize("tokens", [[5, 258], [-1], [3, 1_000_000]])
def test_detokenize_refuses_ids_outside_the_vocabulary(client, tokens):
    response = client.post("/detokenize", json={"tokens": tokens})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_token_id"
    assert error["param"] == f"tokens[{len(tokens) - 1}]"


def test_token_routes_check_types_model_and_parse_special(client):
    assert client.post("/detokenize", json={"tokens": ["a"]}).status_code == 400
    assert client.post("/tokenize", json={}).json()["error"]["param"] == "content"
    assert client.post("/tokenize", json={"content": "a", "model": "other"}).status_code == 200  # the one model
    assert client.post("/tokenize", json={"content": "a</s>"}).json() == {"tokens": [99, 1]}
    assert client.post("/tokenize", json={"content": "a</s>", "parse_special": False}).json() == {
        "tokens": [99, *(b + 2 for b in b"</s>")]}


def test_token_routes_answer_503_while_loading():
    with loading_client() as (client, _):
        assert client.post("/tokenize", json={"content": "a"}).status_code == 503
        assert client.get("/props").status_code == 503


# ---------------------------------------------------------------- props


def test_props_are_the_engine_settings(client):
    props = client.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 64
    assert props["total_slots"] == 7
    assert props["model_path"] == "/models/tiny.gguf"
    assert props["chat_template"] == TEMPLATE
    assert (props["bos_token"], props["eos_token"]) == ("<s>", "</s>")
    assert props["build_info"].startswith("lmserve ")
    params = props["default_generation_settings"]["params"]
    assert (params["temperature"], params["top_p"], params["top_k"], params["repeat_penalty"]) == (1.0, 1.0, 0, 1.0)


def test_props_shows_the_chatml_fallback_when_the_model_has_no_template():
    engine = ops_engine()
    engine.tokenizer.chat_template = None
    props = make_client(engine).get("/props").json()
    assert "<|im_start|>" in props["chat_template"]


def test_model_card_by_id(client):
    assert client.get(f"/v1/models/{MODEL}").json()["max_model_len"] == 64
    assert client.get("/v1/models/nope").status_code == 404


# ---------------------------------------------------------------- metrics


def test_metrics_count_http_requests_by_route_and_status(client):
    chat(client)
    chat(client)
    client.post("/v1/chat/completions", json={"messages": []})
    client.get(f"/v1/models/{MODEL}")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)

    def count(route, status, method="POST"):
        key = ("lmserve:http_requests_total", (("method", method), ("route", route), ("status", status)))
        return samples.get(key, 0)

    assert count("/v1/chat/completions", "200") == 2
    assert count("/v1/chat/completions", "400") == 1
    assert count("/v1/models/{model_id}", "200", "GET") == 1


def test_metrics_label_unknown_http_methods_as_other(client):
    # the method is the client's choice: each new one must not add label sets without end
    for method in ("FOO1", "FOO2", "FOO3"):
        assert client.request(method, "/v1/models").status_code == 405
    samples = metric_samples(client.get("/metrics").text)
    methods = {dict(labels)["method"] for name, labels in samples if name == "lmserve:http_requests_total"}
    assert methods == {"other"}


def test_metrics_gauges_come_from_the_engine_snapshot(client):
    samples = metric_samples(client.get("/metrics").text)
    assert samples[("lmserve:num_requests_running", (("model", MODEL),))] == 0
    assert samples[("lmserve:kv_cache_usage_perc", (("model", MODEL),))] == 0.0  # the fake has 8 of 8 blocks free


def test_each_app_has_its_own_registry():
    first, second = (make_client(ops_engine()) for _ in range(2))
    chat(first)
    key = ("lmserve:http_requests_total", (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200")))
    assert metric_samples(first.get("/metrics").text)[key] == 1
    assert key not in metric_samples(second.get("/metrics").text)
