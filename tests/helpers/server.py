"""The server's unit tests' way to an app: a client over create_app whose fleet serves a
FakeEngine (and, if asked, an embedding worker), and helpers to call it and read its answers."""

from __future__ import annotations

import contextlib
import json
import threading
import time

from fastapi.testclient import TestClient

from lmserve.fleet.catalogue import Catalogue, ModelEntry
from lmserve.fleet.fleet import Fleet
from lmserve.fleet.models import ChatModel, EmbeddingModel
from lmserve.server.app import create_app
from lmserve.server.state import ServerState
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine

MODEL = "tiny-chat"
CHAT_PROMPT = "user: hi\nassistant: "  # how ByteTokenizer renders the message `chat` sends
PROMPT_IDS = ByteTokenizer().encode(CHAT_PROMPT, add_special_tokens=False)
REPLY_LEN = len("Hé!".encode())  # FakeEngine's default reply, in tokens


class GatedLoader:
    """A fleet loader over prepared models: `models` maps an id to its engine (chat) or worker
    (embedding). A model given as None loads until `finish(id, value)` hands it over."""

    def __init__(self, models: dict[str, object]):
        self.models = dict(models)
        self.gates = {model_id: threading.Event() for model_id, value in models.items() if value is None}

    def __call__(self, entry: ModelEntry, progress=None):
        if entry.id in self.gates and not self.gates[entry.id].wait(30):
            raise RuntimeError("the test never finished loading this model")
        return wrap(entry, self.models[entry.id])

    def finish(self, model_id: str, value) -> None:
        self.models[model_id] = value
        self.gates[model_id].set()


def wrap(entry: ModelEntry, value):
    return ChatModel(value) if entry.kind == "chat" else EmbeddingModel(value)


def make_fleet(engine, embedding_model_id: str | None = None, embedder=None,
               more_models: dict[str, object] | None = None) -> tuple[Fleet, GatedLoader]:
    """MODEL (and the embedding model, if named), pinned, as a server with one model has them;
    `more_models` (id -> engine) are further chat models, loaded too."""
    entries = [ModelEntry(id=MODEL, source="/models/tiny.gguf", pinned=True)]
    entries += [ModelEntry(id=model_id, source=f"/models/{model_id}.gguf") for model_id in more_models or {}]
    values: dict[str, object] = {MODEL: engine, **(more_models or {})}
    if embedding_model_id is not None:
        entries.append(ModelEntry(id=embedding_model_id, source="/models/embed", kind="embedding", pinned=True))
        values[embedding_model_id] = embedder
    loader = GatedLoader(values)
    fleet = Fleet(Catalogue(entries), loader)
    for entry in entries:
        if values[entry.id] is not None:
            fleet.adopt(entry.id, wrap(entry, values[entry.id]))
    return fleet, loader


def make_client(engine=None, *, headers: dict[str, str] | None = None, raise_server_exceptions: bool = True,
                embedding_model_id: str | None = None, embedder=None, more_models: dict[str, object] | None = None,
                **state_fields) -> TestClient:
    """A client of the app serving MODEL with `engine` (a fresh FakeEngine unless given), already
    loaded, and the other models named; other ServerState fields by keyword. `client.app` is the
    ASGI app, `served_state(client)` its ServerState."""
    app = make_app(engine, embedding_model_id=embedding_model_id, embedder=embedder, more_models=more_models,
                   **state_fields)
    return TestClient(app, headers=headers, raise_server_exceptions=raise_server_exceptions)


def make_app(engine=None, *, embedding_model_id: str | None = None, embedder=None,
             more_models: dict[str, object] | None = None, **state_fields):
    """The ASGI app make_client talks to, for clients of one's own (httpx.ASGITransport, for
    concurrent requests on the test's event loop)."""
    fleet, _ = make_fleet(engine if engine is not None else FakeEngine(), embedding_model_id, embedder, more_models)
    return create_app(ServerState(fleet, **state_fields))


@contextlib.contextmanager
def loading_client(engine=None, embedding_model_id: str | None = None, embedder=None, load_timeout: float = 0.2):
    """A running app (its lifespan started) whose models given as None are loading until
    `loader.finish(id, value)`; yields (client, loader). Requests wait `load_timeout` for a model."""
    fleet, loader = make_fleet(engine, embedding_model_id, embedder)
    app = create_app(ServerState(fleet, load_timeout=load_timeout))
    with TestClient(app) as client:
        try:
            yield client, loader
        finally:
            for gate in loader.gates.values():  # let a load still waiting end before the app stops
                gate.set()


def served_state(client: TestClient) -> ServerState:
    return client.app.state.lmserve


def chat(client, stream=False, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **fields}
    return client.post("/v1/chat/completions", json=body)


def events(response) -> list:
    """The SSE payloads of a response: parsed JSON, or the string "[DONE]"."""
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == ""
    assert all(f.startswith("data: ") for f in frames[:-1])
    return [f[6:] if f[6:] == "[DONE]" else json.loads(f[6:]) for f in frames[:-1]]


def chat_reply(response, stream: bool) -> tuple[str | None, list[tuple[str, str]], str]:
    """(content, tool calls as (name, arguments), finish_reason) of a one-choice chat response:
    the JSON message, or what a client concatenating the SSE deltas has."""
    assert response.status_code == 200, response.text
    if not stream:
        choice = response.json()["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        return (choice["message"]["content"], [(c["function"]["name"], c["function"]["arguments"]) for c in calls],
                choice["finish_reason"])
    chunks = [e["choices"][0] for e in events(response)[:-1] if e["choices"]]
    content = "".join(chunk["delta"].get("content") or "" for chunk in chunks)
    names: list[str] = []
    arguments: list[str] = []
    for call in (call for chunk in chunks for call in chunk["delta"].get("tool_calls") or []):
        if call.get("id"):
            assert call["index"] == len(names) and call["type"] == "function"
            names.append(call["function"]["name"])
            arguments.append("")
        arguments[call["index"]] += call["function"]["arguments"]
    return content or None, list(zip(names, arguments, strict=True)), chunks[-1]["finish_reason"]


def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll `condition` (a background load finishing, say) until it holds; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
