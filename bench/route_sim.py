"""Routing simulator: a synthetic multi-tenant trace replayed over simulated replicas, each with a
prefix cache of fixed capacity, under four routing policies (pure Python, no Ray, no model).

The trace: a few hundred system prompts (256 to 1,024 tokens) drawn with a Zipf popularity, each
request one of them followed by a short user turn of its own (16 to 64 tokens) and an answer of
64 to 256 tokens; arrivals are Poisson, at a rate that keeps `--in-flight` requests per replica on
average. A replica's cache is an LRU of KV block hashes (the prefix cache's hashes, 16-token
blocks); a request's cached tokens are its leading blocks found there. A request takes
time for its uncached prompt tokens and its answer (prefill and decode per-token costs), slowed
by what else its replica runs (1 + in flight / BATCH_KNEE: a replica shares its steps), so a
policy that hits the cache finishes sooner, and one that piles requests on a replica pays for it.

Reported per policy and replica count: the prefix hit rate (cached prompt tokens / prompt
tokens), the load imbalance (the most loaded replica's time-averaged requests in flight over the
mean; 1.0 is perfectly even) and the mean time a request takes. The first row is one replica
alone with the same cache, the hit rate the router tries to keep.

    python -m bench.route_sim [--replicas 4,16,64] [--requests 30000] [--prompts 300]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from lmserve.cache.prefix import hash_full_blocks
from lmserve.scale.router import PrefixRouter

BLOCK_SIZE = 16
PREFILL_SECONDS_PER_TOKEN = 0.0005
DECODE_SECONDS_PER_TOKEN = 0.01
BATCH_KNEE = 16  # requests in flight at which a replica runs each at half speed


@dataclass(frozen=True)
class Request:
    arrival: float
    hashes: list[bytes]  # every full block of its prompt
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class Replica:
    capacity_blocks: int
    cache: OrderedDict = field(default_factory=OrderedDict)
    in_flight: int = 0
    load_seconds: float = 0.0  # integral of in_flight over time
    last_change: float = 0.0

    def cached_blocks(self, hashes: list[bytes]) -> int:
        return next((i for i, block in enumerate(hashes) if block not in self.cache), len(hashes))

    def admit(self, hashes: list[bytes]) -> None:
        for block in reversed(hashes):  # a finished sequence's tail blocks are evicted first (block_pool.py)
            self.cache[block] = None
            self.cache.move_to_end(block)
        while len(self.cache) > self.capacity_blocks:
            self.cache.popitem(last=False)

    def set_in_flight(self, now: float, delta: int) -> None:
        self.load_seconds += self.in_flight * (now - self.last_change)
        self.last_change, self.in_flight = now, self.in_flight + delta


def make_trace(num_requests: int, num_prompts: int, zipf: float, rate: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    fresh = itertools.count(1 << 40)  # token ids no system prompt uses: every user turn is its own
    systems = [[rng.randrange(50_000) for _ in range(rng.randint(256, 1024))] for _ in range(num_prompts)]
    system_hashes = [hash_full_blocks(tokens, BLOCK_SIZE) for tokens in systems]
    weights = [1 / (rank + 1) ** zipf for rank in range(num_prompts)]
    requests, now = [], 0.0
    for choice in rng.choices(range(num_prompts), weights, k=num_requests):
        now += rng.expovariate(rate)
        tokens = systems[choice] + [next(fresh) for _ in range(rng.randint(16, 64))]
        hashes = hash_full_blocks(tokens, BLOCK_SIZE, known=system_hashes[choice])
        requests.append(Request(now, hashes, len(tokens), rng.randint(64, 256)))
    return requests


Policy = Callable[[Request, dict[int, int]], int]


def round_robin() -> Policy:
    turn = itertools.count()
    return lambda request, loads: next(turn) % len(loads)


def least_loaded(rng: random.Random) -> Policy:
    def choose(request: Request, loads: dict[int, int]) -> int:
        fewest = min(loads.values())
        return rng.choice([r for r, load in loads.items() if load == fewest])
    return choose


def prefix_aware(capacity_blocks: int, rng: random.Random) -> Policy:
    router = PrefixRouter(capacity_blocks, rng=rng)

    def choose(request: Request, loads: dict[int, int]) -> int:
        replica = router.choose(request.hashes, loads)
        router.routed(replica, request.hashes)
        return replica
    return choose


def replay(trace: list[Request], num_replicas: int, capacity_blocks: int,
           policy: Policy) -> tuple[float, float, float]:
    """(prefix hit rate, most loaded replica's mean in-flight over the mean of all, mean seconds
    a request takes)."""
    replicas = [Replica(capacity_blocks) for _ in range(num_replicas)]
    finishing: list[tuple[float, int]] = []
    cached_tokens = prompt_tokens = 0
    total_seconds = 0.0
    for request in trace:
        while finishing and finishing[0][0] <= request.arrival:
            done, index = heapq.heappop(finishing)
            replicas[index].set_in_flight(done, -1)
        index = policy(request, {i: r.in_flight for i, r in enumerate(replicas)})
        replica = replicas[index]
        cached = replica.cached_blocks(request.hashes) * BLOCK_SIZE
        replica.admit(request.hashes)
        replica.set_in_flight(request.arrival, +1)
        seconds = ((request.num_prompt_tokens - cached) * PREFILL_SECONDS_PER_TOKEN
                   + request.num_output_tokens * DECODE_SECONDS_PER_TOKEN) * (1 + replica.in_flight / BATCH_KNEE)
        total_seconds += seconds
        heapq.heappush(finishing, (request.arrival + seconds, index))
        cached_tokens, prompt_tokens = cached_tokens + cached, prompt_tokens + request.num_prompt_tokens
    end = max(done for done, _ in finishing) if finishing else trace[-1].arrival
    for done, index in sorted(finishing):
        replicas[index].set_in_flight(done, -1)
    loads = [r.load_seconds + r.in_flight * (end - r.last_change) for r in replicas]
    return cached_tokens / prompt_tokens, max(loads) / (sum(loads) / len(loads)), total_seconds / len(trace)


def mean_request_seconds() -> float:
    """A request's time with nothing cached, on average over the trace's distributions: the rate
    that keeps a given number in flight follows from it (Little's law)."""
    return 672 * PREFILL_SECONDS_PER_TOKEN + 160 * DECODE_SECONDS_PER_TOKEN


def run(args: argparse.Namespace) -> list[tuple[int, str, float, float, float]]:
    rows = []
    for num_replicas in [1, *args.replicas]:
        rate = args.in_flight * num_replicas / mean_request_seconds()
        trace = make_trace(args.requests, args.prompts, args.zipf, rate, args.seed)
        policies = {"one replica": lambda: round_robin()} if num_replicas == 1 else {
            "round-robin": round_robin,
            "least-loaded": lambda: least_loaded(random.Random(args.seed)),
            "lmserve prefix-aware": lambda: prefix_aware(args.capacity_blocks, random.Random(args.seed)),
        }
        for name, make in policies.items():
            rows.append((num_replicas, name, *replay(trace, num_replicas, args.capacity_blocks, make())))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.route_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64])
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--prompts", type=int, default=300, help="distinct system prompts")
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent of the system prompts")
    parser.add_argument("--capacity-blocks", type=int, default=1024, help="prefix cache per replica, in blocks")
    parser.add_argument("--in-flight", type=float, default=8.0, help="mean requests in flight per replica")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{args.requests} requests, {args.prompts} system prompts (Zipf {args.zipf}), "
          f"{args.capacity_blocks} cached blocks per replica, {args.in_flight:g} in flight per replica on average")
    print("| replicas | policy | prefix hit rate | load imbalance (max / mean) | mean request s |")
    print("|---|---|---|---|---|")
    for num_replicas, name, hit_rate, imbalance, seconds in run(args):
        print(f"| {num_replicas} | {name} | {hit_rate:.1%} | {imbalance:.2f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
