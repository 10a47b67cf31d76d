"""A script written for llama.cpp's server, run against `lmserve serve` started with llama-server's
flags: its native routes and parameter names, plain HTTP as its clients send them, and slots
saved by one server and restored into the prefix cache of another started on the same folder."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server

FLAGS = ("-m", str(default_model_path()), "-c", "4096", "-np", "2", "-a", "mymodel", "--no-embedding-model")
STORY = ("Once upon a time, in a small village by the sea, there lived an old fisherman who told the children "
         "stories about the lighthouse, the storms and the ships that came back from far away. ") * 3


def start(slot_dir):
    return start_server(*FLAGS, "--slot-save-path", str(slot_dir), sizes=False)


def stop(proc):
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    slot_dir = tmp_path_factory.mktemp("slots")
    proc, url, _ = start(slot_dir)
    yield url, slot_dir
    stop(proc)


def complete(url, **body):
    response = httpx.post(f"{url}/completion", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_as_llama_cpps_clients_call_it(served):
    url, _ = served
    body = complete(url, prompt="The capital of France is", n_predict=8, temperature=0, return_tokens=True)
    assert body["tokens_predicted"] == len(body["tokens"]) == 8 and body["stop_type"] == "limit"
    assert body["model"] == "mymodel" and body["generation_settings"]["n_ctx"] == 2048  # 4096 / 2 slots
    assert body["timings"]["predicted_n"] == 8 and body["tokens_evaluated"] > 4
    again = complete(url, prompt="The capital of France is", n_predict=8, temperature=0)
    assert again["content"] == body["content"]
    complete(url, prompt=STORY, n_predict=1)
    assert complete(url, prompt=STORY, n_predict=1)["tokens_cached"] > 0  # whole blocks of the prompt


def test_a_stop_word_ends_it_and_is_named(served):
    url, _ = served
    first = complete(url, prompt="1, 2, 3, 4,", n_predict=12, temperature=0)["content"]
    word = first.strip().split()[1]  # a word the greedy reply writes
    body = complete(url, prompt="1, 2, 3, 4,", n_predict=12, temperature=0, stop=[word])
    assert (body["stop_type"], body["stopping_word"]) == ("word", word) and word not in body["content"]


def test_streaming_ends_with_a_stop_event_and_no_done(served):
    url, _ = served
    with httpx.stream("POST", f"{url}/completion", json={"prompt": "Hello", "n_predict": 5, "stream": True},
                      timeout=120) as response:
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(frame) for frame in frames]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert sum(len(e["tokens"]) for e in events[:-1]) == 5 and events[-1]["stop_type"] == "limit"


def test_llama_cpp_sampling_and_constraints(served):
    url, _ = served
    prompt = "Write the word cat ten times: cat cat cat"
    plain = complete(url, prompt=prompt, n_predict=16, temperature=0)["content"]
    penalised = complete(url, prompt=prompt, n_predict=16, temperature=0, repeat_penalty=2.0, repeat_last_n=64)
    assert penalised["content"] != plain
    banned = complete(url, prompt=prompt, n_predict=16, temperature=0, logit_bias=[[" cat", False]])
    assert " cat" not in banned["content"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    constrained = complete(url, prompt="A number as JSON:", n_predict=64, json_schema=schema, temperature=0)
    assert isinstance(json.loads(constrained["content"])["n"], int)
    probs = complete(url, prompt="Hi", n_predict=2, n_probs=3)["completion_probabilities"]
    assert len(probs) == 2 and len(probs[0]["top_logprobs"]) == 3
    post = complete(url, prompt="Hi", n_predict=2, n_probs=3, top_k=2, post_sampling_probs=True)
    first = post["completion_probabilities"][0]
    assert len(first["top_probs"]) <= 2 and 0 < first["prob"] <= 1  # after the chain: top_k 2 kept two
    assert abs(sum(t["prob"] for t in first["top_probs"]) - 1) < 1e-4
    sampled = complete(url, prompt="Hi", n_predict=4, seed=-1, mirostat=2, typical_p=0.9, tfs_z=1.0,
                       dynatemp_range=0, samplers=["top_k", "typ_p", "temperature"])
    assert sampled["tokens_predicted"] == 4
    refused = httpx.post(f"{url}/completion", json={"prompt": "Hi", "n_indent": 4}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n_indent"


def test_openai_clients_get_the_model_whatever_name_they_send(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, extra_body={"timings_per_token": True})
    assert reply.model == "mymodel" and reply.model_extra["timings"]["predicted_n"] == 3


def test_openai_clients_send_llama_cpps_samplers_in_extra_body(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "List fruits: apple, apple, apple"}]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    dry = client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0,
        extra_body={"dry_multiplier": 3.0, "dry_allowed_length": 1, "min_tokens": 12, "penalize_nl": False,
                    "repeat_penalty": 1.3, "repeat_last_n": 32})
    assert dry.choices[0].message.content != plain.choices[0].message.content
    assert dry.usage.completion_tokens == 12  # min_tokens held the end off
    sampled = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, seed=7,
        extra_body={"xtc_probability": 0.5, "xtc_threshold": 0.1, "top_n_sigma": 1.5, "min_keep": 2,
                    "dynatemp_range": 0.5, "samplers": "kpxt"})
    again = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, seed=7,
        extra_body={"xtc_probability": 0.5, "xtc_threshold": 0.1, "top_n_sigma": 1.5, "min_keep": 2,
                    "dynatemp_range": 0.5, "samplers": "kpxt"})
    assert sampled.choices[0].message.content == again.choices[0].message.content  # seeded chain
    embedded = httpx.post(f"{url}/embedding", json={"content": "hello"}, timeout=60).json()
    assert len(embedded) == 1 and abs(sum(x * x for x in embedded[0]["embedding"][0]) - 1) < 1e-4


def test_ops_routes(served):
    url, _ = served
    props = httpx.get(f"{url}/props").json()
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 2048
    tokens = httpx.post(f"{url}/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"
    slots = httpx.get(f"{url}/slots").json()
    assert [slot["id"] for slot in slots] == [0, 1] and slots[0]["n_ctx"] == 2048
    counted = httpx.post(f"{url}/v1/chat/completions/input_tokens",
                         json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert counted["input_tokens"] > 1
    assert httpx.post(f"{url}/infill", json={"input_prefix": "a", "input_suffix": "b"}).status_code == 400
    bad = httpx.post(f"{url}/slots/0?action=save", json={"filename": "../escape"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "filename"


def test_a_saved_slot_survives_a_restart(served):
    """Saved by the module's server, restored by a new process on the same folder."""
    url, slot_dir = served
    first = complete(url, prompt=STORY, n_predict=4, temperature=0, id_slot=1)
    assert first["id_slot"] == 1
    saved = httpx.post(f"{url}/slots/1?action=save", json={"filename": "story.bin"}, timeout=60).json()
    assert saved["n_saved"] >= first["tokens_evaluated"] - 16 and saved["n_written"] > 0
    proc, url, _ = start(slot_dir)
    try:
        cold = complete(url, prompt="Something else entirely.", n_predict=1)
        assert cold["tokens_cached"] == 0
        restored = httpx.post(f"{url}/slots/0?action=restore", json={"filename": "story.bin"}, timeout=60).json()
        assert restored["n_restored"] == saved["n_saved"]
        warm = complete(url, prompt=STORY, n_predict=4, temperature=0)
        assert warm["tokens_cached"] == min(saved["n_saved"], (warm["tokens_evaluated"] - 1) // 16 * 16)
        assert warm["content"] == first["content"]
    finally:
        stop(proc)
