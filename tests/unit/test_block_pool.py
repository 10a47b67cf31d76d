from lmserve.cache.block_pool import BlockPool
from lmserve.cache.prefix import hash_block, hash_full_blocks


def test_allocate_until_empty_and_release_returns_blocks():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None  # only one left: all or nothing
    assert pool.num_free == 1
    pool.release([0, 1, 2])
    assert pool.num_free == 4 and pool.ref_counts == [0, 0, 0, 0]


def test_release_puts_tail_blocks_first_in_eviction_order():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.release(blocks)
    assert [pool.allocate(1)[0] for _ in range(4)] == [3, 2, 1, 0]


def test_blocks_taken_together_come_in_ascending_order():
    pool = BlockPool(8)
    pool.release(pool.allocate(8))  # the free list now runs 7, 6, ..., 0
    assert pool.allocate(3) == [5, 6, 7]  # the three least recently freed, in the order they lie


def test_a_sequence_grows_into_its_spares_so_sequences_growing_side_by_side_keep_their_blocks_together():
    pool = BlockPool(32)
    a, b = [], []
    for _ in range(4):  # two sequences growing a block at a time, in turn
        a += pool.allocate(1, "a", room=8)
        b += pool.allocate(1, "b", room=8)
    assert a == [0, 1, 2, 3] and b == [9, 10, 11, 12]
    assert pool.num_free == 32 - 8  # spares count as free
    pool.release(a, "a")
    pool.release(b, "b")
    assert pool.num_free == 32 and pool.spares == {} and pool.ref_counts == [0] * 32


def test_spares_stop_at_what_the_sequence_may_still_grow_into():
    pool = BlockPool(32)
    assert pool.allocate(2, "a", room=3) == [0, 1]
    assert pool.spares == {"a": [2, 3, 4]}
    assert pool.allocate(1, "b", room=0) == [5] and "b" not in pool.spares


def test_spares_go_to_whoever_needs_them_when_the_free_list_runs_short():
    pool = BlockPool(6)
    assert pool.allocate(1, "a", room=8) == [0]  # spares 1-5: everything else
    assert pool.allocate(2, "b", room=8) == [4, 5]  # from the far end of a's spares
    assert pool.allocate(4, "c") is None  # three free in all
    assert pool.allocate(3, "c") == [1, 2, 3]
    assert pool.num_free == 0 and pool.spares == {}
    assert pool.allocate(1, "a") is None


def test_spares_keep_their_content_until_used_and_a_lookup_can_still_take_one_back():
    pool, hashes, blocks = cached_pool(6, list(range(8)), 4)  # free list: 2..5, then the cached 1, 0
    pool.allocate(4)
    assert pool.allocate(1, "a", room=8) == [0] and pool.spares == {"a": [1]}  # 1 still holds its content
    assert pool.cached_run(hashes) == [] and pool.block_hash == {1: hashes[1]}  # the first block went
    assert pool.lookup(hashes[1:]) == [1]  # a spare: it leaves its owner's spares, content intact
    assert pool.spares == {} and pool.spare_owner == {} and pool.num_free == 0


def test_released_spares_go_back_to_the_head_of_the_free_list():
    pool, hashes, blocks = cached_pool(12, list(range(8)), 4)  # free list: 2..11, then the cached 1, 0
    grown = pool.allocate(1, "a", room=8)
    assert grown == [2] and pool.spares["a"] == list(range(3, 11))
    pool.release(grown, "a")
    assert [pool.allocate(1)[0] for _ in range(9)] == [3, 4, 5, 6, 7, 8, 9, 10, 11]  # spares, then the never used
    assert pool.cached_run(hashes) == blocks and pool.num_free == 3


def test_hashes_chain_on_parent():
    a = hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the ninth token is not a full block
    b = hash_full_blocks([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same tokens, different parent
    assert a[0] == hash_block(None, [1, 2, 3, 4])
    assert hash_full_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4, known=a[:1]) == a


def test_lookup_finds_longest_cached_run_and_takes_references():
    pool = BlockPool(4)
    hashes = hash_full_blocks(list(range(12)), 4)
    blocks = pool.allocate(3)
    for block, h in zip(blocks, hashes):
        pool.register(block, h)
    pool.release(blocks)
    other = hash_full_blocks(list(range(8)) + [99, 99, 99, 99], 4)
    found = pool.lookup(other)
    assert found == blocks[:2]
    assert [pool.ref_counts[b] for b in found] == [1, 1]
    assert pool.num_free == 2
    assert (pool.num_hits, pool.num_queries) == (2, 3)


def test_shared_block_needs_every_reference_released():
    pool = BlockPool(2)
    h = hash_full_blocks([1, 2], 2)
    [block] = pool.allocate(1)
    pool.register(block, h[0])
    assert pool.lookup(h) == [block]
    assert pool.ref_counts[block] == 2
    pool.release([block])
    assert pool.num_free == 1  # still held by the second user
    pool.release([block])
    assert pool.num_free == 2


def test_eviction_drops_hash_least_recently_freed_first():
    pool = BlockPool(2)
    h1, h2 = hash_block(None, [1]), hash_block(None, [2])
    [b1] = pool.allocate(1)
    [b2] = pool.allocate(1)
    pool.register(b1, h1)
    pool.register(b2, h2)
    pool.release([b1])
    pool.release([b2])
    [reused] = pool.allocate(1)
    assert reused == b1
    assert pool.lookup([h1]) == []  # evicted
    assert pool.lookup([h2]) == [b2]  # still cached


def test_disabled_prefix_caching_never_hits():
    pool = BlockPool(2, enable_prefix_caching=False)
    h = hash_full_blocks([1, 2], 2)
    [block] = pool.allocate(1)
    pool.register(block, h[0])
    pool.release([block])
    assert pool.lookup(h) == []


def cached_pool(num_blocks: int, tokens: list[int], block_size: int):
    """A pool whose first blocks hold `tokens`' full blocks, registered and released (free, cached)."""
    pool = BlockPool(num_blocks)
    hashes = hash_full_blocks(tokens, block_size)
    blocks = pool.allocate(len(hashes))
    for block, h in zip(blocks, hashes):
        pool.register(block, h)
    pool.release(blocks)
    return pool, hashes, blocks


def test_cached_run_finds_blocks_without_references_or_counting():
    pool, hashes, blocks = cached_pool(4, list(range(12)), 4)
    other = hash_full_blocks(list(range(8)) + [99, 99, 99, 99], 4)
    assert pool.cached_run(other) == blocks[:2]
    assert pool.ref_counts == [0, 0, 0, 0] and pool.num_free == 4
    assert (pool.num_hits, pool.num_queries) == (0, 0)


def test_hold_takes_free_cached_blocks_off_the_free_list():
    pool, hashes, blocks = cached_pool(4, list(range(8)), 4)
    pool.hold(blocks)
    assert pool.num_free == 2 and [pool.ref_counts[b] for b in blocks] == [1, 1]
    assert pool.allocate(2) == [2, 3]  # the held blocks are not reused
    assert pool.cached_run(hashes) == blocks  # and keep their content


def test_uncache_forgets_free_blocks_keeps_held_ones_and_reuses_forgotten_first():
    pool, hashes, blocks = cached_pool(4, list(range(12)), 4)
    pool.hold(blocks[:1])
    assert pool.uncache(hashes) == 2
    assert pool.cached_run(hashes) == blocks[:1]  # the held first block keeps its content
    assert [pool.allocate(1)[0] for _ in range(2)] == [blocks[2], blocks[1]]  # forgotten blocks go first, tail first
    assert pool.uncache(hash_full_blocks([7, 7, 7, 7], 4)) == 0
