"""The server's unit tests' way to an app: a client over create_app with a FakeEngine, and
helpers to call it and read its answers."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from lmserve.server.app import create_app
from lmserve.server.state import ServerState
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine

MODEL = "tiny-chat"
CHAT_PROMPT = "user: hi\nassistant: "  # how ByteTokenizer renders the message `chat` sends
PROMPT_IDS = ByteTokenizer().encode(CHAT_PROMPT, add_special_tokens=False)
REPLY_LEN = len("Hé!".encode())  # FakeEngine's default reply, in tokens

_FRESH = object()


def make_client(engine=_FRESH, *, headers: dict[str, str] | None = None, raise_server_exceptions: bool = True,
                **state_fields) -> TestClient:
    """A client of the app serving MODEL with `engine` (a fresh FakeEngine unless given; None:
    the model is still loading); other ServerState fields by keyword. `client.app` is the ASGI
    app, `served_state(client)` its ServerState."""
    engine = FakeEngine() if engine is _FRESH else engine
    app = create_app(ServerState(MODEL, engine, **state_fields))
    return TestClient(app, headers=headers, raise_server_exceptions=raise_server_exceptions)


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
