"""llama.cpp's native routes in llama.cpp's shapes, against a stand-in engine: POST /completion
(and /completions without /v1), and llama.cpp's timings on the OpenAI routes."""

from __future__ import annotations

import pytest

from lmserve.config import EngineConfig, SchedulerConfig
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine, FimByteTokenizer
from tests.helpers.server import MODEL, chat, events, make_client

TOKENIZER = ByteTokenizer()
TIMINGS = {"cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
           "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}


@pytest.mark.parametrize("path", ["/completion", "/completions"])
def test_native_completion_answers_in_llama_cpps_shape(path):
    engine = FakeEngine(reply="Hello")
    response = make_client(engine).post(path, json={"prompt": "hi", "n_predict": 3, "return_tokens": True})
    assert response.status_code == 200
    body = response.json()
    assert body["content"] == "Hel" and body["tokens"] == TOKENIZER.encode("Hel", add_special_tokens=False)
    assert (body["stop"], body["stop_type"], body["stopping_word"], body["truncated"]) == (True, "limit", "", False)
    assert (body["tokens_predicted"], body["tokens_evaluated"], body["model"]) == (3, 3, MODEL)
    assert body["prompt"] == "<s>hi" and body["tokens_cached"] == 3
    assert set(body["timings"]) == TIMINGS and body["timings"]["predicted_n"] == 3
    settings = body["generation_settings"]
    assert (settings["n_predict"], settings["n_ctx"], settings["seed"]) == (3, engine.max_model_len, -1)
    assert "completion_probabilities" not in body


def test_native_completion_defaults_to_the_rest_of_the_context_and_ends_on_eos():
    body = make_client(FakeEngine(reply="Hello")).post("/completion", json={"prompt": "hi"}).json()
    assert (body["content"], body["stop_type"], body["tokens"]) == ("Hello", "eos", [])


def test_v1_completions_keeps_openais_shape():
    body = make_client().post("/v1/completions", json={"prompt": "hi"}).json()
    assert body["object"] == "text_completion" and "content" not in body


def test_native_prompt_forms_and_several_prompts_answer_a_list():
    engine = FakeEngine(reply="ok")
    client = make_client(engine)
    mixed = [2 + ord("a"), "bc", 2 + ord("d")]  # ids and text in one prompt
    assert client.post("/completion", json={"prompt": mixed}).status_code == 200
    assert engine.calls[-1][1] == [2 + ord("a"), 2 + ord("b"), 2 + ord("c"), 2 + ord("d")]
    bodies = client.post("/completion", json={"prompt": ["x", [2 + ord("y")], ["z", 2 + ord("!")]]}).json()
    assert [b["index"] for b in bodies] == [0, 1, 2]
    assert [call[1] for call in engine.calls[-3:]] == [[0, 2 + ord("x")], [2 + ord("y")], [0, 2 + ord("z"), 2 + ord("!")]]


def test_native_probabilities_in_llama_cpps_shape():
    body = make_client(FakeEngine(reply="ab")).post("/completion", json={"prompt": "hi", "n_probs": 2}).json()
    first = body["completion_probabilities"][0]
    assert first["id"] == 2 + ord("a") and first["token"] == "a" and first["bytes"] == [ord("a")]
    assert first["logprob"] == -0.25
    assert [t["token"] for t in first["top_logprobs"]] == ["a", "x"]


def test_native_stream_sends_steps_then_a_final_object_and_no_done():
    response = make_client(FakeEngine(reply="Hey")).post(
        "/completion", json={"prompt": "hi", "stream": True, "timings_per_token": True})
    frames = events(response)
    assert "[DONE]" not in frames
    steps, final = frames[:-1], frames[-1]
    assert "".join(f["content"] for f in steps) == "Hey" and all(f["stop"] is False for f in steps)
    assert all(set(f["timings"]) == TIMINGS for f in steps)
    assert final["stop"] is True and final["stop_type"] == "eos" and final["content"] == ""
    assert final["tokens_predicted"] == 3


def test_native_refuses_like_the_other_routes():
    response = make_client().post("/completion", json={"prompt": "hi", "tfs_z": 0.5})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tfs_z"


def test_openai_routes_carry_timings_when_asked_and_throughput_in_usage():
    client = make_client(FakeEngine(reply="Hey"))
    plain = chat(client).json()
    assert "timings" not in plain
    usage = plain["usage"]
    assert usage["total_time_sec"] == pytest.approx(usage["total_prompt_time_sec"] + usage["total_completion_time_sec"])
    assert usage["total_completion_time_sec"] > 0  # three tokens come at three moments
    assert usage["avg_compl_tok_per_sec"] == pytest.approx(usage["completion_tokens"]
                                                           / usage["total_completion_time_sec"])
    assert usage["avg_tok_per_sec"] == pytest.approx(usage["total_tokens"] / usage["total_time_sec"])
    timed = chat(client, timings_per_token=True).json()
    assert set(timed["timings"]) == TIMINGS and timed["timings"]["predicted_n"] == 3
    chunks = [c for c in events(chat(client, stream=True, timings_per_token=True)) if c != "[DONE]"]
    assert chunks[-1]["timings"]["predicted_n"] == 3
    assert all("timings" not in c for c in events(chat(client, stream=True)) if c != "[DONE]")


def test_seed_minus_one_is_random_and_n_predict_is_max_tokens():
    engine = FakeEngine()
    client = make_client(engine)
    chat(client, seed=-1, n_predict=2)
    params = engine.calls[-1][2]
    assert params.seed is None and params.max_tokens == 2
    response = chat(client, n_predict=2, max_tokens=3)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n_predict"


FIM = FimByteTokenizer()
PRE, SUF, MID = 258, 259, 260


def text_ids(text: str) -> list[int]:
    return FIM.encode(text, add_special_tokens=False)


def test_infill_builds_llama_cpps_fim_prompt():
    engine = FakeEngine(reply="x = 1", tokenizer=FIM)
    body = make_client(engine).post("/infill", json={
        "input_prefix": "def f():\n", "input_suffix": "\nreturn x", "prompt": "  ",
        "input_extra": [{"filename": "a.py", "text": "y"}]}).json()
    assert body["content"] == "x = 1" and body["stop_type"] == "eos"
    separator = text_ids("\n\n--- snippet ---\n\n")
    assert engine.calls[-1][1] == [*separator, *text_ids("y"), 0, PRE, *text_ids("def f():\n"), *text_ids("  "),
                                   SUF, *text_ids("\nreturn x"), MID]


def test_openai_suffix_fills_the_middle_on_a_fim_model():
    engine = FakeEngine(reply="mid", tokenizer=FIM)
    body = make_client(engine).post("/v1/completions", json={"prompt": "ab", "suffix": "yz"}).json()
    assert body["choices"][0]["text"] == "mid"
    assert engine.calls[-1][1] == [0, PRE, *text_ids("ab"), SUF, *text_ids("yz"), MID]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/infill", {"input_prefix": "a", "input_suffix": "b"}, "input_prefix"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix"),
])
def test_a_model_without_fim_tokens_says_what_is_missing(path, body, param):
    response = make_client().post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "prefix, suffix, middle missing" in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"])
def test_chat_input_tokens_counts_the_rendered_prompt(path):
    engine = FakeEngine()
    client = make_client(engine)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    counted = client.post(path, json=body).json()
    chat(client)
    assert counted == {"object": "response.input_tokens", "input_tokens": len(engine.calls[-1][1])}


def test_props_in_llama_cpps_shape():
    body = make_client().get("/props").json()
    settings = body["default_generation_settings"]
    assert settings["n_ctx"] == 64 and settings["params"]["seed"] == -1 and settings["params"]["n_predict"] == -1
    assert settings["speculative"] is False  # the fake engine's config drafts nothing
    assert body["total_slots"] == 4 and body["model_alias"] == MODEL and body["is_sleeping"] is False


def test_logit_bias_in_llama_cpps_forms():
    engine = FakeEngine()
    client = make_client(engine)
    assert client.post("/completion", json={"prompt": "x", "logit_bias": [[5, 1.5], ["ab", False]]}).status_code == 200
    assert engine.calls[-1][2].logit_bias == ((5, 1.5), (2 + ord("a"), float("-inf")), (2 + ord("b"), float("-inf")))
    for bad in ([[5]], [[5, "x"]], [[1.5, 1]], [[5, True]]):
        response = client.post("/completion", json={"prompt": "x", "logit_bias": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias", bad


def test_apply_template_returns_the_rendered_prompt():
    body = make_client().post("/apply-template", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert body == {"prompt": "user: hi\nassistant: "}


def test_props_and_slots_say_when_the_engine_drafts():
    engine = FakeEngine()
    engine.config = EngineConfig("/models/fake.gguf", "fake", scheduler=SchedulerConfig(4, num_speculative_tokens=4))
    client = make_client(engine)
    assert client.get("/props").json()["default_generation_settings"]["speculative"] is True
    assert all(slot["speculative"] is True for slot in client.get("/slots").json())
    assert all(slot["speculative"] is False for slot in make_client().get("/slots").json())
