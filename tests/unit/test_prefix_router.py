"""The prefix-aware replica choice (lmserve/scale/router.py), and the routing simulator's verdict
on it (bench/route_sim.py)."""

from __future__ import annotations

import argparse
import random

import pytest

from bench.route_sim import run
from lmserve.cache.prefix import hash_full_blocks
from lmserve.scale.router import PrefixRouter

SYSTEM = list(range(100, 164))  # four blocks of 16


def blocks(tokens: list[int]) -> list[bytes]:
    return hash_full_blocks(tokens, 16)


def test_a_prompt_goes_back_to_the_replica_that_holds_its_prefix():
    router = PrefixRouter(capacity_blocks=64, rng=random.Random(0))
    first = blocks(SYSTEM + list(range(16)))
    router.routed("b", first)
    again = blocks(SYSTEM + list(range(500, 516)))  # same system prompt, another user turn
    assert router.choose(again, {"a": 0, "b": 3, "c": 1}) == "b"  # 3 in flight: within the threshold


def test_the_longest_held_prefix_wins():
    router = PrefixRouter(capacity_blocks=64, rng=random.Random(0))
    hashes = blocks(SYSTEM)
    router.routed("a", hashes[:1])
    router.routed("b", hashes[:3])
    assert router.longest_holders(hashes, {"a": 0, "b": 0}) == ["b"]
    assert router.choose(hashes, {"a": 0, "b": 2}) == "b"


@pytest.mark.parametrize("holder_load, least_load, skipped", [
    (5, 0, True),    # 5 more than the least loaded, and more than 1.5 times it
    (4, 0, False),   # only 4 more: the hit is worth the wait
    (15, 10, False),  # 5 more but only 1.5 times: busy everywhere, the hit still pays
    (16, 10, True),
])
def test_an_overloaded_holder_gives_way_to_the_less_loaded(holder_load, least_load, skipped):
    router = PrefixRouter(capacity_blocks=64, rng=random.Random(0))
    hashes = blocks(SYSTEM)
    router.routed("hot", hashes)
    chosen = router.choose(hashes, {"hot": holder_load, "cold": least_load})
    assert chosen == ("cold" if skipped else "hot")


def test_without_a_holder_the_less_loaded_of_two_random_replicas_gets_it():
    router = PrefixRouter(capacity_blocks=64, rng=random.Random(0))
    loads = {"a": 7, "b": 2, "c": 9}
    picks = {router.choose(blocks(list(range(n, n + 32))), loads) for n in range(0, 3200, 32)}
    assert picks == {"a", "b"}  # the busiest can lose every draw; "a" only wins against "c"
    assert router.choose([], {"only": 3}) == "only"  # a prompt shorter than a block


def test_a_replica_forgets_its_oldest_blocks_past_its_capacity_and_all_when_it_dies():
    router = PrefixRouter(capacity_blocks=4, rng=random.Random(0))
    old, new = blocks(SYSTEM), blocks(list(range(1000, 1064)))
    router.routed("a", old)
    router.routed("b", old)
    router.routed("a", new)  # a's cache holds 4 blocks: old's are evicted
    assert router.longest_holders(old, {"a": 0, "b": 0}) == ["b"]
    assert router.longest_holders(new, {"a": 0, "b": 0}) == ["a"]
    assert router.longest_holders(old, {"a": 0}) == []  # b is not live
    router.forget("b")
    assert router.longest_holders(old, {"a": 0, "b": 0}) == []


def test_each_level_counts_only_replicas_that_hold_every_block_before_it():
    router = PrefixRouter(capacity_blocks=64, rng=random.Random(0))
    hashes = blocks(SYSTEM)
    router.routed("a", hashes[:2])
    router.routed("b", hashes[:4])
    router.forget("b")
    router.routed("b", hashes[1:4])  # b lost the first block: a hit there starts nowhere
    assert router.longest_holders(hashes, {"a": 0, "b": 0}) == ["a"]


def test_a_prompts_first_blocks_are_the_last_forgotten():
    router = PrefixRouter(capacity_blocks=4, rng=random.Random(0))
    long_prompt = blocks(list(range(96)))  # six blocks, more than the replica keeps
    router.routed("a", long_prompt)
    assert router.longest_holders(long_prompt[:4], {"a": 0}) == ["a"]  # the start stayed
    assert router.longest_holders(long_prompt[4:], {"a": 0}) == []


def test_no_replica_is_a_clear_error():
    with pytest.raises(ValueError, match="no replica"):
        PrefixRouter(capacity_blocks=4).choose([], {})


def test_on_a_simulated_trace_the_router_keeps_the_hit_rate_and_the_load_even():
    args = argparse.Namespace(replicas=[8], requests=4000, prompts=100, zipf=1.1, capacity_blocks=1024,
                              in_flight=8.0, seed=0)
    rows = {name: row for _, name, *row in run(args)}
    alone = rows["one replica"][0]
    hit_rate, imbalance, seconds = rows["lmserve prefix-aware"]
    assert hit_rate > rows["round-robin"][0] + 0.1 and hit_rate > alone
    assert imbalance < 1.3
    assert seconds < min(rows["round-robin"][2], rows["least-loaded"][2])  # the hits pay for any wait
