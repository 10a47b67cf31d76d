"""Prefix-aware replica choice: send a request to the replica whose prefix cache most likely holds
the start of its prompt, unless that replica is busy enough that waiting costs more than the hit.

A replica's prefix cache keeps whole KV blocks by content hash (cache/prefix.py: a block's hash
covers all tokens before it), so the router keys on the same hashes of a prompt's first blocks.
It remembers which blocks it sent where, up to a replica's cache capacity, forgetting as the
replica's cache evicts: least recently used first, and of one request's blocks the last first
(a finished sequence gives its tail blocks back first, cache/block_pool.py), so a prompt's
start is the last of it to go. It picks:

1. among replicas that hold the longest run of the prompt's leading blocks, the least loaded one,
   unless it is overloaded: more than `max_extra_queue` requests beyond the least loaded replica
   and more than `max_queue_ratio` times its load (SGLang's cache-aware router balances with the
   same two thresholds);
2. otherwise (no replica holds the first block, or every holder is overloaded) the less loaded of
   two replicas drawn at random (power of two choices).

Pure Python and free of any serving framework: the Ray Serve request router wraps it, and
bench/route_sim.py replays traces through it.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from lmserve.cache.prefix import BlockHash

ReplicaId = Hashable

DEFAULT_MAX_BLOCKS = 32  # leading blocks looked up per prompt: 512 tokens at 16 a block
DEFAULT_MAX_EXTRA_QUEUE = 4
DEFAULT_MAX_QUEUE_RATIO = 1.5


@dataclass
class PrefixRouter:
    capacity_blocks: int  # blocks remembered per replica: about what its prefix cache holds
    max_blocks: int = DEFAULT_MAX_BLOCKS
    max_extra_queue: int = DEFAULT_MAX_EXTRA_QUEUE
    max_queue_ratio: float = DEFAULT_MAX_QUEUE_RATIO
    rng: random.Random = field(default_factory=random.Random)
    _held: dict[ReplicaId, OrderedDict[BlockHash, None]] = field(default_factory=dict, init=False)
    _holders: dict[BlockHash, set[ReplicaId]] = field(default_factory=dict, init=False)

    def choose(self, hashes: Sequence[BlockHash], loads: Mapping[ReplicaId, int]) -> ReplicaId:
        """The replica for a prompt whose leading block hashes are `hashes`, given each live
        replica's requests in flight (`loads`, not empty)."""
        if not loads:
            raise ValueError("no replica to route to")
        least = min(loads.values())
        holders = [r for r in self.longest_holders(hashes, loads) if not self._overloaded(loads[r], least)]
        if holders:
            fewest = min(loads[r] for r in holders)
            return self.rng.choice([r for r in holders if loads[r] == fewest])
        return self.two_choices(loads)

    def longest_holders(self, hashes: Sequence[BlockHash], loads: Mapping[ReplicaId, int]) -> list[ReplicaId]:
        """The live replicas remembered to hold the longest run of `hashes` from the first: each
        level only among those that hold every block before it."""
        holders: list[ReplicaId] = []
        for depth, block in enumerate(hashes[:self.max_blocks]):
            held = self._holders.get(block, ())
            deeper = [r for r in (holders if depth else loads) if r in held]
            if not deeper:
                break
            holders = deeper
        return holders

    def two_choices(self, loads: Mapping[ReplicaId, int]) -> ReplicaId:
        replicas = list(loads)
        first, second = self.rng.sample(replicas, 2) if len(replicas) > 1 else (replicas[0], replicas[0])
        return first if loads[first] <= loads[second] else second

    def routed(self, replica: ReplicaId, hashes: Sequence[BlockHash]) -> None:
        """Remember that `replica` now holds the blocks `hashes`, all of them (they fill its cache
        whether looked up or not), most recently used, the first block most of all."""
        held = self._held.setdefault(replica, OrderedDict())
        for block in reversed(hashes):
            held[block] = None
            held.move_to_end(block)
            self._holders.setdefault(block, set()).add(replica)
        while len(held) > self.capacity_blocks:
            self._drop(replica, held.popitem(last=False)[0])

    def forget(self, replica: ReplicaId) -> None:
        """A replica that died or was removed: its cache is gone."""
        for block in self._held.pop(replica, {}):
            self._drop(replica, block)

    def _drop(self, replica: ReplicaId, block: BlockHash) -> None:
        holders = self._holders.get(block)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[block]

    def _overloaded(self, load: int, least: int) -> bool:
        return load > least + self.max_extra_queue and load > least * self.max_queue_ratio
