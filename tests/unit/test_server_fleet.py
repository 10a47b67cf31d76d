"""The server over a fleet of models: requests hold their model until their last byte, models
are listed with their status, and POST /models/load and /models/unload act on them."""

from __future__ import annotations

from lmserve.config import EngineConfig
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import MODEL, chat, make_client, served_state, wait_until


def leases(client, model_id=MODEL) -> int:
    return next(slot.leases for slot in served_state(client).fleet.slots() if slot.entry.id == model_id)


def test_a_request_holds_its_model_until_its_response_is_done():
    client = make_client()
    assert chat(client).status_code == 200 and leases(client) == 0
    assert chat(client, stream=True).status_code == 200 and leases(client) == 0
    assert chat(client, max_tokens=500).status_code == 400 and leases(client) == 0  # refused by the plan: released


def test_models_are_listed_with_their_status_and_aliases():
    client = make_client(more_models={"second": FakeEngine()})
    cards = client.get("/v1/models").json()["data"]
    assert [(c["id"], c["kind"], c["status"], c["max_model_len"]) for c in cards] == [
        (MODEL, "chat", {"value": "loaded", "error": None, "progress": None}, 64),
        ("second", "chat", {"value": "loaded", "error": None, "progress": None}, 64)]


def test_unload_then_load_by_route():
    engine = FakeEngine()
    client = make_client(engine)
    assert client.post("/models/unload", json={"model": MODEL}).json() == {"success": True}
    assert engine.closed and client.get(f"/v1/models/{MODEL}").json()["status"]["value"] == "unloaded"
    assert client.post("/models/unload", json={"model": MODEL}).json() == {"success": False}  # not loaded
    assert client.post("/v1/models/load", json={"model": MODEL}).json() == {"success": True}
    assert client.get(f"/v1/models/{MODEL}").json()["status"]["value"] == "loaded"
    assert chat(client).status_code == 200


def test_load_and_unload_of_an_unknown_model_are_404():
    client = make_client()
    for route in ("/models/load", "/models/unload"):
        response = client.post(route, json={"model": "gpt-4"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert client.post("/models/load", json={}).status_code == 400


def test_props_names_its_model_when_there_are_several():
    second = FakeEngine(max_model_len=32)
    second.config = EngineConfig("/models/second.gguf", "second")  # what /props reads of an engine
    client = make_client(more_models={"second": second})
    assert client.get("/props?model=second").json()["default_generation_settings"]["n_ctx"] == 32
    assert client.get("/props").status_code == 404  # which one? the message lists them


def test_keep_alive_is_ollamas_and_a_pinned_model_refuses_to_be_unloaded_by_it():
    second = FakeEngine()
    client = make_client(more_models={"second": second})
    assert chat(client, model="second", keep_alive=0).status_code == 200  # unload after this request
    wait_until(lambda: second.closed)
    assert client.get("/v1/models/second").json()["status"]["value"] == "unloaded"
    assert chat(client, model="second", keep_alive="5m").status_code == 200  # loads it again
    assert client.get("/v1/models/second").json()["status"]["value"] == "loaded"
    assert chat(client, keep_alive=-1).status_code == 200  # the pinned model: "keep loaded" agrees
    error = chat(client, keep_alive="5m").json()["error"]
    assert (error["param"], error["code"]) == ("keep_alive", "model_pinned")
    error = chat(client, model="second", keep_alive="soon").json()["error"]
    assert error["param"] == "keep_alive" and "not a duration" in error["message"]
    assert leases(client) == 0 and leases(client, "second") == 0


def test_the_status_document_and_lmserve_ps_table():
    from lmserve.cli import ps_table

    second = FakeEngine()
    client = make_client(more_models={"second": second})
    page = client.get("/", headers={"Accept": "text/html"})  # a browser gets the chat page
    assert page.headers["content-type"].startswith("text/html") and '<select id="model"' in page.text
    assert chat(client, model="second", keep_alive="90s").status_code == 200
    document = client.get("/", headers={"Accept": "application/json"}).json()
    assert document["status"] == "ok"
    first, other = document["models"]
    assert (first["id"], first["status"], first["pinned"], first["requests"], first["unloads_in_seconds"]) == (
        MODEL, "loaded", True, 0, None)
    assert other["id"] == "second" and 85 <= other["unloads_in_seconds"] <= 90
    assert set(other) >= {"running", "waiting", "memory_mib", "loaded_seconds", "aliases", "error", "kind"}
    client.post("/models/unload", json={"model": "second"})
    table = ps_table(client.get("/").json()["models"], everything=True).splitlines()
    assert table[0].split() == ["NAME", "KIND", "STATUS", "MEMORY", "REQUESTS", "UNLOADS"]
    assert table[1].split() == [MODEL, "chat", "loaded", "0", "MiB", "0", "never"]
    assert table[2].split() == ["second", "chat", "unloaded", "-", "0", "-"]
    assert len(ps_table(client.get("/").json()["models"]).splitlines()) == 2  # loaded ones only


def test_a_models_defaults_fill_what_a_request_leaves_out():
    from fastapi.testclient import TestClient

    from lmserve.fleet.catalogue import Catalogue, ModelEntry
    from lmserve.fleet.fleet import Fleet
    from lmserve.server.app import create_app
    from lmserve.server.state import ServerState
    from tests.helpers.server import wrap

    engine = FakeEngine(reply="abcdef")
    entry = ModelEntry(id=MODEL, source="/models/tiny.gguf", defaults={"max_tokens": 2, "temperature": 0.0})
    fleet = Fleet(Catalogue([entry]), lambda e, progress: wrap(e, engine))
    fleet.adopt(MODEL, wrap(entry, engine))
    client = TestClient(create_app(ServerState(fleet)))
    defaulted = chat(client).json()
    assert defaulted["usage"]["completion_tokens"] == 2 and defaulted["choices"][0]["finish_reason"] == "length"
    assert engine.calls[-1][2].temperature == 0.0
    assert chat(client, max_tokens=4, temperature=0.5).json()["usage"]["completion_tokens"] == 4  # the request wins
    assert engine.calls[-1][2].temperature == 0.5


def test_a_model_bigger_than_the_memory_budget_is_a_400():
    from fastapi.testclient import TestClient

    from lmserve.fleet.catalogue import Catalogue, ModelEntry
    from lmserve.fleet.fleet import Fleet
    from lmserve.server.app import create_app
    from lmserve.server.state import ServerState
    from tests.helpers.server import wrap

    entry = ModelEntry(id=MODEL, source="/models/tiny.gguf")
    fleet = Fleet(Catalogue([entry]), lambda e, progress: wrap(e, FakeEngine()), max_memory=2**30, footprint=lambda e: 2**31)
    error = chat(TestClient(create_app(ServerState(fleet)))).json()["error"]
    assert (error["code"], error["param"]) == ("model_too_large", "model")
    assert "2048 MiB" in error["message"] and "1024 MiB" in error["message"]


def test_a_model_whose_engine_fails_leaves_the_others_serving():
    client = make_client(FakeEngine(fail_after=0), more_models={"second": FakeEngine()},
                         raise_server_exceptions=False)
    failed = chat(client)
    assert failed.status_code == 500 and "device fell over" not in failed.json()["error"]["message"]
    assert chat(client, model="second").status_code == 200
    assert chat(client, model="second", stream=True).status_code == 200
    assert leases(client) == 0 and leases(client, "second") == 0
