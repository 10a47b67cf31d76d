"""Overload soak: one client floods a server with far more concurrent chat requests than it
queues, while another sends one short probe request at a time. Prints the requests sent, how many
were answered 200, 429 and 503 (and other errors), the probe's latency percentiles and the
server's peak resident memory. Not run by CI.

    python -m bench.overload                          # starts `lmserve serve` with the flags below
    python -m bench.overload --seconds 120 --flood 400 --server-args "--max-queued-requests 100000"
    python -m bench.overload --url http://127.0.0.1:8080 --server-pid PID   # a server already up

The flood client sends again 0.2 s after a refusal (an impatient client, not a hot loop); the
probe client is another API key, so it gets its own turns.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shlex
import subprocess
import sys
import time

import httpx

from bench.rss import PeakRSSSampler
from bench.stats import percentile
from tests.helpers.live_server import start_server

FLOOD_KEY, PROBE_KEY = "flood", "probe"
SERVER_ARGS = "--max-num-seqs 16 --no-embedding-model"


def chat_body(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}


async def flood_worker(http: httpx.AsyncClient, until: float, max_tokens: int, counts: collections.Counter) -> None:
    while time.monotonic() < until:
        try:
            response = await http.post("/v1/chat/completions", json=chat_body(max_tokens),
                                       headers={"Authorization": f"Bearer {FLOOD_KEY}"})
            counts[response.status_code] += 1
            if response.status_code != 200:
                await asyncio.sleep(0.2)
        except httpx.HTTPError as exc:
            counts[type(exc).__name__] += 1


async def probe(http: httpx.AsyncClient, until: float, latencies: list[float], counts: collections.Counter) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        response = await http.post("/v1/chat/completions", json=chat_body(16),
                                   headers={"Authorization": f"Bearer {PROBE_KEY}"})
        counts[response.status_code] += 1
        if response.status_code == 200:
            latencies.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def soak(url: str, seconds: float, flood: int, max_tokens: int) -> tuple[collections.Counter, collections.Counter,
                                                                               list[float]]:
    flood_counts: collections.Counter = collections.Counter()
    probe_counts: collections.Counter = collections.Counter()
    latencies: list[float] = []
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=flood + 4, max_keepalive_connections=flood + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        workers = [flood_worker(http, until, max_tokens, flood_counts) for _ in range(flood)]
        await asyncio.gather(probe(http, until, latencies, probe_counts), *workers)
    return flood_counts, probe_counts, latencies


def report(flood_counts, probe_counts, latencies: list[float], peak_bytes: int | None, seconds: float) -> str:
    sent = sum(flood_counts.values())
    lines = [f"{seconds:.0f} s; flood requests {sent}: " + ", ".join(f"{k}: {v}" for k, v in sorted(
        flood_counts.items(), key=str)), "probe requests: " + ", ".join(f"{k}: {v}" for k, v in probe_counts.items())]
    if latencies:
        lines.append(f"probe latency s: p50 {percentile(latencies, 50):.2f}, p99 {percentile(latencies, 99):.2f}, "
                     f"max {max(latencies):.2f}")
    if peak_bytes is not None:
        lines.append(f"server peak RSS: {peak_bytes / 2**20:.0f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a server already running (default: start one)")
    parser.add_argument("--server-pid", type=int, help="its pid, for the peak RSS")
    parser.add_argument("--server-args", default="", help=f"more `lmserve serve` flags (after: {SERVER_ARGS})")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--flood", type=int, default=400, help="the flood's concurrent requests")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per flood request")
    args = parser.parse_args(argv)
    proc = None
    url, pid = args.url, args.server_pid
    if url is None:
        extra = [*shlex.split(SERVER_ARGS), "--api-key", FLOOD_KEY, "--api-key", PROBE_KEY,
                 *shlex.split(args.server_args)]
        proc, url, _ = start_server(*extra, stdout=subprocess.DEVNULL)
        pid = proc.pid
    try:
        with PeakRSSSampler(pid) as sampler:
            flood_counts, probe_counts, latencies = asyncio.run(soak(url, args.seconds, args.flood, args.max_tokens))
        print(report(flood_counts, probe_counts, latencies, sampler.peak_bytes, args.seconds))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1:])
