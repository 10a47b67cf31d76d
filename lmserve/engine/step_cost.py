"""How long a step takes for the rows it runs, learnt from the steps so far, and the prompt tokens
a step may take beside its decodes within a time bound (SchedulerConfig.max_step_ms). Pure
Python: no torch.

A step that computes a prompt chunk holds back every stream decoding in it: on a Q4_K_M model of
hidden 1,024 and 24 layers at 32 streams, 512-token chunks made the gaps between tokens 494-544 ms
at the 95th percentile against 71-87 at the median (a 250 ms bound: 250-270 at the same median and
tokens/s; bench/RESULTS.md, thirty-fourth sitting). The token budget cannot bound that time across
models, whose tokens cost different times; the seconds a step takes can. A step's time is close to
linear in its rows: seconds ~ fixed + per_decode * decode rows + per_prompt * prompt tokens (a
decode row costs more than a prompt token: it is sampled, through the head, and attends to its
whole cache), fitted by least squares over the recent steps, each weighed by DECAY to the power of
its age, so that the fit follows the machine's load and the contexts' growth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAY = 0.5 ** (1 / 16)  # a step's weight halves every 16 steps
MIN_WEIGHT = 4.0  # the steps' summed weight before the fit is used
MIN_SPREAD = 16.0  # tokens: the standard deviation of the steps' prompt tokens before the fit is used
RIDGE = 1e-3  # tokens squared added to each size's variance: a size that never varies gets no slope
MIN_PROMPT_TOKENS = 16  # a step that decodes still takes at least this many prompt tokens
DECODE_SHARE = 0.5  # of a step's time, the most its decodes keep from a prompt when they alone pass the bound


@dataclass(frozen=True)
class Fit:
    """Seconds a step takes: fixed + per_decode * decode rows + per_prompt * prompt tokens."""

    fixed: float
    per_decode: float
    per_prompt: float


class StepCost:
    """The steps recorded, as exponentially weighted sums for the least-squares fit."""

    def __init__(self) -> None:
        # weight; sums of d (decode rows), p (prompt tokens), s (seconds) and of their products
        self._w = self._d = self._p = self._s = self._dd = self._dp = self._pp = self._ds = self._ps = 0.0

    def record(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        """A step ran `decode_rows` rows of decodes (their drafts included) and `prompt_tokens`
        prompt tokens through the model in `seconds`."""
        k, d, p = DECAY, decode_rows, prompt_tokens
        self._w, self._d, self._p, self._s = self._w * k + 1.0, self._d * k + d, self._p * k + p, self._s * k + seconds
        self._dd, self._dp, self._pp = self._dd * k + d * d, self._dp * k + d * p, self._pp * k + p * p
        self._ds, self._ps = self._ds * k + d * seconds, self._ps * k + p * seconds

    def fit(self) -> Fit | None:
        """The fit, or None until the steps recorded have weight and prompt sizes spread enough to
        tell a prompt token's cost, or while they do not show one that is positive."""
        w = self._w
        if w < MIN_WEIGHT:
            return None
        md, mp, ms = self._d / w, self._p / w, self._s / w
        vdd, vpp, vdp = self._dd / w - md * md, self._pp / w - mp * mp, self._dp / w - md * mp
        if vpp < MIN_SPREAD * MIN_SPREAD:
            return None
        cds, cps = self._ds / w - md * ms, self._ps / w - mp * ms
        vdd, vpp = vdd + RIDGE, vpp + RIDGE
        det = vdd * vpp - vdp * vdp
        per_decode = max((cds * vpp - cps * vdp) / det, 0.0)
        per_prompt = (cps * vdd - cds * vdp) / det
        if not per_prompt > 0.0:  # noise: nothing to bound by
            return None
        return Fit(max(ms - per_decode * md - per_prompt * mp, 0.0), per_decode, per_prompt)


def prompt_budget(fit: Fit | None, decodes: int, max_step_ms: float) -> int | None:
    """The prompt tokens a step with `decodes` decoding sequences may take so that it lasts about
    `max_step_ms` at most by `fit`: None (no bound) without decodes, a bound or a fit. Where the
    decodes alone take more than DECODE_SHARE of the bound, the prompt still gets the rest of a
    step of which they are that share, and never fewer than MIN_PROMPT_TOKENS: prompts always move
    on."""
    if decodes == 0 or max_step_ms <= 0 or fit is None:
        return None
    decode_seconds = fit.fixed + fit.per_decode * decodes
    bound = max(max_step_ms / 1000.0, decode_seconds / DECODE_SHARE)
    return max(MIN_PROMPT_TOKENS, math.floor((bound - decode_seconds) / fit.per_prompt + 0.01))  # not lost to rounding
