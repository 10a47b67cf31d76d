"""The engine replicas of a `lmserve serve --replicas` process (its local Ray instance's
processes descend from it), found by their process titles; what the replica tests ask of it."""

from __future__ import annotations

import re
import time

import httpx
import psutil

from tests.helpers.prometheus import metric_samples

ENGINE_TITLE = re.compile(r"ray::ServeReplica:lmserve(-model-[^:]+)?:lmserve-engine-")  # its model's app, or the one app


INGRESS_TITLE = re.compile(r"ray::ServeReplica:lmserve:lmserve-ingress")


def engine_replica_pids(server_pid: int) -> list[int]:
    """Processes running an engine replica of the server `server_pid` (not those still starting)."""
    return _titled(server_pid, ENGINE_TITLE)


def ingress_pids(server_pid: int) -> list[int]:
    """The process running the server's ingress (not while it starts)."""
    return _titled(server_pid, INGRESS_TITLE)


def _titled(server_pid: int, title_pattern: re.Pattern) -> list[int]:
    pids = []
    for process in psutil.Process(server_pid).children(recursive=True):
        try:
            title = process.cmdline()[0] if process.cmdline() else ""
        except psutil.Error:  # gone meanwhile
            continue
        if title_pattern.match(title) and "initialize" not in title:
            pids.append(process.pid)
    return sorted(pids)


def wait_for_replicas(server_pid: int, count: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = engine_replica_pids(server_pid)
        if len(pids) == count:
            return pids
        time.sleep(0.5)
    raise TimeoutError(f"{count} engine replicas did not come up (found {engine_replica_pids(server_pid)})")


def leftover_ray_processes(pids: list[int]) -> list[int]:
    """Of `pids`, those still running (a zombie has finished)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


REPLICA_REQUESTS = "lmserve:replica_requests_total"


def stop(proc) -> None:
    """SIGTERM, as a user's Ctrl-C or a service manager would: the local Ray instance stops too."""
    started = [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    proc.terminate()
    proc.wait(timeout=60)
    assert leftover_ray_processes(started) == []


def routed(url: str) -> dict[str, float]:
    """Engine requests so far, by replica."""
    samples = metric_samples(httpx.get(f"{url}/metrics").text)
    return {dict(labels)["replica"]: value for (name, labels), value in samples.items() if name == REPLICA_REQUESTS}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {replica: count - before.get(replica, 0) for replica, count in after.items()
            if count - before.get(replica, 0)}


def complete(url: str, prompt: str, **fields) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)
