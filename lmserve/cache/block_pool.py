"""Fixed-size KV blocks with reference counts and a content-addressed prefix cache.

Pure Python. A free block keeps its content hash until it is reused, so a later request with
the same prefix can take it back; free blocks are reused least recently freed first.

A growing sequence keeps its blocks together where it can: decode attention reads a sequence's
blocks one after another faster than the same blocks scattered over the cache (bench/RESULTS.md,
"A sequence's blocks together"), while sequences growing side by side would each take the next
free block in turn. So a sequence that needs fresh blocks takes up to GROWTH_RUN more from the
free list's head than it asks for, in ascending order, and keeps the surplus as its spares for
its next blocks. Spares count as free and keep their content until they are used (a lookup may
still take one back); they go back to the head of the free list, where they came from, when their
owner releases its blocks, and anyone takes them when the free list runs short. Used in ascending
order, the GROWTH_RUN least recently freed blocks may lose their content in another order than
theirs (a finished sequence's blocks, freed tail first, lie there highest first): among blocks
that plain least-recently-freed reuse would take within the next few allocations anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from lmserve.cache.prefix import BlockHash

GROWTH_RUN = 8  # blocks a sequence takes at once when it needs fresh ones, its request allowing


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self.block_hash: dict[int, BlockHash] = {}
        self.cached: dict[BlockHash, int] = {}
        self.spares: dict[Hashable, list[int]] = {}  # owner -> blocks it will grow into, ascending
        self.spare_owner: dict[int, Hashable] = {}
        self.num_hits = 0
        self.num_queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.spare_owner)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, count: int, owner: Hashable | None = None, room: int = 0) -> list[int] | None:
        """`count` fresh blocks with ref count 1, evicting cached content; None if too few are free.
        With an `owner` (a sequence), its spares come first; past them it takes up to `room` more
        blocks (what it may still grow into), at most GROWTH_RUN, as spares. The blocks taken from
        the free list come in ascending order."""
        if count > self.num_free:
            return None
        blocks = self._pop_spares(owner, count) if owner is not None else []
        need = count - len(blocks)
        if need:
            extra = max(0, min(room, GROWTH_RUN, len(self.free) - need)) if owner is not None else 0
            fresh = self._pop_free(min(need + extra, len(self.free)))
            if len(fresh) < need:
                fresh += self._steal_spares(need - len(fresh))
            fresh.sort()
            blocks += fresh[:need]
            if len(fresh) > need:
                self.spares[owner] = fresh[need:]
                self.spare_owner.update((block, owner) for block in fresh[need:])
        for block in blocks:
            self._evict(block)
            self.ref_counts[block] = 1
        return blocks

    def release(self, blocks: list[int], owner: Hashable | None = None) -> None:
        """Drop one reference from each block; tail blocks first so they are evicted first. The
        `owner`'s spares go back to the head of the free list."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                self.free[block] = None
        for block in reversed(self._pop_spares(owner, self.num_blocks)):
            self.free[block] = None
            self.free.move_to_end(block, last=False)

    def _pop_spares(self, owner: Hashable, count: int, far_end: bool = False) -> list[int]:
        """Up to `count` of `owner`'s spares, from the near end (what it grows into next) or the far one."""
        spares = self.spares.get(owner, [])
        cut = slice(max(len(spares) - count, 0), None) if far_end else slice(0, count)
        taken = spares[cut]
        del spares[cut]
        self._unlist_spares(owner, taken)
        return taken

    def _unlist_spares(self, owner: Hashable, blocks: list[int]) -> None:
        """Forget that `blocks`, already out of `owner`'s list, were its spares."""
        for block in blocks:
            del self.spare_owner[block]
        if owner in self.spares and not self.spares[owner]:
            del self.spares[owner]

    def _pop_free(self, count: int) -> list[int]:
        return [self.free.popitem(last=False)[0] for _ in range(count)]

    def _steal_spares(self, count: int) -> list[int]:
        """`count` blocks from other sequences' spares, from the far end of each (the near end is
        what its owner grows into next)."""
        stolen = []
        for owner in list(self.spares):
            stolen += self._pop_spares(owner, count - len(stolen), far_end=True)
            if len(stolen) == count:
                break
        return stolen

    def lookup(self, hashes: list[BlockHash]) -> list[int]:
        """Blocks holding the longest cached run of `hashes`, each with a new reference."""
        if not self.enable_prefix_caching:
            return []
        found = self.cached_run(hashes)
        self.num_queries += len(hashes)
        self.num_hits += len(found)
        self.hold(found)
        return found

    def cached_run(self, hashes: list[BlockHash]) -> list[int]:
        """Blocks holding the longest cached run of `hashes`; no references taken, nothing counted."""
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def hold(self, blocks: list[int]) -> None:
        """One more reference to each block (a free one leaves the free list, keeping its content)."""
        for block in blocks:
            self.ref_counts[block] += 1
            self.free.pop(block, None)
            owner = self.spare_owner.get(block)
            if owner is not None:  # a spare whose content a lookup found: its owner grows elsewhere
                self.spares[owner].remove(block)
                self._unlist_spares(owner, [block])

    def uncache(self, hashes: list[BlockHash]) -> int:
        """Forget the content of every free block holding one of `hashes` and reuse those blocks
        first; blocks someone holds keep theirs. Returns the blocks forgotten."""
        forgotten = 0
        for h in hashes:
            block = self.cached.get(h)
            if block is not None and self.ref_counts[block] == 0:
                self._evict(block)
                if block in self.free:  # a spare stays its owner's
                    self.free.move_to_end(block, last=False)
                forgotten += 1
        return forgotten

    def register(self, block: int, block_hash: BlockHash) -> None:
        """Record that a full block holds the content `block_hash`."""
        if not self.enable_prefix_caching or block in self.block_hash:
            return
        if block_hash in self.cached:
            return  # another block already holds this content; keep the first
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash.pop(block, None)
        if block_hash is not None:
            del self.cached[block_hash]
