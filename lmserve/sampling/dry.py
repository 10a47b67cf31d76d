"""DRY ("don't repeat yourself", p-e-w's sampler as llama.cpp implements it): which tokens would
extend a repeat of an earlier stretch of the context, and the logit each one loses.

Pure Python over one row's token ids; chain.py applies the penalties to the logits. It follows
llama.cpp's llama_sampler_dry_apply step by step, with one difference in what it is given:
sequence breakers arrive already tokenized (DryPenalty.breaker_ids), each as one token-id
sequence, where llama.cpp tokenizes each breaker string itself and also adds every token whose
text merely contains or starts a breaker. A repeat is thus broken only where the breaker's
exact tokenization occurs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmserve.request import DryPenalty

# ln(FLT_MAX): llama.cpp caps base ** exponent below float32 overflow.
_FLOAT_MAX_LOG = 88.7228391


def dry_penalties(history: Sequence[int], dry: DryPenalty, unpenalized_ids: Sequence[int] = ()) -> dict[int, float]:
    """Token id -> amount to subtract from its logit, for the row whose last tokens (prompt and
    output, oldest first) are `history`; `dry.window` of them are scanned (0: all)."""
    tokens = list(history[-dry.window:]) if dry.window else list(history)
    if len(tokens) <= dry.allowed_length:
        return {}
    breakers = _breakers_by_head(dry.breaker_ids)
    limit = _repeat_limit(tokens, breakers)
    if limit < dry.allowed_length:
        return {}
    longest = _longest_repeat_before(tokens, limit, dry.allowed_length)
    skip = set(unpenalized_ids) | {head for head, tails in breakers.items() if () in tails}
    return {token: _penalty(dry, length) for token, length in longest.items() if token not in skip}


def _breakers_by_head(breaker_ids: Sequence[Sequence[int]]) -> dict[int, list[tuple[int, ...]]]:
    """Each breaker's first token -> the rest of each breaker that starts with it."""
    heads: dict[int, list[tuple[int, ...]]] = {}
    for breaker in breaker_ids:
        if breaker:
            heads.setdefault(breaker[0], []).append(tuple(breaker[1:]))
    return heads


def _repeat_limit(tokens: list[int], breakers: dict[int, list[tuple[int, ...]]]) -> int:
    """How far back a repeat may reach: up to the last complete sequence breaker (llama.cpp's
    step 1). Walking back from the end, the first token that heads a breaker whose tail follows
    it in full sets the limit to its distance from the end less the tail's length."""
    last = len(tokens) - 1
    for distance in range(len(tokens)):
        tails = breakers.get(tokens[last - distance])
        if not tails:
            continue
        matched = [len(tail) for tail in tails if len(tail) <= distance
                   and all(tokens[last - distance + 1 + j] == t for j, t in enumerate(tail))]
        if matched:
            return distance - max(matched)
    return len(tokens)


def _longest_repeat_before(tokens: list[int], limit: int, allowed_length: int) -> dict[int, int]:
    """Token -> length of the longest earlier stretch that equals the context's end and that this
    token followed, for stretches of at least `allowed_length` (capped at `limit`): llama.cpp's
    steps 2 and 3, the Z-function of the reversed context."""
    reversed_tokens = tokens[::-1]
    z = _z_function(reversed_tokens)
    longest: dict[int, int] = {}
    for shift in range(1, len(tokens)):
        length = min(z[shift], limit)
        if length >= allowed_length:
            follower = reversed_tokens[shift - 1]  # the token after the earlier stretch
            longest[follower] = max(length, longest.get(follower, 0))
    return longest


def _z_function(s: list[int]) -> list[int]:
    """z[i] = length of the longest common prefix of s and s[i:] (z[0] = 0), in linear time."""
    z = [0] * len(s)
    left = right = 0
    for i in range(1, len(s)):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < len(s) and s[z[i]] == s[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    return z


def _penalty(dry: DryPenalty, repeat_length: int) -> float:
    exponent = repeat_length - dry.allowed_length
    if dry.base > 1.000001:
        exponent = min(exponent, int(_FLOAT_MAX_LOG / math.log(dry.base)))
    return dry.multiplier * dry.base ** exponent
