"""Replicas on Ray Serve, each test on a server of its own (after test_scale_out.py's shared one
has stopped, so two Ray instances never share the cores): a replica killed without losing the
requests it had not started, and autoscaling under load."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx

from tests.helpers.live_server import start_server
from tests.helpers.prometheus import metric_samples
from tests.helpers.ray_replicas import complete, engine_replica_pids, routed, stop, wait_for_replicas


def test_a_killed_replica_loses_no_request_that_had_not_streamed():
    """Each replica runs one sequence at a time (--max-num-seqs 1): a stream on each, and two
    requests behind them waiting at the ingress for a turn. Killing one replica ends its stream
    with an error event; the waiting requests are answered in full by the other replica, as are
    requests sent after the kill. (A request lost on a replica before its first output is sent
    again elsewhere: tests/unit/test_remote_engine.py.)"""
    proc, url, _ = start_server("--replicas", "2", "--max-num-seqs", "1", "--no-embedding-model",
                                "--kv-cache-memory", "64MiB", "--speculative-ngram", "0")  # streams of some seconds
    streams: dict[int, list[dict]] = {}

    def stream(i: int) -> None:
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 1900, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            frames = "".join(response.iter_text()).split("\n\n")  # not iter_lines: the text may hold U+2028
        streams[i] = [json.loads(frame[6:]) for frame in frames if frame.startswith("data: {")]

    def load() -> tuple[float, float]:
        """Sequences running on the replicas, and requests waiting at the ingress's gate."""
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
        model = (("model", "SmolLM2-135M-Instruct"),)
        return samples[("lmserve:num_requests_running", model)], samples[("lmserve:num_requests_queued", model)]

    try:
        wait_for_replicas(proc.pid, 2)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = []
            for count in (1, 2):  # one after the other: the second goes to the replica without a request
                running.append(pool.submit(stream, count - 1))
                deadline = time.monotonic() + 60
                while len(routed(url)) < count and time.monotonic() < deadline:
                    time.sleep(0.1)
            assert list(routed(url).values()) == [1, 1]  # streaming, one on each replica
            waiting = [pool.submit(complete, url, f"Waiting {k}:", ignore_eos=True) for k in range(2)]
            deadline = time.monotonic() + 30
            while load() != (2, 2) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (now := load()) == (2, 2), now
            assert all(not future.done() for future in waiting)
            os.kill(engine_replica_pids(proc.pid)[0], signal.SIGKILL)
            after = [complete(url, f"Question {k} after the kill:", ignore_eos=True) for k in range(2)]
            for future in running:
                future.result()
            answers = [future.result() for future in waiting] + after
        assert [answer.status_code for answer in answers] == [200] * 4, [answer.text for answer in answers]
        assert [answer.json()["usage"]["completion_tokens"] for answer in answers] == [8] * 4
        last_events = sorted((events[-1] for events in streams.values()), key=lambda event: "error" in event)
        assert ["error" in event for event in last_events] == [False, True], last_events
        assert last_events[0]["choices"][0]["finish_reason"] == "length"
        assert "replica" in last_events[1]["error"]["message"]
        wait_for_replicas(proc.pid, 2)  # Ray Serve replaced it
    finally:
        stop(proc)


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
