"""A real `lmserve serve` process on the packaged default model, on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

MAX_MODEL_LEN = 2048

# The keyed server the end-to-end tests share (tests/e2e/conftest.py): test_auth.py's keys, and
# test_overload.py's limits (its flood and its probe are told apart by key).
KEYS = ("e2e-secret", "second-key")
KEYED_MAX_RUNNING = 2  # --max-num-seqs
KEYED_MAX_QUEUED = 4  # --max-queued-requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> list[int]:
    """Poll /health; return the status codes seen (503 while loading, then 200)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            seen.append(httpx.get(f"{url}/health", timeout=2).status_code)
            if seen[-1] == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server did not become ready")


def start_server(*extra: str, stdout=None, stderr=None, sizes: bool = True):
    """A server on a free port with `extra` arguments; `stdout` and `stderr` as for
    subprocess.Popen. `sizes`: the tests' context and KV budget (leave them out when `extra`
    sets them another way)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    limits = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MiB"] if sizes else []
    if "--data-dir" not in extra:  # stored responses stay in memory, out of the user's data folder
        limits += ["--data-dir", "none"]
    cmd = [sys.executable, "-m", "lmserve.cli", "serve", "--port", str(port), *limits, "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=stdout, stderr=stderr, text=True)
    try:
        health_codes = _wait_ready(url, proc)
    except Exception:
        proc.kill()
        raise
    return proc, url, health_codes
