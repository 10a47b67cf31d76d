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
    assert chat(client, n=0).status_code == 400 and leases(client) == 0  # refused: released too


def test_models_are_listed_with_their_status_and_aliases():
    client = make_client(more_models={"second": FakeEngine()})
    cards = client.get("/v1/models").json()["data"]
    assert [(c["id"], c["kind"], c["status"], c["max_model_len"]) for c in cards] == [
        (MODEL, "chat", {"value": "loaded", "error": None}, 64),
        ("second", "chat", {"value": "loaded", "error": None}, 64)]


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
