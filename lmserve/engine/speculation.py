"""Prompt lookup: draft tokens for speculative decoding, taken from the sequence itself.

The last few tokens of a sequence (its prompt and its output so far) are looked up earlier in it,
and the tokens that followed their latest earlier occurrence are the draft (llama.cpp's lookup
decoding and vLLM's ngram method do the same). A step runs the sequence's last token and its draft
together, a few decode rows (engine/runner.py), samples every row as plain decoding would, and
keeps the drafts that match what was picked before them, up to the first that does not, plus the
token picked after the last one kept. Every kept token was drawn from the distribution plain
decoding draws it from, so the output is distributed as plain decoding's (and is exactly greedy
decoding's for greedy requests), in fewer steps when the text repeats what it has already seen
(edits, code, quotes, extraction). A draft stands with the probability the sampler gives it, and a
Drafter runs drafts only while its request's proposals come true.

Under a constraint the drafts come first from the grammar: where it forces the text that follows
(a JSON schema's next key with its quotes, colon and comma, the rest of an enum's only match),
that text's tokens are the draft (engine.py asks xgrammar's jump-forward string, as SGLang's
jump-forward decoding does). They are checked like any draft, so the output stays what plain
decoding gives; they are only kept where the model would pick the tokenizer's own spelling of
the text, which a grammar also allows spelled in other tokens. Their own tally, started at
FORCED_PRIOR kept tokens to one mismatch, judges them as prompt lookup's tally judges its drafts.

Only sequences whose next token depends on nothing but the logits get drafts: greedy ones, and
with the server's speculative_sampling sampled ones that draw fresh random numbers (a seeded
request's numbers come one per token from its own generator, so its output stays the same whatever
else runs); no penalties, biases, constraints, logprobs or llama.cpp sampler chain.

How sure a draft must be depends on the step. While at most MAX_RUNNING sequences run, a step is
bound by reading the weights and a few more rows cost little: a draft token runs if it is kept at
least WORTH of the time. Past that a step is bound by compute and a draft row costs at least what a
decoding row does (with AMX tiles a few can cost a whole pass of 16-32 rows), so a draft that is
not kept is a row lost (and where a batch starts and ends together, a kept one saves little): a
draft token runs only if it is kept at least BUSY_WORTH of the time, as in text that repeats its input or that greedy decoding has sent round a loop, and a
busy step that computes prompt tokens runs no drafts at all (engine/scheduler.py). Whether even
those pay depends on the CPU (bench/RESULTS.md, "Prompt lookup with many sequences running" and
the twenty-fourth sitting: real text about breaks even on a CPU without AMX and loses 2-15% on one
with it, where a step's rows cost by whole tile passes of 16-32 and a few drafts can cost a pass,
while loops gain on both), so busy steps draft only while the scheduler's Pacer measures that they
pay, as the draft model's Pacer decides for it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmserve.request import SamplingParams

log = logging.getLogger("lmserve.engine")

MAX_NGRAM = 4  # the longest tail looked up
MIN_NGRAM = 2  # a single repeated token predicts too little
MAX_RUNNING = 4  # the most sequences a step runs while it is bound by reading the weights
LOOKBACK = 4096  # tokens searched back from the end: the lookup stays cheap on long contexts
WORTH = 0.3  # a draft token runs only if it is kept at least this often, while at most MAX_RUNNING run
BUSY_WORTH = 0.9  # the same with more running
DECAY = 0.75  # weight of the past in a request's running tally
FORCED_PRIOR = 3.0  # kept tokens a request's tally of forced drafts starts with, to one mismatch (rate 0.75)
PROBE_STEPS = 16  # decode steps a Pacer times without the drafts it judges
TRIAL_STEPS = 16  # decode steps timed with them
KEEP_STEPS = 64  # decode steps the faster way runs at least before both are timed again,
KEEP_FACTOR = 20  # and at least this many times as long as timing them took: the slower way costs <5%


def worth(num_running: int) -> float:
    """How often a draft token must be kept to run in a step of `num_running` sequences."""
    return WORTH if num_running <= MAX_RUNNING else BUSY_WORTH


def drafts_for(params: SamplingParams, sampled: bool = False) -> bool:
    """Whether a sequence sampled with `params` may take drafts: it is greedy (or, with `sampled`,
    draws from fresh random numbers rather than a seed), its next token depends only on the logits,
    and nothing else it asked for needs the tokens one step at a time."""
    return ((params.greedy or (sampled and params.seed is None)) and params.logprobs is None
            and params.chain is None and not params.logit_bias and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0 and params.min_tokens == 0)


@dataclass
class Drafter:
    """One request's prompt lookup, and how often its proposals come true.

    The lookup keeps, for every 2- to 4-token n-gram of the sequence's last LOOKBACK tokens (and
    of all it adds since) that some token follows, where its latest occurrence ended; each step
    indexes only the tokens added since the last, so a proposal costs a few dict lookups.

    Every proposal is checked against the tokens that followed it, whether it ran or not (a
    proposal that did not run is checked against the next token alone): the tally of tokens that
    matched and of mismatches, both decayed, gives the chance `rate` that a draft token is kept,
    and the i-th token of a proposal runs only while rate ** i is at least the step's worth(). A
    request whose text stops repeating itself soon runs no drafts, and one whose text starts
    repeating runs them again.
    """

    kept: float = 1.0  # a prior of one match and one mismatch: rate 0.5 at the start
    missed: float = 1.0
    last: list[int] = field(default_factory=list)  # the latest proposal
    since: int = 0  # the sequence's length when it was made
    ends: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> where its latest occurrence ended
    indexed: int = 0  # n-grams ending at or before this position are in `ends`

    @property
    def rate(self) -> float:
        """The chance that a draft token is kept, from the decayed tally."""
        return self.kept / (self.kept + self.missed)

    def drafts(self, ids: Sequence[int], room: int, threshold: float = WORTH) -> list[int]:
        """The drafts after `ids` (at most `room`) kept at least `threshold` of the time by this
        request's rate, after tallying the last proposal."""
        return self.judge(ids, self.lookup(ids, room), threshold)

    def judge(self, ids: Sequence[int], proposal: list[int], threshold: float = WORTH) -> list[int]:
        """The part of `proposal` (drafts after `ids`) kept at least `threshold` of the time by this
        request's rate, after tallying the last proposal; `proposal` is tallied in turn."""
        self._observe(ids)
        self.last, self.since = proposal, len(ids)
        rate = self.rate
        count, chance = 0, rate
        while count < len(proposal) and chance >= threshold:
            count, chance = count + 1, chance * rate
        return proposal[:count]

    def lookup(self, ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens that followed the latest earlier occurrence of `ids`' longest
        tail (MAX_NGRAM down to MIN_NGRAM tokens); [] when none recurs. `ids` only ever grows."""
        size = len(ids)
        for end in range(max(self.indexed + 1, size - LOOKBACK, MIN_NGRAM), size):  # a token follows each
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self.ends[tuple(ids[end - n:end])] = end
        self.indexed = max(self.indexed, size - 1)
        if num_tokens <= 0:
            return []
        for n in range(min(MAX_NGRAM, size - 1), MIN_NGRAM - 1, -1):
            end = self.ends.get(tuple(ids[size - n:]))
            if end is not None:
                return list(ids[end:end + num_tokens])
        return []

    def _observe(self, ids: Sequence[int]) -> None:
        """Tally the latest proposal against the tokens that followed it."""
        if not self.last:
            return
        new = ids[self.since:]
        matched = 0
        for draft, token in zip(self.last, new):
            if draft != token:
                break
            matched += 1
        self.kept = self.kept * DECAY + matched
        self.missed = self.missed * DECAY + (matched < min(len(self.last), len(new)))
        self.last = []


class Pacer:
    """Whether some drafts pay (the draft model's, or prompt lookup's with many running), by
    measurement: PROBE_STEPS decode steps without them and TRIAL_STEPS with them, each timed
    (proposals included) as output tokens per sequence per second; the faster way then runs for
    KEEP_STEPS steps and KEEP_FACTOR times the timing's seconds, and the two are timed again (what
    pays changes with the text, the batch and the machine's load). Only decode steps in which some
    sequence could take the drafts count. The two sides are timed in turns of `turn` steps (plain
    first): the draft model's in one turn each, since each switch to its drafts makes a step catch
    up on every token since it last ran (the whole prompt, or a keep phase's worth), which the
    steps after it do not (with `warm`, a trial turn's first step is not timed); busy prompt
    lookup's a step each, so that the two sides see the same batch (its rate moved 20% between one
    trial and the next in a steady flow, more than drafts gain or lose: bench/RESULTS.md,
    twenty-fourth sitting). A sequence's rate falls as the batch grows, so steps are timed by
    batch size (decoding sequences) and drafts compared with plain steps of their own size: a trial
    pays if its rates beat the probe's at the sizes both saw (a mean of the ratios, weighted by
    steps) and its steps gave more tokens a sequence than the probe's; with no size in common the
    two are timed again."""

    def __init__(self, what: str, turn: int = PROBE_STEPS, warm: bool = True) -> None:
        self.what = what  # the drafts judged, for the log
        self.turn, self.warm = turn, warm
        self._keep_drafting = False
        self._time_again()

    @property
    def drafting(self) -> bool:
        return self._phase == "trial" or (self._phase == "keep" and self._keep_drafting)

    @property
    def probing(self) -> bool:
        """Timing a step without the drafts."""
        return self._phase == "probe"

    def record(self, tokens_per_seq: float, seconds: float, num_seqs: int) -> None:
        """One decode step of `num_seqs` decoding sequences: its output tokens per sequence and its
        seconds, run as `drafting` said."""
        if self._warming:
            self._warming = False
            return
        if self._phase != "keep":
            totals = (self._drafted if self._phase == "trial" else self._plain).setdefault(num_seqs, [0.0, 0.0, 0])
            totals[0] += tokens_per_seq
            totals[1] += seconds
            totals[2] += 1
        else:
            self._kept += seconds
        self._left -= 1
        if self._left > 0 or (self._phase == "keep" and self._kept < KEEP_FACTOR * self._timed_seconds()):
            return
        if self._phase == "keep":
            self._time_again()
        elif self._timed("probe") >= PROBE_STEPS and self._timed("trial") >= TRIAL_STEPS:
            self._judge()
        else:  # the other side's turn (a side already timed in full waits for the other)
            other = "trial" if self._phase == "probe" else "probe"
            if self._timed(other) < self._limit(other):
                self._phase = other
                self._warming = self.warm and other == "trial"
            self._left = min(self.turn, self._limit(self._phase) - self._timed(self._phase))

    def _timed(self, phase: str) -> int:
        """Steps timed so far on one side."""
        return sum(totals[2] for totals in (self._drafted if phase == "trial" else self._plain).values())

    @staticmethod
    def _limit(phase: str) -> int:
        return TRIAL_STEPS if phase == "trial" else PROBE_STEPS

    def _judge(self) -> None:
        """The trial is over: keep drafting if the drafts beat plain steps of the same batch sizes."""
        common = self._plain.keys() & self._drafted.keys()
        if not common:  # the batch changed between probe and trial: nothing like to compare
            self._time_again()
            return
        weights = {n: min(self._plain[n][2], self._drafted[n][2]) for n in common}
        log_gain = sum(w * math.log(max(self.rate(self._drafted[n]), 1e-9) / max(self.rate(self._plain[n]), 1e-9))
                       for n, w in weights.items()) / sum(weights.values())
        # A trial whose steps gave no more tokens a sequence than the probe's gained nothing from its
        # drafts, whatever the clock said (busy steps: no draft stood, or none ran; the draft model's:
        # none beyond what the probe's prompt-lookup drafts give).
        stood = any(self._drafted[n][0] / self._drafted[n][2] > self._plain[n][0] / self._plain[n][2] + 1e-9
                    for n in common)
        pays = stood and log_gain > 0
        if pays != self._keep_drafting:
            log.info("%s %s: %.2fx the tokens/s per sequence without them%s, at %s sequences", self.what,
                     "pay" if pays else "do not pay", math.exp(log_gain), "" if stood else " (no more tokens a step)",
                     "/".join(map(str, sorted(common))))
        self._keep_drafting = pays
        self._phase, self._left = "keep", KEEP_STEPS

    def _time_again(self) -> None:
        self._phase, self._left = "probe", self.turn  # probe (plain) and trial (drafts) in turns -> keep
        self._warming = False  # True while the next step is a trial turn's first (not timed)
        self._plain: dict[int, list[float]] = {}  # by batch size: [tokens per sequence, seconds, steps]
        self._drafted: dict[int, list[float]] = {}
        self._kept = 0.0  # seconds of the keep phase so far

    def _timed_seconds(self) -> float:
        return sum(t[1] for t in self._plain.values()) + sum(t[1] for t in self._drafted.values())

    @staticmethod
    def rate(totals: list[float]) -> float:
        return totals[0] / totals[1] if totals[1] > 0 else 0.0
