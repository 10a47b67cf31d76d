"""The operator surface on a real server: token routes, /props, /metrics, CORS, the body cap,
the key file and the access log (one JSON line per request on stdout)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.live_server import MAX_MODEL_LEN, start_server
from tests.helpers.prometheus import metric_samples

KEY = "ops-secret"
ORIGIN = "http://ui.example:3000"
BODY_CAP = 64 * 1024
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """The server and the file its stdout goes to (--log-level info: the access log)."""
    folder = tmp_path_factory.mktemp("ops")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# operators\n\n{KEY}\n")
    log_path = folder / "stdout.txt"
    with log_path.open("w") as log_file:
        proc, url, _ = start_server("--api-key-file", str(key_file), "--allowed-origins", f"{ORIGIN},http://other.example",
                                    "--max-request-body", "64KiB", "--no-embedding-model", "--max-num-seqs", "4",
                                    "--log-level", "info", stdout=log_file)
    yield url, log_path
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ops_server(ops):
    return ops[0]


def test_tokenize_round_trip_with_pieces(ops_server):
    text = "Capital 媽 🤗"
    tokens = httpx.post(f"{ops_server}/tokenize", headers=AUTH,
                        json={"content": text, "with_pieces": True}).json()["tokens"]
    raw = b"".join(bytes(t["piece"]) if isinstance(t["piece"], list) else t["piece"].encode() for t in tokens)
    assert raw == text.encode()
    assert any(isinstance(t["piece"], list) for t in tokens)  # 媽 spans three single-byte tokens
    ids = [t["id"] for t in tokens]
    assert httpx.post(f"{ops_server}/v1/tokenize", headers=AUTH, json={"content": text}).json() == {"tokens": ids}
    assert httpx.post(f"{ops_server}/detokenize", headers=AUTH, json={"tokens": ids}).json() == {"content": text}
    bad = httpx.post(f"{ops_server}/detokenize", headers=AUTH, json={"tokens": [ids[0], 10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[1]"


def test_props_match_the_served_model(ops_server):
    props = httpx.get(f"{ops_server}/props", headers=AUTH).json()
    assert props["default_generation_settings"]["n_ctx"] == MAX_MODEL_LEN
    assert props["total_slots"] == 4
    assert props["model_path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "<|im_start|>" in props["chat_template"]
    assert (props["bos_token"], props["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert httpx.get(f"{ops_server}/props").status_code == 401


def test_metrics_move_by_the_tokens_of_a_known_request(ops_server):
    before = metric_samples(httpx.get(f"{ops_server}/metrics").text)  # public: no key
    reply = httpx.post(f"{ops_server}/v1/completions", headers=AUTH, timeout=60, json={
        "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "ignore_eos": True}).json()
    after = metric_samples(httpx.get(f"{ops_server}/metrics").text)

    model = reply["model"]

    def moved(name, **labels):  # engine series carry the model's id
        key = (name, tuple(sorted({"model": model, **labels}.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert reply["usage"]["completion_tokens"] == 3
    assert moved("lmserve:generation_tokens_total") == 3
    assert moved("lmserve:prompt_tokens_total") == reply["usage"]["prompt_tokens"]
    assert moved("lmserve:time_to_first_token_seconds_count") == 1
    assert moved("lmserve:inter_token_latency_seconds_count") == 2
    assert moved("lmserve:e2e_request_latency_seconds_count") == 1
    assert moved("lmserve:request_success_total", finished_reason="length") == 1
    http = ("lmserve:http_requests_total", (("method", "POST"), ("route", "/v1/completions"), ("status", "200")))
    assert after[http] - before.get(http, 0) == 1
    assert moved("lmserve:tokens_per_step_sum") == reply["usage"]["prompt_tokens"] + 2  # prefill, then 2 decodes
    assert after[("lmserve:num_requests_running", (("model", model),))] == 0
    assert after[("lmserve:model_loads_total", (("model", model), ("outcome", "loaded")))] == 1


def test_cors_preflight_and_actual_requests(ops_server):
    def preflight(origin):
        return httpx.options(f"{ops_server}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})

    allowed = preflight(ORIGIN)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert preflight("http://evil.example").status_code == 403
    refused = httpx.get(f"{ops_server}/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_oversized_bodies_are_413_and_the_server_keeps_serving(ops_server):
    body = json.dumps({"prompt": "x" * 2 * BODY_CAP, "max_tokens": 1}).encode()
    declared = httpx.post(f"{ops_server}/v1/completions", headers={**AUTH, "content-type": "application/json"},
                          content=body)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks():
        for start in range(0, len(body), 8192):
            yield body[start:start + 8192]

    chunked = httpx.post(f"{ops_server}/v1/completions", headers={**AUTH, "content-type": "application/json"},
                         content=chunks())
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    again = httpx.post(f"{ops_server}/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert again.status_code == 200


def test_an_empty_key_file_stops_start_up_with_a_message(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# nothing yet\n")
    result = subprocess.run([sys.executable, "-m", "lmserve.cli", "serve", "--api-key-file", str(key_file),
                             "--no-embedding-model"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "holds no keys" in result.stderr and str(key_file) in result.stderr


def test_access_log_is_one_json_line_per_request_on_stdout(ops):
    ops_server, log_path = ops
    already = len(log_path.read_text().splitlines())
    httpx.post(f"{ops_server}/tokenize", headers=AUTH, json={"content": "hi"})
    httpx.post(f"{ops_server}/v1/completions", headers=AUTH, timeout=60,
               json={"prompt": "Hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True})
    httpx.get(f"{ops_server}/nope", headers=AUTH)
    deadline = time.monotonic() + 10
    while True:  # the server writes a request's line once its response is done
        stdout = log_path.read_text().splitlines()
        requests = [json.loads(line) for line in stdout[already:] if line.startswith("{") and '"/health"' not in line]
        if len(requests) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(r["path"], r["status"]) for r in requests] == [("/tokenize", 200), ("/v1/completions", 200),
                                                            ("/nope", 404)]
    assert requests[1]["completion_tokens"] == 2 and requests[1]["prompt_tokens"] > 0
    assert all(line.startswith("{") for line in stdout)  # nothing else on stdout: uvicorn's access log is off
