"""lmdeploy's POST /v1/chat/interactive on a fake engine: sessions kept by session_id, ended by
interactive_mode false, its answer shapes (whole and streamed lines), its defaults, cancel."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import make_app, make_client, served_state

URL = "/v1/chat/interactive"


def turn(client, prompt: str, **fields) -> dict:
    response = client.post(URL, json={"prompt": prompt, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def prompt_text(engine: FakeEngine) -> str:
    return engine.tokenizer.decode(engine.calls[-1][1])


def test_a_session_keeps_its_turns_until_a_turn_without_interactive_mode_ends_it():
    engine = FakeEngine(reply="Paris", max_model_len=1024)
    client = make_client(engine)
    first = turn(client, "Capital of France?", session_id=7, interactive_mode=True)
    assert first == {"text": "Paris", "tokens": 5, "input_tokens": len(engine.calls[-1][1]), "history_tokens": 0,
                     "finish_reason": "stop"}
    engine.reply = "Rome"
    second = turn(client, "And of Italy?", session_id=7, interactive_mode=True)
    prompt = prompt_text(engine)
    assert prompt.index("user: Capital of France?") < prompt.index("assistant: Paris") < prompt.index("user: And of Italy?")
    assert second["history_tokens"] == first["input_tokens"] + first["tokens"]
    assert second["input_tokens"] + second["history_tokens"] == len(engine.calls[-1][1])
    turn(client, "And of Spain?", session_id=7)  # interactive_mode false: the history still counts, then ends
    assert "user: And of Italy?" in prompt_text(engine)
    turn(client, "Hello", session_id=7, interactive_mode=True)
    assert prompt_text(engine) == "user: Hello\nassistant: "  # a fresh session
    other = turn(client, "Hi", session_id=8, interactive_mode=True)
    assert other["history_tokens"] == 0 and "Hello" not in prompt_text(engine)


def test_an_empty_turn_with_no_output_ends_the_session():
    engine = FakeEngine(reply="ok", max_model_len=1024)
    client = make_client(engine)
    turn(client, "Remember this", session_id=3, interactive_mode=True)
    calls = len(engine.calls)
    assert turn(client, "", session_id=3, request_output_len=0) == {
        "text": "", "tokens": 0, "input_tokens": 0, "history_tokens": 0, "finish_reason": "stop"}
    assert len(engine.calls) == calls  # nothing generated
    assert turn(client, "Hi", session_id=4, request_output_len=0)["finish_reason"] == "length"
    assert len(engine.calls) == calls
    turn(client, "Again", session_id=3, interactive_mode=True)
    assert "Remember this" not in prompt_text(engine)


def test_session_minus_one_keeps_nothing():
    engine = FakeEngine(reply="ok", max_model_len=1024)
    client = make_client(engine)
    turn(client, "One", interactive_mode=True)
    turn(client, "Two", interactive_mode=True)
    assert "One" not in prompt_text(engine)


def test_a_streamed_turn_is_one_json_object_per_line():
    engine = FakeEngine(reply="Hey!", max_model_len=1024)
    client = make_client(engine)
    response = client.post(URL, json={"prompt": "Hi", "session_id": 1, "interactive_mode": True, "stream": True})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert "".join(line["text"] for line in lines) == "Hey!"
    assert [line["tokens"] for line in lines] == [1, 2, 3, 4]
    assert [line["finish_reason"] for line in lines] == [None, None, None, "stop"]
    engine.reply = "Bye"
    turn(client, "Next", session_id=1, interactive_mode=True)
    assert "assistant: Hey!" in prompt_text(engine)  # the streamed reply was kept


def test_lmdeploys_defaults_and_its_sampling_names_reach_the_engine():
    engine = FakeEngine(reply="Hello there", max_model_len=1024)
    client = make_client(engine)
    turn(client, "Hi")
    params = engine.calls[-1][2]
    assert (params.temperature, params.top_p, params.top_k) == (0.8, 0.8, 40)
    cut = turn(client, "Hi", request_output_len=3, temperature=0.0, top_k=5, repetition_penalty=1.2, seed=4,
               stop=["zz"], min_new_tokens=2, ignore_eos=True)
    params = engine.calls[-1][2]
    assert (cut["text"], cut["tokens"], cut["finish_reason"]) == ("Hel", 3, "length")
    assert (params.max_tokens, params.temperature, params.top_k, params.repetition_penalty, params.seed,
            params.stop, params.min_tokens, params.ignore_eos) == (3, 0.0, 5, 1.2, 4, ("zz",), 2, True)


def test_what_lmserve_does_not_serve_is_refused_by_name():
    client = make_client(FakeEngine(reply="x", max_model_len=1024))
    for fields, param in (({"image_url": "http://x/cat.png"}, "image_url"), ({"adapter_name": "lora1"}, "adapter_name"),
                          ({"cancel": True}, "session_id")):
        response = client.post(URL, json={"prompt": "Hi", **fields})
        assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_a_prompt_without_messages_is_a_400_naming_the_prompt():
    """An empty list, or reasoning items alone, were a 500 (the turn's chat request had no messages)."""
    engine = FakeEngine(reply="x", max_model_len=1024)
    client = make_client(engine)
    turn(client, "Hi", session_id=3, interactive_mode=True)
    for prompt, told in (([], "at least 1 item"), ([{"type": "reasoning", "summary": []}], "no message to answer")):
        response = client.post(URL, json={"prompt": prompt})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "prompt" and told in error["message"]
    # in a session, its history is the prompt's messages
    assert turn(client, [{"type": "reasoning", "summary": []}], session_id=3, interactive_mode=True)["text"] == "x"
    assert len(engine.calls) == 2


def test_cancel_stops_the_sessions_running_request():
    engine = FakeEngine(reply="a long answer", max_model_len=1024, hang_after=2)
    app = make_app(engine)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            running = asyncio.create_task(client.post(URL, json={"prompt": "Go", "session_id": 5, "stream": True}))
            await asyncio.wait_for(engine.hanging.wait(), 10)
            cancelled = await client.post(URL, json={"prompt": "", "session_id": 5, "cancel": True})
            aborted = list(engine.closed_early)  # before the hung request is let go
            running.cancel()
            return cancelled, aborted

    cancelled, aborted = asyncio.run(scenario())
    assert cancelled.json()["tokens"] == 0
    assert aborted == [engine.calls[-1][0]]  # the abort reached the engine


def test_a_failed_turn_leaves_the_session_as_it_was_and_forgets_its_request():
    engine = FakeEngine(reply="Hello", max_model_len=1024, fail_after=2)
    client = make_client(engine, raise_server_exceptions=False)
    assert client.post(URL, json={"prompt": "Hi", "session_id": 9, "interactive_mode": True}).status_code == 500
    assert served_state(client).running_sessions == {}
    engine.fail_after = None
    turn(client, "Again", session_id=9, interactive_mode=True)
    assert prompt_text(engine) == "user: Again\nassistant: "  # the failed turn was not kept
