"""Stopping a real server with SIGTERM or SIGINT: streams in flight finish (or, past
--shutdown-timeout, end with an error event then [DONE]), new connections are refused, and the
process exits 0 within the bound; a second signal exits at once. Each test stops its own server."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.helpers.live_server import start_server

NUM_STREAMS = 4
SHUTDOWN_TIMEOUT = 30.0


class Streams:
    """NUM_STREAMS streaming chat requests run in threads; each one's status and SSE data lines."""

    def __init__(self, url: str, max_tokens: int):
        self.results: dict[int, tuple[int, list[str]] | Exception] = {}
        body = {"messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                "max_tokens": max_tokens, "stream": True, "temperature": 1.0, "ignore_eos": True}
        self.threads = [threading.Thread(target=self._run, args=(i, url, body)) for i in range(NUM_STREAMS)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            self.results[i] = (response.status_code, lines)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to show
            self.results[i] = exc

    def wait_until_streaming(self, url: str) -> None:
        """Until the server reports every stream running (so the signal finds them in flight)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _running(url) >= NUM_STREAMS:
                return
            time.sleep(0.1)
        raise TimeoutError("the streams did not start")

    def join(self) -> dict:
        for thread in self.threads:
            thread.join(timeout=60)
        return self.results


def _running(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values = [line.split()[-1] for line in text.splitlines() if line.startswith("lmserve:num_requests_running{")]
    return int(float(values[0])) if values else 0


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def _stop(proc, sig: int = signal.SIGTERM) -> float:
    """Send `sig`; the seconds until the process exits."""
    started = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=SHUTDOWN_TIMEOUT + 15)
    return time.monotonic() - started


@pytest.fixture
def served():
    proc, url, _ = start_server("--no-embedding-model", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigterm_lets_streams_finish_refuses_new_connections_and_exits_0(served):
    proc, url = served
    streams = Streams(url, max_tokens=200)
    streams.wait_until_streaming(url)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert _refused(url)
    proc.wait(timeout=SHUTDOWN_TIMEOUT + 15)
    assert proc.returncode == 0
    for status, lines in streams.join().values():
        assert status == 200 and lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"  # all 200 tokens came


def test_a_second_sigterm_exits_at_once(served):
    proc, url = served
    streams = Streams(url, max_tokens=1500)
    streams.wait_until_streaming(url)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # draining
    assert _stop(proc) < 3
    assert proc.returncode == 128 + signal.SIGTERM
    streams.join()


def test_past_the_shutdown_timeout_streams_end_with_an_error_then_done():
    proc, url, _ = start_server("--no-embedding-model", "--shutdown-timeout", "0.5")
    try:
        streams = Streams(url, max_tokens=1500)
        streams.wait_until_streaming(url)
        seconds = _stop(proc)
    finally:
        proc.kill()
    assert proc.returncode == 0 and seconds < 0.5 + 5
    for status, lines in streams.join().values():
        assert status == 200 and lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error" and "shutting down" in error["message"]


def test_an_idle_server_exits_0_at_once_on_sigint(served):
    proc, _ = served
    assert _stop(proc, signal.SIGINT) < 3
    assert proc.returncode == 0
