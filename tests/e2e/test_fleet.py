"""Several models in one real server: loaded when asked for, evicted for room, unloaded when idle
or on request, a broken one failing alone. The models are the packaged SmolLM2 under two names."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server

PROMPT = [{"role": "user", "content": "Name the capital of France."}]
TTL_SECONDS = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for name in ("alpha", "beta"):
        (folder / f"{name}.gguf").symlink_to(default_model_path())
    (folder / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    proc, url, _ = start_server("--models-dir", str(folder), "--no-embedding-model", "--max-loaded-models", "1",
                                "--default-ttl", str(TTL_SECONDS))
    yield {"url": url, "folder": folder}
    proc.terminate()
    proc.wait(timeout=30)


def statuses(fleet) -> dict[str, str]:
    return {card["id"]: card["status"]["value"] for card in httpx.get(f"{fleet['url']}/v1/models").json()["data"]}


def ask(fleet, model, **fields):
    body = {"model": model, "messages": PROMPT, "temperature": 0, "max_tokens": 12, **fields}
    return httpx.post(f"{fleet['url']}/v1/chat/completions", json=body, timeout=120)


def test_models_are_listed_unloaded_and_load_when_asked_for(fleet, client, model_id):
    assert statuses(fleet) == {"alpha": "unloaded", "beta": "unloaded", "broken": "unloaded"}
    reply = ask(fleet, "alpha").json()
    assert reply["model"] == "alpha" and statuses(fleet)["alpha"] == "loaded"
    served_alone = client.chat.completions.create(model=model_id, messages=PROMPT, temperature=0, max_tokens=12)
    assert reply["choices"][0]["message"]["content"] == served_alone.choices[0].message.content


def test_one_model_at_a_time_alternating_requests_all_succeed(fleet):
    first = ask(fleet, "beta").json()
    assert statuses(fleet) | {"broken": None} == {"alpha": "unloaded", "beta": "loaded", "broken": None}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda m: ask(fleet, m), ["alpha", "beta"] * 3))
    assert [r.status_code for r in replies] == [200] * 6
    texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert texts == {first["choices"][0]["message"]["content"]}  # the same weights answer the same


def test_a_broken_model_fails_alone_with_its_reason(fleet):
    error = ask(fleet, "broken").json()["error"]
    assert error["code"] == "model_load_failed" and "broken" in error["message"]
    card = next(c for c in httpx.get(f"{fleet['url']}/v1/models").json()["data"] if c["id"] == "broken")
    assert card["status"]["value"] == "failed" and card["status"]["error"]
    assert ask(fleet, "alpha").status_code == 200


def test_several_models_make_an_unknown_name_a_404_listing_them(fleet):
    error = ask(fleet, "gpt-4o-mini").json()["error"]
    assert error["code"] == "model_not_found" and "'alpha', 'beta', 'broken'" in error["message"]


def test_unload_while_streaming_lets_the_stream_finish(fleet):
    assert httpx.post(f"{fleet['url']}/models/load", json={"model": "beta"}, timeout=120).json() == {"success": True}
    body = {"model": "beta", "messages": PROMPT, "max_tokens": 150, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{fleet['url']}/v1/chat/completions", json=body, timeout=120) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        unloaded = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post, f"{fleet['url']}/models/unload", json={"model": "beta"}, timeout=120)
        rest = [line for line in lines if line.startswith("data: ")]
    assert unloaded.result().json() == {"success": True}
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) >= 100
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert statuses(fleet)["beta"] == "unloaded"


def test_an_idle_model_is_unloaded_after_the_ttl(fleet):
    assert ask(fleet, "alpha").status_code == 200
    assert statuses(fleet)["alpha"] == "loaded"
    deadline = time.monotonic() + TTL_SECONDS + 5
    while statuses(fleet)["alpha"] == "loaded":
        assert time.monotonic() < deadline, "alpha was not unloaded after its ttl"
        time.sleep(0.25)
    assert statuses(fleet)["alpha"] == "unloaded"


def test_a_file_added_to_the_folder_is_listed_without_a_restart(fleet):
    (fleet["folder"] / "gamma.gguf").symlink_to(default_model_path())
    assert "gamma" in statuses(fleet)
    (fleet["folder"] / "gamma.gguf").unlink()
    assert "gamma" not in statuses(fleet)


def test_lmserve_ps_lists_the_loaded_model_with_its_memory(fleet):
    import subprocess
    import sys

    assert ask(fleet, "beta", keep_alive="10m").status_code == 200
    shown = subprocess.run([sys.executable, "-m", "lmserve.cli", "ps", "--url", fleet["url"]], capture_output=True,
                           text=True, timeout=60, check=True).stdout.splitlines()
    assert shown[0].split()[:3] == ["NAME", "KIND", "STATUS"] and len(shown) == 2
    name, kind, status, memory, unit, requests, *unloads = shown[1].split()
    assert (name, kind, status, unit, requests) == ("beta", "chat", "loaded", "MiB", "0")
    assert 60 < int(memory) < 400 and unloads[:2] == ["in", "10"]  # int4 weights (~90 MiB) + KV in use


def test_a_model_named_by_a_hub_source_is_downloaded_then_served(tmp_path, monkeypatch):
    from tests.helpers.hub_stand_in import HubStandIn

    gguf = default_model_path()
    with HubStandIn() as hub:
        hub.add_repo("tests/smol", {gguf.name: gguf.read_bytes()})
        for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the server process inherits these
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        proc, url, codes = start_server(f"hf:tests/smol/{gguf.name}", "--no-embedding-model")
        try:
            assert 503 in codes  # /health waited for the download and the load
            [card] = httpx.get(f"{url}/v1/models").json()["data"]
            assert (card["id"], card["status"]["value"]) == ("SmolLM2-135M-Instruct", "loaded")
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": PROMPT, "temperature": 0, "max_tokens": 8}).json()
            assert reply["model"] == "SmolLM2-135M-Instruct" and reply["choices"][0]["message"]["content"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert [p.stat().st_size for p in (tmp_path / "hub").rglob(gguf.name)] == [gguf.stat().st_size]
        assert hub.seen("GET", gguf.name)  # fetched from the stand-in, nowhere else


def test_two_models_loaded_at_once_answer_as_each_does_alone(tmp_path, client, model_id):
    for name in ("left", "right"):
        (tmp_path / f"{name}.gguf").symlink_to(default_model_path())
    proc, url, _ = start_server("--models-dir", str(tmp_path), "--no-embedding-model")
    both = {"url": url}
    try:
        alone = client.chat.completions.create(model=model_id, messages=PROMPT, temperature=0, max_tokens=24)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one request to each, at the same time
            replies = list(pool.map(lambda m: ask(both, m, max_tokens=24).json(), ["left", "right"]))
        assert [r["choices"][0]["message"]["content"] for r in replies] == [alone.choices[0].message.content] * 2
        assert statuses(both) == {"left": "loaded", "right": "loaded"}
        assert ask(both, "left", keep_alive=0).status_code == 200  # Ollama's "unload after this request"
        deadline = time.monotonic() + 10
        while statuses(both)["left"] != "unloaded":
            assert time.monotonic() < deadline, "keep_alive 0 did not unload the model"
            time.sleep(0.1)
        assert statuses(both)["right"] == "loaded"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
