"""Content hashes of full KV blocks: a block's hash covers its tokens and its parent's hash,
so equal hashes mean equal whole prefixes."""

from __future__ import annotations

import hashlib
import struct

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


def hash_full_blocks(token_ids: list[int], block_size: int, known: list[BlockHash] | None = None) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, reusing the first len(known) from `known`."""
    hashes = list(known or [])
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[start:start + block_size]))
    return hashes
