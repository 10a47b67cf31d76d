"""Replicas on Ray Serve, each test on a server of its own (after test_scale_out.py's shared one
has stopped, so two Ray instances never share the cores): a replica killed without losing the
requests it had taken and not started, and autoscaling under load."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx
import psutil

from tests.helpers.live_server import start_server
from tests.helpers.prometheus import metric_samples
from tests.helpers.ray_replicas import complete, engine_replica_pids, routed, stop, wait_for_replicas


def test_a_killed_replica_loses_no_request_that_had_not_streamed():
    """Each replica runs one sequence at a time (--max-num-seqs 1) and holds one more in its queue.
    A stream runs on one replica; a second stream with the same long prompt start follows it there
    (prefix-aware routing) and waits in that replica's queue; two requests wait at the ingress for
    a turn. Killing that replica ends the first stream with an error event; the second, taken but
    not started, is sent again to the other replica and streams in full, as are the requests that
    waited at the ingress and those sent after the kill."""
    proc, url, _ = start_server("--replicas", "2", "--max-num-seqs", "1", "--no-embedding-model",
                                "--kv-cache-memory", "64MiB", "--speculative-ngram", "0")
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

    try:
        pids = wait_for_replicas(proc.pid, 2)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(stream, 0, 1900)  # still decoding when its replica is killed
            deadline = time.monotonic() + 60
            while not routed(url) and time.monotonic() < deadline:
                time.sleep(0.1)
            [replica] = routed(url)
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
        elsewhere = routed(url)
        assert sum(elsewhere.values()) - elsewhere[replica] == 1 + 4  # all but the first stream
        wait_for_replicas(proc.pid, 2)  # Ray Serve replaced it
    finally:
        stop(proc)


def busiest(pids: list[int]) -> int:
    """Of the processes `pids`, the one that used the most CPU time over half a second."""
    processes = [psutil.Process(pid) for pid in pids]
    before = [sum(process.cpu_times()[:2]) for process in processes]
    time.sleep(0.5)
    used = [sum(process.cpu_times()[:2]) - start for process, start in zip(processes, before)]
    return pids[used.index(max(used))]


def test_autoscaling_adds_a_replica_under_load():
    """Four streams on one replica, against a target of one request per replica: Ray Serve adds
    the second (within its metrics' push interval, 10 s); the streams run until it is up."""
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
        wait_for_replicas(proc.pid, 1)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(load, i) for i in range(4)]
            try:
                wait_for_replicas(proc.pid, 2, timeout=90)
            finally:
                enough.set()
            assert [stream.result() for stream in streams] == [200] * 4
    finally:
        stop(proc)
