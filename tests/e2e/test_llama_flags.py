"""A server started with llama-server's flags serves with llama-server's limits and names; a
llama-server flag lmserve does not support stops it before it loads anything."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server


@pytest.fixture(scope="module")
def llama_served():
    """One server for both flag tests: the limit/name flags and the sampler-default flags do not
    touch each other's assertions (temperature 0 is greedy whatever the other samplers say)."""
    proc, url, _ = start_server("-m", str(default_model_path()), "-c", "2048", "-np", "4", "-a", "mymodel",
                                "-ngl", "99", "-cb", "--metrics", "--jinja", "--temp", "0", "-n", "5",
                                "--repeat-penalty", "1.5", "--repeat-last-n", "32", "--mirostat", "2",
                                "--no-embedding-model", sizes=False)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_llama_server_flags_give_its_limits_name_and_defaults(llama_served):
    url = llama_served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [(m.id, m.max_model_len) for m in client.models.list().data] == [("mymodel", 512)]  # 2048 / 4
    props = httpx.get(f"{url}/props").json()
    assert (props["total_slots"], props["default_generation_settings"]["n_ctx"]) == (4, 512)
    assert httpx.get(f"{url}/health").json()["num_kv_blocks"] * 16 == 2048  # the KV cache -c asked for
    reply = client.chat.completions.create(model="mymodel", messages=[{"role": "user", "content": "Count: 1, 2,"}])
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (5, "length")  # -n 5
    again = client.chat.completions.create(model="mymodel", messages=[{"role": "user", "content": "Count: 1, 2,"}])
    assert again.choices[0].message.content == reply.choices[0].message.content  # --temp 0: greedy


def test_llama_server_sampler_flags_are_the_defaults_props_shows_and_requests_run_with(llama_served):
    url = llama_served
    shown = httpx.get(f"{url}/props").json()["default_generation_settings"]["params"]
    assert (shown["repeat_penalty"], shown["repeat_last_n"], shown["mirostat"]) == (1.5, 32, 2)
    ran = httpx.post(f"{url}/completion", json={"prompt": "Hi", "n_predict": 2}, timeout=120).json()
    settings = ran["generation_settings"]  # what the request ran with, in llama.cpp's names
    assert (settings["repeat_penalty"], settings["repeat_last_n"], settings["mirostat"]) == (1.5, 32, 2)
    # vLLM's name for the penalty wins over the server's llama.cpp one, with no 400 for disagreeing
    own = httpx.post(f"{url}/completion", json={"prompt": "Hi", "n_predict": 2, "repetition_penalty": 1.1,
                                                "mirostat": 0}, timeout=120)
    assert own.status_code == 200, own.text
    settings = own.json()["generation_settings"]
    assert (settings["repeat_penalty"], settings["repeat_last_n"], settings["mirostat"]) == (1.1, 32, 0)


def test_a_sampler_flag_value_no_request_could_send_stops_start_up_by_name():
    done = subprocess.run([sys.executable, "-m", "lmserve.cli", "serve", "-m", str(default_model_path()),
                           "--dry-base", "0.5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "lmserve: --dry-base cannot be a request's default: dry_base must be >= 1\n"


def test_an_unsupported_llama_server_flag_stops_start_up_by_name():
    done = subprocess.run([sys.executable, "-m", "lmserve.cli", "serve", "-m", str(default_model_path()),
                           "--rope-scaling", "yarn"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == ("lmserve: --rope-scaling is a llama-server flag lmserve does not support: lmserve uses "
                           "the model's own RoPE settings\n")
