"""Prompt lookup: draft tokens for speculative decoding, taken from the sequence itself.

The last few tokens of a sequence (its prompt and its output so far) are looked up earlier in it,
and the tokens that followed their latest earlier occurrence are the draft (llama.cpp's lookup
decoding and vLLM's ngram method do the same). A step runs the sequence's last token and its draft
together, a few decode rows (engine/runner.py), samples every row as plain decoding would, and
keeps the drafts that match what was picked before them, up to the first that does not, plus the
token picked after the last one kept. Every kept token was drawn from the distribution plain
decoding draws it from, so the output is distributed as plain decoding's (and is exactly greedy
decoding's for greedy requests), in fewer steps when the text repeats what it has already seen
(edits, code, quotes, extraction). A draft stands with the probability the sampler gives it.

Only sequences whose next token depends on nothing but the logits and fresh random numbers get
drafts: no penalties, biases, constraints, logprobs, llama.cpp sampler chain, or seed (a seeded
request's numbers come one per token from its own generator, so its output stays the same whatever
else runs). And only while a step runs at most MAX_RUNNING sequences: past that a step is bound by
compute rather than by reading the weights, and verifying drafts costs more than it saves.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.request import SamplingParams

MAX_NGRAM = 4  # the longest tail looked up
MIN_NGRAM = 2  # a single repeated token predicts too little
MAX_RUNNING = 4
LOOKBACK = 4096  # tokens searched back from the end: the lookup stays cheap on long contexts


def propose(ids: Sequence[int], num_tokens: int) -> list[int]:
    """Up to `num_tokens` tokens that followed the latest earlier occurrence of `ids`' longest tail
    (MAX_NGRAM down to MIN_NGRAM tokens) within its last LOOKBACK tokens; [] when none recurs."""
    if num_tokens <= 0:
        return []
    window = list(ids[-LOOKBACK:])
    size = len(window)
    for n in range(min(MAX_NGRAM, size - 1), MIN_NGRAM - 1, -1):
        tail = window[size - n:]
        for start in range(size - n - 1, -1, -1):
            if window[start] == tail[0] and window[start:start + n] == tail:
                return window[start + n:start + n + num_tokens]
    return []


def drafts_for(params: SamplingParams) -> bool:
    """Whether a sequence sampled with `params` may take drafts: its next token depends only on the
    logits (and, unseeded, fresh random numbers), and nothing else it asked for needs the tokens
    one step at a time."""
    return ((params.greedy or params.seed is None) and params.logprobs is None and params.grammar is None
            and params.chain is None and not params.logit_bias and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0 and params.min_tokens == 0)
