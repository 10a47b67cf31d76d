"""Overload soak: one client floods a server with far more concurrent chat requests than it
queues, while another sends one short probe request at a time. Prints the requests sent, how many
were answered 200, 429 and 503 (and other errors), the probe's latency percentiles and the
server's peak resident memory. Not run by CI.

    python -m bench.overload                          # starts `lmserve serve` with the flags below
    python -m bench.overload --seconds 120 --flood 400 --server-args "--max-queued-requests 100000"
    python -m bench.overload --url http://127.0.0.1:8080 --server-pid PID   # a server already up

The flood client sends again 0.2 s after a refusal (an impatient client, not a hot loop), or with
--honour-retry-after waits the seconds the refusal's Retry-After says, as the OpenAI clients do.
With --cut F it streams, and a fraction F of its requests hang up at a random point of their
stream (the disconnects counted as "cut"). The probe client is another API key, so it gets its
own turns.

    python -m bench.overload --honour-retry-after --cut 0.4
    python -m bench.overload --costly            # every flood request at the per-request cost limits

With --costly each flood request asks for n=16, 256 stop strings and a 1,024-token logit_bias (the
limits of lmserve/server/requests/cost.py), and every tenth one goes one over a limit (a 400); the
report adds the server's resident memory before the flood and after it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import random
import shlex
import subprocess
import sys
import time

import httpx
import psutil

from bench.rss import PeakRSSSampler
from bench.stats import percentile
from tests.helpers.live_server import start_server

FLOOD_KEY, PROBE_KEY = "flood", "probe"
SERVER_ARGS = "--max-num-seqs 16 --no-embedding-model"


def chat_body(max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}


def costly_body(max_tokens: int, rng: random.Random) -> dict:
    """A request at the per-request cost limits; one in ten has 257 stop strings, one over (a 400)."""
    over = rng.random() < 0.1
    stops = [f"stop marker {i:04d}" for i in range(256 + over)]
    bias = {str(token): -1.0 for token in range(1000, 2024)}
    return {**chat_body(max_tokens), "temperature": 1.0, "n": 16, "stop": stops, "logit_bias": bias}


@dataclasses.dataclass(frozen=True)
class Flood:
    max_tokens: int
    honour_retry_after: bool = False  # wait what a refusal's Retry-After says, else 0.2 s
    cut: float = 0.0  # the fraction of requests that hang up mid-stream (then every request streams)
    costly: bool = False  # every request at the per-request cost limits


async def flood_worker(http: httpx.AsyncClient, until: float, flood: Flood, counts: collections.Counter,
                       rng: random.Random) -> None:
    while time.monotonic() < until:
        try:
            if flood.cut:
                status, headers = await _streamed(http, flood, rng.randrange(flood.max_tokens)
                                                  if rng.random() < flood.cut else None, counts)
            else:
                body = costly_body(flood.max_tokens, rng) if flood.costly else chat_body(flood.max_tokens)
                response = await http.post("/v1/chat/completions", json=body,
                                           headers={"Authorization": f"Bearer {FLOOD_KEY}"})
                status, headers = response.status_code, response.headers
            counts[status] += 1
            if status != 200:
                wait = float(headers.get("Retry-After", 1)) if flood.honour_retry_after else 0.2
                await asyncio.sleep(wait)
        except httpx.HTTPError as exc:
            counts[type(exc).__name__] += 1


async def _streamed(http: httpx.AsyncClient, flood: Flood, cut_after: int | None,
                    counts: collections.Counter) -> tuple[int, httpx.Headers]:
    """One streamed flood request, hanging up after `cut_after` events (None: read it all)."""
    body = {**chat_body(flood.max_tokens), "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {FLOOD_KEY}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.headers
        events = 0
        async for line in response.aiter_lines():
            events += line.startswith("data: ")
            if cut_after is not None and events > cut_after:
                counts["cut"] += 1
                break  # leaving the block closes the connection
        return 200, response.headers


async def probe(http: httpx.AsyncClient, until: float, latencies: list[float], counts: collections.Counter) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        response = await http.post("/v1/chat/completions", json=chat_body(16),
                                   headers={"Authorization": f"Bearer {PROBE_KEY}"})
        counts[response.status_code] += 1
        if response.status_code == 200:
            latencies.append(time.monotonic() - started)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def soak(url: str, seconds: float, num_flood: int, flood: Flood) -> tuple[collections.Counter,
                                                                              collections.Counter, list[float]]:
    flood_counts: collections.Counter = collections.Counter()
    probe_counts: collections.Counter = collections.Counter()
    latencies: list[float] = []
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=num_flood + 4, max_keepalive_connections=num_flood + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        workers = [flood_worker(http, until, flood, flood_counts, random.Random(i)) for i in range(num_flood)]
        await asyncio.gather(probe(http, until, latencies, probe_counts), *workers)
    return flood_counts, probe_counts, latencies


def report(flood_counts, probe_counts, latencies: list[float], peak_bytes: int | None, seconds: float) -> str:
    sent = sum(value for key, value in flood_counts.items() if key != "cut")  # a cut request is also a 200
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
    parser.add_argument("--honour-retry-after", action="store_true", help="the flood waits as Retry-After says")
    parser.add_argument("--cut", type=float, default=0.0, help="fraction of flood requests cut mid-stream")
    parser.add_argument("--costly", action="store_true", help="flood requests at the per-request cost limits")
    args = parser.parse_args(argv)
    flood = Flood(args.max_tokens, args.honour_retry_after, args.cut, args.costly)
    proc = None
    url, pid = args.url, args.server_pid
    if url is None:
        extra = [*shlex.split(SERVER_ARGS), "--api-key", FLOOD_KEY, "--api-key", PROBE_KEY,
                 *shlex.split(args.server_args)]
        proc, url, _ = start_server(*extra, stdout=subprocess.DEVNULL)
        pid = proc.pid
    try:
        before = psutil.Process(pid).memory_info().rss
        with PeakRSSSampler(pid) as sampler:
            flood_counts, probe_counts, latencies = asyncio.run(soak(url, args.seconds, args.flood, flood))
        time.sleep(2)  # the last refusals and aborts settle
        after = psutil.Process(pid).memory_info().rss
        print(report(flood_counts, probe_counts, latencies, sampler.peak_bytes, args.seconds))
        print(f"server RSS before the flood {before / 2**20:.0f} MiB, after it {after / 2**20:.0f} MiB")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main(sys.argv[1:])
