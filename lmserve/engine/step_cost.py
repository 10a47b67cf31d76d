"""How long a step takes for the tokens it runs, learnt from the steps so far, and the prompt
tokens a step may take beside its decodes within a time bound (SchedulerConfig.max_step_ms).
Pure Python: no torch.

A step that computes a prompt chunk holds back every stream decoding in it: on a Q4_K_M model of
hidden 1,024 and 24 layers at 32 streams, 512-token chunks made the gaps between tokens 439-450 ms
at the 95th percentile against 71-75 at the median (150 ms bounds them to 152-164 at the same
tokens/s; bench/RESULTS.md, thirty-fourth sitting). The token budget cannot bound that time across
models, whose tokens cost different times; the seconds a step takes can. A
step's time is close to linear in its tokens (every token is a row of the same products):
seconds ~ fixed + per_token * tokens, fitted by least squares over the recent steps, each weighed
by DECAY to the power of its age, so that the fit follows the machine's load and the contexts'
growth.
"""

from __future__ import annotations

import math

DECAY = 0.5 ** (1 / 16)  # a step's weight halves every 16 steps
MIN_WEIGHT = 4.0  # the steps' summed weight before the fit is used
MIN_SPREAD = 16.0  # tokens: the standard deviation of the steps' sizes before the fit is used
MIN_PROMPT_TOKENS = 16  # a step that decodes still takes at least this many prompt tokens
DECODE_SHARE = 0.5  # of a step's time, the most its decodes keep from a prompt when they alone pass the bound


class StepCost:
    """Seconds a step takes as fixed + per_token * tokens, fitted over the steps recorded."""

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def record(self, tokens: int, seconds: float) -> None:
        """A step ran `tokens` tokens through the model (prompt, decodes and drafts) in `seconds`."""
        d = DECAY
        self._w = self._w * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_token) seconds, or None until the steps recorded have weight and sizes spread
        enough to tell the two apart, or while they do not show a cost that grows with tokens."""
        if self._w < MIN_WEIGHT:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        variance = self._xx / self._w - mean_x * mean_x
        if variance < MIN_SPREAD * MIN_SPREAD:
            return None
        per_token = (self._xy / self._w - mean_x * mean_y) / variance
        if not per_token > 0.0:  # noise, or no step since the sizes spread: nothing to bound by
            return None
        return max(mean_y - per_token * mean_x, 0.0), per_token


def prompt_budget(fit: tuple[float, float] | None, decodes: int, max_step_ms: float) -> int | None:
    """The prompt tokens a step with `decodes` decoding sequences may take so that it lasts about
    `max_step_ms` at most by `fit` (StepCost.fit): None (no bound) without decodes, a bound or a
    fit. Where the decodes alone take more than DECODE_SHARE of the bound, the prompt still gets the
    rest of a step of which they are that share, and never fewer than MIN_PROMPT_TOKENS: prompts
    always move on."""
    if decodes == 0 or max_step_ms <= 0 or fit is None:
        return None
    fixed, per_token = fit
    decode_seconds = fixed + per_token * decodes
    bound = max(max_step_ms / 1000.0, decode_seconds / DECODE_SHARE)
    return max(MIN_PROMPT_TOKENS, math.floor((bound - decode_seconds) / per_token + 1e-6))  # not lost to rounding
