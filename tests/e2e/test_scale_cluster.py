"""`lmserve serve --ray-address`: joining a Ray cluster started beforehand (`ray start --head` on
this machine, a cluster of one node) rather than starting a local instance. It deploys there,
answers on this machine, and on stopping removes its applications and leaves the cluster and
its Serve running. Without --ray-address it starts an instance of its own even beside such a
cluster (and with RAY_ADDRESS set), autoscales there, and leaves the cluster alone. The cluster
runs no engine while that instance's replicas run, and test_scale_out.py's server runs only while
that file's tests do: two Ray instances running engines would share the cores."""

from __future__ import annotations

import concurrent.futures
import json
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.helpers.live_server import _free_port, start_server
from tests.helpers.ray_replicas import stop, wait_for_replicas

RAY = str(Path(sys.executable).with_name("ray"))


def serve_applications(address: str) -> list[str]:
    """The cluster's Serve applications, asked by a driver of its own."""
    script = ("import json, ray; from ray import serve; ray.init(address=%r, logging_level='ERROR'); "
              "print(json.dumps(sorted(serve.status().applications)))" % address)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    """One cluster for the file's tests: each leaves it as it found it (the first asserts so)."""
    with pytest.MonkeyPatch.context() as patch:
        # As a cluster's users must: token authentication, which `ray start` turns on, in every
        # driver's environment (lmserve serve's, and so its replicas', included), with the cluster's
        # token: a fresh machine has none (~/.ray/auth_token), and `ray start` refuses to start without.
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
        address = f"127.0.0.1:{_free_port()}"
        subprocess.run([RAY, "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=2",
                        "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True,
                       timeout=180)
        try:
            yield address
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_it_joins_a_cluster_and_leaves_it_as_it_found_it(cluster):
    proc, url, _ = start_server("--ray-address", cluster, "--replicas", "1", "--no-embedding-model",
                                "--kv-cache-memory", "64MiB")
    try:
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "On a cluster:", "max_tokens": 4,
                                                           "ignore_eos": True}, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        assert serve_applications(cluster) == ["lmserve", "lmserve-model-SmolLM2-135M-Instruct"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=90) == 0
    assert serve_applications(cluster) == []  # its own removed; the cluster and its Serve still answer


def test_without_ray_address_it_runs_and_autoscales_its_own_instance_beside_a_cluster(cluster, monkeypatch):
    """Ray's default would join the cluster `ray start` left on this machine (or RAY_ADDRESS's),
    and stopping would then shut that cluster's Serve down. Its replicas descend from it, the one
    it starts with and the one autoscaling adds: four streams on one replica, against a target of
    one request per replica, and Ray Serve adds the second (within its metrics' push interval,
    10 s); the streams run until it is up."""
    monkeypatch.setenv("RAY_ADDRESS", cluster)
    proc, url, _ = start_server("--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
                                "--scale-up-delay", "1", "--no-embedding-model", "--kv-cache-memory", "64MiB")
    enough = threading.Event()

    def load(i: int) -> int:
        body = {"prompt": f"Load {i}: " * 8, "max_tokens": 1900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for _ in response.iter_bytes():
                if enough.is_set():
                    break
            return response.status_code

    try:
        wait_for_replicas(proc.pid, 1, timeout=60)  # its replica descends from it: a Ray instance of its own
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "Beside a cluster:", "max_tokens": 4,
                                                           "ignore_eos": True}, timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        assert serve_applications(cluster) == []  # nothing deployed on the cluster
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(load, i) for i in range(4)]
            try:
                wait_for_replicas(proc.pid, 2, timeout=90)
            finally:
                enough.set()
            assert [stream.result() for stream in streams] == [200] * 4
    finally:
        stop(proc)  # its own instance's processes all gone
    assert serve_applications(cluster) == []  # the cluster still answers
