"""Prompts as token ids, so every server sees exactly the same prompt length.

Ids are drawn from a range that holds ordinary vocabulary entries for the models we serve (special
tokens sit at the start of the vocabulary), from an RNG seeded by a string, so a workload's prompts
are the same on every server and every run.
"""

from __future__ import annotations

import random

TOKEN_ID_RANGE = (1000, 20000)  # half-open; clear of special and byte tokens, inside any 32k+ vocab


def random_ids(rng: random.Random, num_tokens: int, id_range: tuple[int, int] = TOKEN_ID_RANGE) -> list[int]:
    low, high = id_range
    return [rng.randrange(low, high) for _ in range(num_tokens)]


def make_prompts(
    num_prompts: int, prompt_tokens: int, shared_prefix_tokens: int = 0, seed: str = "0"
) -> list[list[int]]:
    """`num_prompts` prompts of exactly `prompt_tokens` ids; the first `shared_prefix_tokens` are common.

    The rest of each prompt is drawn independently, so prompts differ right after the prefix.
    """
    if not 0 <= shared_prefix_tokens <= prompt_tokens:
        raise ValueError(f"shared prefix ({shared_prefix_tokens}) must be within the prompt ({prompt_tokens})")
    if prompt_tokens < 1:
        raise ValueError("prompts need at least one token")
    rng = random.Random(seed)  # str seeds hash with sha512: stable across processes
    prefix = random_ids(rng, shared_prefix_tokens)
    return [prefix + random_ids(rng, prompt_tokens - shared_prefix_tokens) for _ in range(num_prompts)]
