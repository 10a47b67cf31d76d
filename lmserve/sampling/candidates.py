"""llama.cpp's truncating samplers and temperature over each row's candidates, vectorised over rows.

Each function takes a group of rows' Candidates and per-row settings and returns the
Candidates left, as llama.cpp's llama-sampler.cpp does for one sequence: top_k, typ_p, top_p,
min_p, xtc, temperature (with dynamic temperature), top_n_sigma and Mirostat's truncations.
Probabilities are a softmax over the candidates at that point of the chain, in float64.

One difference from llama.cpp, in edge cases only: a token at -inf (banned by logit bias, the
grammar, min_tokens, or cut by top_n_sigma or a zero temperature) is not a candidate here, where
llama.cpp keeps such entries in its array. There they count towards min_keep and dynamic
temperature's maximum entropy (and make typical_p's entropy NaN); here they count nowhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Mirostat (v1) estimates the Zipf exponent from the m most likely tokens; llama.cpp's common
# sampling passes m = 100, the value of the paper.
MIROSTAT_M = 100


@dataclass
class Candidates:
    """Each row's surviving tokens, most likely first. A dropped token has logit -inf and sits
    after every live one, so row i's live tokens are logits[i, :num_live[i]]."""

    logits: torch.Tensor  # (g, W) float32, descending along W
    ids: torch.Tensor  # (g, W) int64 vocabulary ids

    @classmethod
    def sort(cls, x: torch.Tensor, limit: int | None = None) -> Candidates:
        """The tokens of (g, V) logits `x` (those at -inf excepted) as candidates, at most
        `limit` per row. A full sort of the vocabulary is the chain's largest cost; when few
        tokens are live (or wanted), topk over them is far cheaper and gives the same order."""
        width = max(1, min(int((x > -torch.inf).sum(dim=-1).max()), limit or x.shape[1]))
        if width == 1:  # max(dim) takes the first of tied maxima, as the fast path's argmax does
            logits, ids = x.max(dim=-1, keepdim=True)  # (g, 1) each
        elif width * 8 <= x.shape[1]:
            logits, ids = x.topk(width, dim=-1)  # (g, width) each, sorted
        else:
            logits, ids = x.sort(dim=-1, descending=True, stable=True)  # (g, V) each
        return cls(logits[:, :width], ids[:, :width])

    def live(self) -> torch.Tensor:
        return self.logits > -torch.inf  # (g, W) bool

    def num_live(self) -> torch.Tensor:
        return self.live().sum(dim=-1, keepdim=True)  # (g, 1) int64

    def probs(self) -> torch.Tensor:
        """(g, W) float64 softmax over each row's candidates; 0 for dropped ones."""
        return self.logits.double().softmax(dim=-1)

    def positions(self) -> torch.Tensor:
        return torch.arange(self.logits.shape[1], device=self.logits.device)[None, :]  # (1, W)

    def keep_first(self, lengths: torch.Tensor) -> Candidates:
        """Keep each row's `lengths` (g, 1) most likely candidates."""
        dropped = self.positions() >= lengths  # (g, W)
        return Candidates(self.logits.masked_fill(dropped, -torch.inf), self.ids).compact()

    def keep(self, mask: torch.Tensor) -> Candidates:
        """Keep the candidates where `mask` (g, W) is True, wherever they are; re-sorts."""
        logits, order = self.logits.masked_fill(~mask, -torch.inf).sort(dim=-1, descending=True, stable=True)
        return Candidates(logits, self.ids.gather(1, order)).compact()

    def with_logits(self, logits: torch.Tensor) -> Candidates:
        """The same tokens with new (g, W) logits, re-sorted."""
        return Candidates(logits, self.ids).keep(torch.ones_like(logits, dtype=torch.bool))

    def compact(self) -> Candidates:
        """Drop the columns no row has a live candidate in (one host sync)."""
        width = max(1, int(self.num_live().max()))
        if width == self.logits.shape[1]:
            return self
        return Candidates(self.logits[:, :width], self.ids[:, :width])


def column(values: list[float], like: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(g, 1) tensor of one setting per row, on `like`'s device."""
    return torch.tensor(values, dtype=dtype, device=like.device)[:, None]


def first_true(condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (g, W) bool `condition`: each row's first True position (g, 1), and whether it has one."""
    return condition.to(torch.int8).argmax(dim=-1, keepdim=True), condition.any(dim=-1, keepdim=True)


# ---- truncating samplers ------------------------------------------------------------------


def top_k(c: Candidates, ks: list[int]) -> Candidates:
    """Keep the k most likely; k <= 0 is off. No min_keep, as in llama.cpp."""
    n = c.num_live()
    k = column(ks, c.logits, torch.int64)
    return c.keep_first(torch.where(k > 0, torch.minimum(k, n), n))


def top_p(c: Candidates, ps: list[float], min_keeps: list[int]) -> Candidates:
    """Keep the shortest most-likely-first run whose mass reaches p, and at least min_keep."""
    if all(p >= 1.0 for p in ps):
        return c
    p, n = column(ps, c.logits), c.num_live()
    mass = c.probs().cumsum(dim=-1)  # (g, W)
    reached = (mass >= p) & (c.positions() + 1 >= column(min_keeps, c.logits, torch.int64))
    first, found = first_true(reached)
    length = torch.where(found, torch.minimum(first + 1, n), n)
    return c.keep_first(torch.where(p >= 1.0, n, length))


def min_p(c: Candidates, ps: list[float], min_keeps: list[int]) -> Candidates:
    """Keep tokens with p >= min_p * p_max (in logits: logit >= max + ln min_p), and at least
    min_keep. The logits are those at this point of the chain, temperature included if it came first."""
    if all(p <= 0.0 for p in ps):
        return c
    n = c.num_live()
    floor = c.logits[:, :1] + column(ps, c.logits, torch.float32).log()  # (g, 1); ln 0 = -inf keeps all
    passed = (c.logits >= floor).sum(dim=-1, keepdim=True)
    keep_at_least = torch.minimum(column(min_keeps, c.logits, torch.int64), n)
    length = torch.minimum(torch.maximum(passed, keep_at_least), n)
    return c.keep_first(torch.where(column(ps, c.logits) <= 0.0, n, length))


def typical(x: torch.Tensor, ps: list[float], min_keeps: list[int]) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): rank tokens by |-ln p - H|, H the entropy, and
    keep the shortest run of that ranking whose mass exceeds p, and at least min_keep. On (g, W)
    logits in any order (its own ranking needs no sort by logit); returns them with the rest at -inf."""
    if all(p >= 1.0 for p in ps):
        return x
    live = x > -torch.inf  # (g, W)
    p, n = column(ps, x), live.sum(dim=-1, keepdim=True)
    log_probs = x.double().log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).where(live, 0.0).sum(dim=-1, keepdim=True)  # (g, 1)
    order = (-log_probs - entropy).abs().masked_fill(~live, torch.inf).argsort(dim=-1, stable=True)
    mass = probs.gather(1, order).cumsum(dim=-1)  # (g, W) in typicality order
    positions = torch.arange(x.shape[1], device=x.device)[None, :]
    exceeded = (mass > p) & (positions + 1 >= column(min_keeps, x, torch.int64))
    first, found = first_true(exceeded)
    length = torch.where(found & (p < 1.0), torch.minimum(first + 1, n), n)
    kept = torch.zeros_like(live).scatter_(1, order, positions < length)
    return x.masked_fill(~kept, -torch.inf)


def xtc(c: Candidates, chances: torch.Tensor, probabilities: list[float], thresholds: list[float],
        min_keeps: list[int]) -> Candidates:
    """Exclude Top Choices (p-e-w): with probability `probability` (a row's `chances` (g, 1)
    uniform at or below it), drop every token at or above `threshold` but the least likely of
    them, if that leaves at least min_keep. Off for probability 0 or threshold > 0.5."""
    n, probs = c.num_live(), c.probs()
    threshold = column(thresholds, c.logits)
    above = ((probs >= threshold) & c.live()).sum(dim=-1, keepdim=True)  # a leading run: probs descend
    drop = (above - 1).clamp(min=0)  # (g, 1)
    probability = column(probabilities, c.logits)
    applies = ((probability > 0.0) & (threshold <= 0.5) & (chances.double() <= probability) & (n >= 2)
               & (drop > 0) & (n - drop >= column(min_keeps, c.logits, torch.int64)))
    if not bool(applies.any()):
        return c
    return c.keep(c.positions() >= torch.where(applies, drop, 0))


def top_n_sigma(x: torch.Tensor, ns: list[float]) -> torch.Tensor:
    """Top-nσ (Tang et al.): keep logits within n standard deviations of the maximum logit
    (population deviation over the candidates); n <= 0 is off. On (g, W) logits in any order
    (a sorted row stays sorted); returns them with the rest at -inf."""
    if all(k <= 0.0 for k in ns):
        return x
    live = x > -torch.inf  # (g, W)
    n = live.sum(dim=-1, keepdim=True)
    logits = x.double().where(live, 0.0)
    mean = logits.sum(dim=-1, keepdim=True) / n
    std = ((logits - mean) ** 2).where(live, 0.0).sum(dim=-1, keepdim=True).div(n).sqrt()
    sigmas = column(ns, x)
    floor = x.amax(dim=-1, keepdim=True).double() - sigmas * std  # (g, 1)
    dropped = (logits < floor) & (sigmas > 0.0) & (n > 1)
    return x.masked_fill(dropped, -torch.inf)


def temperature(c: Candidates, temperatures: list[float], ranges: list[float], exponents: list[float]) -> Candidates:
    """llama.cpp's temp_ext: logits / T. With a dynatemp range d > 0 the temperature runs from
    max(0, T - d) to T + d as (entropy / max entropy) ** exponent runs from 0 to 1, over the
    candidates (dynamic temperature). A temperature <= 0 keeps only the most likely token."""
    temps = column(temperatures, c.logits)
    if any(d > 0.0 for d in ranges):
        temps = _dynamic_temperature(c, temps, column(ranges, c.logits), column(exponents, c.logits))
    keep_one = temps <= 0.0
    scaled = c.logits / torch.where(keep_one, 1.0, temps).float()
    return Candidates(scaled, c.ids).keep_first(torch.where(keep_one, 1, c.num_live()))


def _dynamic_temperature(c: Candidates, temps: torch.Tensor, ranges: torch.Tensor,
                         exponents: torch.Tensor) -> torch.Tensor:
    """(g, 1) each row's temperature: dynamic where its range is > 0 and it has more than one
    candidate (with one, llama.cpp leaves the logits alone: 1 here), else its own."""
    n, probs = c.num_live(), c.probs()
    entropy = -(probs * probs.log()).where(probs > 0.0, 0.0).sum(dim=-1, keepdim=True)
    normalized = entropy / n.double().log()
    low, high = (temps - ranges).clamp(min=0.0), temps + ranges
    dynamic = low + (high - low) * normalized.pow(exponents)
    return torch.where(ranges > 0.0, torch.where(n > 1, dynamic, 1.0), temps)


# ---- Mirostat's truncations ---------------------------------------------------------------


def mirostat_v1(c: Candidates, mus: torch.Tensor, vocab_size: int) -> Candidates:
    """Mirostat (Basu et al.): estimate the Zipf exponent s from the m most likely tokens, and
    keep the top k that make the expected surprise 2^mu. `mus` (g, 1) float64."""
    width = min(MIROSTAT_M, c.logits.shape[1])
    n = c.num_live()
    i = torch.arange(width - 1, dtype=torch.float64, device=c.logits.device)[None, :]  # (1, m-1)
    t = torch.log((i + 2) / (i + 1))
    logits = c.logits[:, :width].double()
    valid = i < n - 1  # (g, m-1): pairs of live candidates
    b = (logits[:, :-1] - logits[:, 1:]).where(valid, 0.0)  # ln(p_i / p_i+1)
    s_hat = (t * b).sum(dim=-1, keepdim=True) / (t * t).where(valid, 0.0).sum(dim=-1, keepdim=True)
    epsilon = s_hat - 1
    k = ((epsilon * 2.0 ** mus) / (1 - float(vocab_size) ** -epsilon)) ** (1 / s_hat)
    k = torch.where(torch.isfinite(k), k, torch.inf).clamp(max=1e9).floor().long()  # (g, 1)
    return c.keep_first(torch.where(n > 1, k.clamp(min=1), 1).minimum(n))


def mirostat_v2(x: torch.Tensor, mus: torch.Tensor) -> torch.Tensor:
    """Mirostat 2.0: keep the tokens whose surprise -log2 p is at most mu (`mus` (g, 1)), or the
    most likely one when none is: llama.cpp's most-likely-first run, found without a sort. On
    (g, W) logits in any order; returns them with the rest at -inf."""
    surprise = -x.double().log_softmax(dim=-1) / math.log(2)  # (g, W); inf for dropped tokens
    kept = surprise <= mus
    kept |= ~kept.any(dim=-1, keepdim=True) & (x == x.amax(dim=-1, keepdim=True))
    return x.masked_fill(~kept, -torch.inf)
