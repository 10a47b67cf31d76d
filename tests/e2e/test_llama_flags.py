"""A server started with llama-server's flags serves with llama-server's limits and names; a
llama-server flag lmserve does not support stops it before it loads anything."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server


def test_llama_server_flags_give_its_limits_name_and_defaults():
    proc, url, _ = start_server("-m", str(default_model_path()), "-c", "2048", "-np", "4", "-a", "mymodel",
                                "-ngl", "99", "-cb", "--metrics", "--jinja", "--temp", "0", "-n", "5",
                                "--no-embedding-model", sizes=False)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [(m.id, m.max_model_len) for m in client.models.list().data] == [("mymodel", 512)]  # 2048 / 4
        props = httpx.get(f"{url}/props").json()
        assert (props["total_slots"], props["default_generation_settings"]["n_ctx"]) == (4, 512)
        assert httpx.get(f"{url}/health").json()["num_kv_blocks"] * 16 == 2048  # the KV cache -c asked for
        reply = client.chat.completions.create(model="mymodel", messages=[{"role": "user", "content": "Count: 1, 2,"}])
        assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (5, "length")  # -n 5
        again = client.chat.completions.create(model="mymodel", messages=[{"role": "user", "content": "Count: 1, 2,"}])
        assert again.choices[0].message.content == reply.choices[0].message.content  # --temp 0: greedy
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_unsupported_llama_server_flag_stops_start_up_by_name():
    done = subprocess.run([sys.executable, "-m", "lmserve.cli", "serve", "-m", str(default_model_path()),
                           "--rope-scaling", "yarn"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == ("lmserve: --rope-scaling is a llama-server flag lmserve does not support: lmserve uses "
                           "the model's own RoPE settings\n")
