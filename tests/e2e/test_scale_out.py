"""Replicas on Ray Serve (`lmserve serve --replicas 2 --max-num-seqs 1`), on a local Ray instance:
every kind of route through the ingress, its own listener, requests spread over the replicas, a
shared prefix kept on one replica, a replica killed without losing the requests it had taken and
not started, models' replicas deployed and deleted as the fleet loads and unloads them, and an
ingress restarted by Ray Serve (test_scale_cluster.py: a Ray cluster, and autoscaling, on servers
of their own that never run beside this one: two Ray instances running engines would share the cores)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import time
import urllib.parse

import httpx
import psutil
import pytest

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server
from tests.helpers.prometheus import metric_samples
from tests.helpers.ray_replicas import (complete, delta, engine_replica_pids, ingress_pids, routed, stop,
                                       wait_for_replicas)

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("models")  # empty at start
    proc, url, _ = start_server(str(default_model_path()), "--replicas", "2", "--max-num-seqs", "1",
                                "--kv-cache-memory", "64MiB", "--read-timeout", "2", "--models-dir", str(models_dir))
    try:  # with a models folder, no model loads before it is asked for
        assert httpx.post(f"{url}/models/load", json={"model": "SmolLM2-135M-Instruct"}, timeout=120).json()["success"]
        wait_for_replicas(proc.pid, 2)
        yield {"url": url, "pid": proc.pid, "models_dir": models_dir}
    finally:
        stop(proc)


@pytest.fixture
def replicated(server):
    return server["url"]


def test_the_routes_through_the_ingress(replicated):
    import openai

    client = openai.OpenAI(base_url=f"{replicated}/v1", api_key="unused", max_retries=0, timeout=120)
    models = {model.id for model in client.models.list().data}
    assert "SmolLM2-135M-Instruct" in models and "all-MiniLM-L6-v2" in models
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8,
                                           temperature=0)
    assert whole.usage.completion_tokens == 8 and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole.choices[0].message.content  # greedy: the same reply whichever replica ran it
    response = client.responses.create(model="SmolLM2-135M-Instruct", input="Say yes.", max_output_tokens=6)
    assert client.responses.retrieve(response.id).output_text == response.output_text  # stored in the ingress
    vectors = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384
    tokens = httpx.post(f"{replicated}/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert httpx.post(f"{replicated}/detokenize", json={"tokens": tokens}).json()["content"] == "hello world"
    assert httpx.get(f"{replicated}/health").json()["status"] == "ok"
    refused = httpx.post(f"{replicated}/v1/embeddings", json={"model": "SmolLM2-135M-Instruct", "input": "x"})
    assert refused.status_code == 501 and "replicas" in refused.json()["error"]["message"]


def test_the_ingress_answers_http_itself_with_lmserve_connection_limits(server):
    """No Ray Serve proxy in front: lmserve's own listener in the ingress, so its connection flags
    hold (--read-timeout 2: a request head that never ends is answered 408, OpenAI-shaped)."""
    titles = []
    for process in psutil.Process(server["pid"]).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(process.cmdline()))
    assert any("lmserve-ingress" in title for title in titles) and not any("ProxyActor" in t for t in titles)
    address = urllib.parse.urlsplit(server["url"])
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        started, data = time.monotonic(), b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < 2 + 5
    assert httpx.get(f"{server['url']}/health").json()["status"] == "ok"


def test_the_local_ray_instance_runs_serve_s_control_loop_at_half_a_second(server):
    """Ray Serve's controller wakes twice a second rather than ten times: its CPU is the engines'."""
    [controller] = [process for process in psutil.Process(server["pid"]).children(recursive=True)
                    if "ServeController" in " ".join(process.cmdline())]
    assert controller.environ()["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"


def test_requests_spread_over_both_replicas(replicated):
    """Two at a time: under --max-num-seqs 1 a replica holds two (one running, one in its queue),
    so a router that always chose one replica could send it all eight."""
    before = routed(replicated)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: complete(replicated, f"Item {i} of a list of unrelated things:",
                                                   max_tokens=24, ignore_eos=True), range(8)))
    assert [answer.status_code for answer in answers] == [200] * 8
    spread = delta(before, routed(replicated))
    assert len(spread) == 2 and sum(spread.values()) == 8, spread


def test_a_shared_prefix_goes_to_the_replica_that_holds_it(replicated):
    for topic in ("rivers", "mountains", "deserts", "forests"):
        system = f"You are a guide to the world's {topic}. " + " ".join(f"Rule {k}: be brief about {topic}."
                                                                        for k in range(40))
        before = routed(replicated)
        replies = [httpx.post(f"{replicated}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0}).json() for question in ("Which is longest?", "Which is oldest?")]
        assert replies[0]["usage"]["prompt_tokens"] > 300
        assert replies[1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256, replies[1]["usage"]
        assert list(delta(before, routed(replicated)).values()) == [2]  # both on one replica
    samples = metric_samples(httpx.get(f"{replicated}/metrics").text)
    hits = samples[("lmserve:prefix_cache_hits_total", (("model", "SmolLM2-135M-Instruct"),))]
    assert hits >= 4 * 256 / 16  # the replicas' step stats reach the ingress's /metrics


def test_a_killed_replica_loses_no_request_that_had_not_streamed(server):
    """Each replica runs one sequence at a time (--max-num-seqs 1) and holds one more in its queue.
    A stream runs on one replica; a second stream with the same long prompt start follows it there
    (prefix-aware routing) and waits in that replica's queue; two requests wait at the ingress for
    a turn. Killing that replica ends the first stream with an error event; the second, taken but
    not started, is sent again to the other replica and streams in full, as are the requests that
    waited at the ingress and those sent after the kill."""
    url, pid = server["url"], server["pid"]
    shared = "You are a storyteller. Tell long stories about a lighthouse keeper and the sea. " * 2
    streams: dict[int, list[dict]] = {}

    def stream(i: int, max_tokens: int) -> None:
        body = {"prompt": f"{shared}Story {i}:", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            frames = "".join(response.iter_text()).split("\n\n")  # not iter_lines: the text may hold U+2028
        streams[i] = [json.loads(frame[6:]) for frame in frames if frame.startswith("data: {")]

    def samples() -> dict:
        return metric_samples(httpx.get(f"{url}/metrics").text)

    def load() -> tuple[float, float]:
        """Requests on the replicas, and requests waiting at the ingress's gate."""
        model = (("model", "SmolLM2-135M-Instruct"),)
        now = samples()
        return now[("lmserve:num_requests_running", model)], now[("lmserve:num_requests_queued", model)]

    def waiting_on_replicas() -> dict[str, float]:
        return {dict(labels)["replica"]: value for (name, labels), value in samples().items()
                if name == "lmserve:replica_num_requests_waiting" and value}

    pids = wait_for_replicas(pid, 2)
    before = routed(url)  # the requests of the tests before this one
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(stream, 0, 1900)  # still decoding when its replica is killed
        deadline = time.monotonic() + 60
        while not delta(before, routed(url)) and time.monotonic() < deadline:
            time.sleep(0.1)
        [replica] = delta(before, routed(url))
        second = pool.submit(stream, 1, 48)
        deadline = time.monotonic() + 30
        while not waiting_on_replicas() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting_on_replicas() == {replica: 1}  # the second stream is in the first's replica's queue
        waiting = [pool.submit(complete, url, f"Waiting {k}:", ignore_eos=True) for k in range(2)]
        deadline = time.monotonic() + 30
        while load() != (2, 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (now := load()) == (2, 2), now
        assert not second.done() and all(not future.done() for future in waiting)
        victim = busiest(pids)  # the replica decoding the first stream
        assert not first.done()
        os.kill(victim, signal.SIGKILL)
        after = [complete(url, f"Question {k} after the kill:", ignore_eos=True) for k in range(2)]
        first.result()
        second.result()
        answers = [future.result() for future in waiting] + after
    assert [answer.status_code for answer in answers] == [200] * 4, [answer.text for answer in answers]
    assert [answer.json()["usage"]["completion_tokens"] for answer in answers] == [8] * 4
    assert "error" in streams[0][-1] and "replica" in streams[0][-1]["error"]["message"], streams[0][-1]
    assert not any("error" in event for event in streams[1]), streams[1]
    assert streams[1][-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(event["choices"][0]["text"] for event in streams[1])  # its text came, from elsewhere
    elsewhere = delta(before, routed(url))
    assert sum(elsewhere.values()) - elsewhere[replica] == 1 + 4  # all but the first stream
    wait_for_replicas(pid, 2)  # Ray Serve replaced it


def busiest(pids: list[int]) -> int:
    """Of the processes `pids`, the one that used the most CPU time over half a second."""
    processes = [psutil.Process(pid) for pid in pids]
    before = [sum(process.cpu_times()[:2]) for process in processes]
    time.sleep(0.5)
    used = [sum(process.cpu_times()[:2]) - start for process, start in zip(processes, before)]
    return pids[used.index(max(used))]


def test_models_are_deployed_as_the_fleet_loads_them_and_deleted_as_it_unloads_them(server):
    """Each model's replicas live while the fleet holds the model: a model added to --models-dir
    after start is deployed by its first request, unless its replicas have no CPUs left to run on
    (503, retry later); unloading a model deletes its replicas, and its next request deploys them
    again."""
    url, pid = server["url"], server["pid"]
    shutil.copyfile(default_model_path(), server["models_dir"] / "second.gguf")  # a file of its own: a model of its own

    def card(model: str) -> str:
        return httpx.get(f"{url}/models/{model}").json()["status"]["value"]

    full = complete(url, "No room:", model="second")  # SmolLM2's two replicas hold both CPUs
    assert full.status_code == 503 and full.json()["error"]["code"] == "model_capacity", full.text
    assert "no room for second's replicas" in full.json()["error"]["message"] and card("second") == "unloaded"
    answer = httpx.post(f"{url}/models/unload", json={"model": "SmolLM2-135M-Instruct"}, timeout=120)
    assert answer.json() == {"success": True}
    wait_for_replicas(pid, 0, timeout=60)
    assert card("SmolLM2-135M-Instruct") == "unloaded"
    second = complete(url, "Now there is room:", model="second", max_tokens=4, ignore_eos=True)
    assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 4
    assert len(engine_replica_pids(pid)) == 2 and card("second") == "loaded"
    assert httpx.post(f"{url}/models/unload", json={"model": "second"}, timeout=120).json() == {"success": True}
    wait_for_replicas(pid, 0, timeout=60)
    again = complete(url, "Back again:", model="SmolLM2-135M-Instruct", max_tokens=4, ignore_eos=True)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert len(engine_replica_pids(pid)) == 2 and card("SmolLM2-135M-Instruct") == "loaded"


def test_an_ingress_ray_serve_restarts_deletes_the_replicas_no_fleet_holds(server):
    """The ingress's process dies with SmolLM2's replicas up; Ray Serve starts a new ingress, whose
    fleet holds no model: it answers HTTP on the same address again, the old replicas are deleted
    (their CPUs free for `second`), and a model asked for is deployed anew."""
    url, pid = server["url"], server["pid"]
    if not (server["models_dir"] / "second.gguf").exists():  # run alone, without the test before
        shutil.copyfile(default_model_path(), server["models_dir"] / "second.gguf")
    assert complete(url, "Before:", model="SmolLM2-135M-Instruct").status_code == 200
    [ingress] = ingress_pids(pid)
    os.kill(ingress, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200 and ingress_pids(pid) not in ([], [ingress]):
                break
        time.sleep(0.5)
    else:
        raise TimeoutError("no ingress answered again")
    wait_for_replicas(pid, 0, timeout=60)
    second = complete(url, "A new ingress:", model="second", max_tokens=4, ignore_eos=True)
    assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 4, second.text
    assert len(engine_replica_pids(pid)) == 2
