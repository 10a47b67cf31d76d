"""The server's sampling defaults (llama-server's --temp, -n ...) under each model's own, as requests
and GET /props see them; a default max_tokens ends at the context's end; --embedding's 501."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lmserve.config import EngineConfig
from lmserve.fleet.catalogue import Catalogue, ModelEntry
from lmserve.fleet.fleet import Fleet
from lmserve.server.app import create_app
from lmserve.server.state import ServerState
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import MODEL, chat, wrap

SERVER_DEFAULTS = {"temperature": 0.2, "top_k": 40, "max_tokens": 1000, "seed": 7}


def client_of(engine: FakeEngine, own_defaults: dict | None = None, server_defaults: dict = SERVER_DEFAULTS,
              **state_fields) -> TestClient:
    entry = ModelEntry(id=MODEL, source="/models/tiny.gguf", defaults=own_defaults or {})
    catalogue = Catalogue([entry], sampling_defaults=server_defaults)
    fleet = Fleet(catalogue, lambda e, progress: wrap(e, engine))
    fleet.adopt(MODEL, wrap(catalogue.resolve(MODEL), engine))
    return TestClient(create_app(ServerState(fleet, **state_fields)))


def test_the_servers_defaults_lie_under_the_models_own_and_the_requests_values():
    engine = FakeEngine()
    client = client_of(engine, own_defaults={"temperature": 0.9})
    chat(client)
    params = engine.calls[-1][2]
    assert (params.temperature, params.top_k, params.seed) == (0.9, 40, 7)  # the model's own temperature wins
    chat(client, top_k=5, seed=1)
    assert (engine.calls[-1][2].top_k, engine.calls[-1][2].seed) == (5, 1)  # the request's win over both


# A default, what the request sends of the same setting under another name, and what it runs with.
SYNONYMS = [
    ({"repeat_penalty": 1.5}, {"repetition_penalty": 1.2}, "repetition_penalty repetition_window", (1.2, 0)),
    ({"repetition_penalty": 1.5}, {"repeat_penalty": 1.2}, "repetition_penalty repetition_window", (1.2, 64)),
    ({"repeat_last_n": 32}, {"repetition_penalty": 1.2, "repetition_context_size": 8}, "repetition_window", 8),
    ({"min_tokens": 4}, {"min_new_tokens": 2}, "min_tokens", 2),
    ({"max_tokens": 1000}, {"n_predict": 3}, "max_tokens", 3),
    ({"n_predict": 5}, {"max_tokens": 3}, "max_tokens", 3),
]


@pytest.mark.parametrize("default, sent, fields, expected", SYNONYMS, ids=[next(iter(d)) for d, *_ in SYNONYMS])
def test_a_default_gives_way_to_the_same_setting_sent_under_another_name(default, sent, fields, expected):
    for defaults in ({"server_defaults": default}, {"own_defaults": default}):
        engine = FakeEngine()
        response = chat(client_of(engine, **defaults), **sent)
        assert response.status_code == 200, response.text  # not a 400 for two names that disagree
        params = engine.calls[-1][2]
        ran = tuple(getattr(params, field) for field in fields.split())
        assert ran == (expected if isinstance(expected, tuple) else (expected,))


def test_a_models_own_default_replaces_the_servers_under_any_name():
    entries = [ModelEntry(id="c", source="/c.gguf", defaults={"repetition_penalty": 1.1, "n_predict": 8})]
    catalogue = Catalogue(entries, sampling_defaults={"repeat_penalty": 1.5, "max_tokens": 100, "top_k": 40})
    assert catalogue.entries()[0].defaults == {"repetition_penalty": 1.1, "n_predict": 8, "top_k": 40}


def test_a_requests_own_llama_cpp_samplers_win_over_the_servers():
    engine = FakeEngine()
    client = client_of(engine, server_defaults={"repeat_penalty": 1.5, "repeat_last_n": 32, "mirostat": 2})
    chat(client)
    params = engine.calls[-1][2]
    assert (params.repetition_penalty, params.repetition_window, params.chain.mirostat) == (1.5, 32, 2)
    chat(client, repeat_penalty=1.1, mirostat=0)
    params = engine.calls[-1][2]
    assert (params.repetition_penalty, params.repetition_window, params.chain) == (1.1, 32, None)


def test_a_requests_own_order_without_penalties_gets_no_default_penalty():
    engine = FakeEngine()
    client = client_of(engine, server_defaults={"repeat_penalty": 1.5, "presence_penalty": 0.5, "top_k": 40})
    response = chat(client, samplers=["top_k", "temperature"])
    assert response.status_code == 200, response.text  # as llama.cpp: the order decides whether penalties run
    params = engine.calls[-1][2]
    assert (params.repetition_penalty, params.presence_penalty, params.top_k) == (1.0, 0.0, 40)
    chat(client, samplers="ekt")
    assert (engine.calls[-1][2].repetition_penalty, engine.calls[-1][2].presence_penalty) == (1.5, 0.5)


def test_a_requests_own_penalty_runs_first_under_a_default_order_that_leaves_penalties_out():
    for order in (["top_k", "temperature"], "kt"):
        engine = FakeEngine()
        client = client_of(engine, server_defaults={"samplers": order})
        response = chat(client, frequency_penalty=0.5)
        assert response.status_code == 200, response.text  # not a 400 for the server's order
        params = engine.calls[-1][2]
        assert (params.frequency_penalty, params.chain.order) == (0.5, ("top_k", "temperature"))


def test_embedding_models_get_no_sampling_defaults():
    entries = [ModelEntry(id="e", source="/models/e", kind="embedding"), ModelEntry(id="c", source="/c.gguf")]
    catalogue = Catalogue(entries, sampling_defaults={"temperature": 0.2})
    assert [e.defaults for e in catalogue.entries()] == [{}, {"temperature": 0.2}]


def test_a_default_max_tokens_ends_at_the_contexts_end_and_a_requested_one_is_checked():
    engine = FakeEngine(reply="x" * 80, max_model_len=64)
    client = client_of(engine)
    body = chat(client).json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert engine.calls[-1][2].max_tokens == 64 - prompt_tokens  # not 1000, and not refused
    assert body["choices"][0]["finish_reason"] == "length"
    refused = chat(client, max_tokens=1000).json()["error"]
    assert (refused["param"], refused["code"]) == ("max_tokens", "context_length_exceeded")
    chat(client, max_completion_tokens=3)
    assert engine.calls[-1][2].max_tokens == 3  # the client's own limit, under either name


def props_params(own_defaults: dict | None = None, server_defaults: dict = SERVER_DEFAULTS) -> dict:
    engine = FakeEngine()
    engine.config = EngineConfig("/models/tiny.gguf", MODEL)
    props = client_of(engine, own_defaults, server_defaults).get("/props").json()
    return props["default_generation_settings"]["params"]


def test_props_shows_what_a_request_gets_in_llama_cpps_names():
    params = props_params(own_defaults={"stop": "END", "repetition_penalty": 1.1})
    assert (params["temperature"], params["top_k"], params["top_p"], params["seed"]) == (0.2, 40, 1.0, 7)
    assert (params["repeat_penalty"], params["repeat_last_n"]) == (1.1, -1)  # vLLM's: over the whole context
    assert (params["n_predict"], params["max_tokens"], params["stop"]) == (1000, 1000, ["END"])


LLAMA_CPP_SAMPLERS = ["repeat_penalty", "repeat_last_n", "top_n_sigma", "xtc_probability", "xtc_threshold",
                      "typical_p", "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
                      "dry_sequence_breakers", "dynatemp_range", "dynatemp_exponent", "mirostat", "mirostat_tau",
                      "mirostat_eta", "samplers"]


def test_props_shows_lmserves_own_llama_cpp_sampler_settings_when_nothing_is_set():
    params = props_params(server_defaults={})
    assert {name: params[name] for name in LLAMA_CPP_SAMPLERS} == {
        "repeat_penalty": 1.0, "repeat_last_n": 64, "top_n_sigma": -1.0, "xtc_probability": 0.0, "xtc_threshold": 0.1,
        "typical_p": 1.0, "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n", ":", '"', "*"], "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
        "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "samplers": []}
    assert (params["seed"], params["n_predict"]) == (-1, -1)


def test_props_shows_the_servers_llama_cpp_sampler_defaults():
    server = {"repeat_penalty": 1.5, "repeat_last_n": 32, "top_n_sigma": 1.5, "xtc_probability": 0.5,
              "xtc_threshold": 0.2, "typical_p": 0.9, "dry_multiplier": 0.8, "dry_base": 2.0, "dry_allowed_length": 3,
              "dry_penalty_last_n": 128, "dry_sequence_breakers": ["###"], "dynatemp_range": 0.5,
              "dynatemp_exponent": 2.0, "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "samplers": "ekyt"}
    params = props_params(server_defaults=server)
    assert {name: params[name] for name in LLAMA_CPP_SAMPLERS} == server | {
        "samplers": ["penalties", "top_k", "typ_p", "temperature"]}  # in llama.cpp's names
    named = props_params(server_defaults={"samplers": ["Top-K", "nucleus", "temp"]})
    assert named["samplers"] == ["top_k", "top_p", "temperature"]


def test_an_embeddings_only_server_answers_generation_with_501():
    client = client_of(FakeEngine(), embeddings_only=True)
    for response in (chat(client), client.post("/v1/completions", json={"prompt": "hi"})):
        assert response.status_code == 501
        assert response.json()["error"]["code"] == "embeddings_only"
    assert client.post("/tokenize", json={"content": "hi"}).status_code == 200
