"""Fixed-size KV blocks with reference counts and a content-addressed prefix cache.

Pure Python. A free block keeps its content hash until it is reused, so a later request with
the same prefix can take it back; free blocks are reused least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from lmserve.cache.prefix import BlockHash


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
        self.num_hits = 0
        self.num_queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks with ref count 1, evicting cached content; None if too few are free."""
        if count > len(self.free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block; tail blocks first so they are evicted first."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                self.free[block] = None

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

    def uncache(self, hashes: list[BlockHash]) -> int:
        """Forget the content of every free block holding one of `hashes` and reuse those blocks
        first; blocks someone holds keep theirs. Returns the blocks forgotten."""
        forgotten = 0
        for h in hashes:
            block = self.cached.get(h)
            if block is not None and self.ref_counts[block] == 0:
                self._evict(block)
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
