"""llama.cpp's slots over a stand-in engine: which slot a sequence runs in, GET /slots, and the
save / restore / erase routes with their refusals."""

from __future__ import annotations

import pytest

from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import chat, make_client


@pytest.fixture
def engine():
    return FakeEngine(reply="Hey")


def test_a_sequence_runs_in_the_slot_it_names_and_the_slot_remembers_it(engine, tmp_path):
    client = make_client(engine, slot_save_path=tmp_path)
    body = client.post("/completion", json={"prompt": "hi", "id_slot": 2}).json()
    assert body["id_slot"] == 2
    slots = client.get("/slots").json()
    assert [slot["id"] for slot in slots] == [0, 1, 2, 3]  # the engine's max_num_seqs
    assert slots[2]["n_prompt_tokens"] == 3 and slots[2]["next_token"]["n_decoded"] == 3
    assert not any(slot["is_processing"] for slot in slots)
    assert slots[0]["n_prompt_tokens"] == 0


def test_without_id_slot_the_first_free_slot_is_taken(engine):
    assert make_client(engine).post("/completion", json={"prompt": "hi"}).json()["id_slot"] == 0


def test_save_restore_erase(engine, tmp_path):
    client = make_client(engine, slot_save_path=tmp_path)
    client.post("/completion", json={"prompt": "hi", "id_slot": 1})
    saved = client.post("/slots/1?action=save", json={"filename": "s.bin"}).json()
    assert (saved["id_slot"], saved["filename"], saved["n_saved"]) == (1, "s.bin", 6)
    assert saved["n_written"] == (tmp_path / "s.bin").stat().st_size and "save_ms" in saved["timings"]
    restored = client.post("/slots/0?action=restore", json={"filename": "s.bin"}).json()
    assert restored["n_restored"] == 6 and engine.restored == [0, 2 + ord("h"), 2 + ord("i"), *(2 + b for b in b"Hey")]
    erased = client.post("/slots/1?action=erase").json()
    assert erased == {"id_slot": 1, "n_erased": 6} and len(engine.forgotten) == 6


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", " a", "a\\b", "c:d", "a\x01"])
def test_a_filename_that_leaves_the_folder_is_refused(engine, tmp_path, name):
    client = make_client(engine, slot_save_path=tmp_path / "slots")
    response = client.post("/slots/0?action=save", json={"filename": name})
    assert response.status_code == 400 and response.json()["error"]["param"] == "filename"
    assert not (tmp_path / "x").exists()


def test_refusals(engine, tmp_path):
    client = make_client(engine, slot_save_path=tmp_path)
    assert client.post("/slots/0?action=restore", json={"filename": "nope"}).status_code == 404
    (tmp_path / "bad").write_text("garbage")
    bad = client.post("/slots/0?action=restore", json={"filename": "bad"})
    assert bad.status_code == 400 and "not a saved prefix" in bad.json()["error"]["message"]
    assert client.post("/slots/9?action=save", json={"filename": "a"}).status_code == 400
    assert client.post("/slots/0?action=fly", json={"filename": "a"}).status_code == 400
    response = client.post("/completion", json={"prompt": "hi", "id_slot": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "id_slot"
    response = chat(client, id_slot=1, n=2)
    assert response.status_code == 400 and response.json()["error"]["param"] == "id_slot"


def test_saving_needs_a_folder_and_slots_can_be_turned_off(engine):
    assert make_client(engine).post("/slots/0?action=save", json={"filename": "a"}).status_code == 501
    assert make_client(engine, serve_slots=False).get("/slots").status_code == 501
