"""What the engine's parts hand each other: a live request's record, and one step's batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmserve.request import Request
from lmserve.sampling.processors import BiasTensors
from lmserve.text.detokenizer import IncrementalDetokenizer


@dataclass
class LiveRequest:
    """Everything the engine keeps for one request until it finishes, and drops all at once then."""

    request: Request
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None  # seeded sampling draws from its own generator
    matcher: object | None  # the constraint's xgrammar GrammarMatcher, advanced token by token
    mirostat_mu: float | None = None  # Mirostat's mu, from the sampler after each step; None before the first
    logit_bias: BiasTensors | None = None  # the request's logit_bias as tensors, made once


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int  # tokens to run through the model this step, from num_computed_tokens on, drafts included
    draft: list[int] = field(default_factory=list)  # speculative tokens after the last known one (speculation.py)
    num_computed_tokens: int = field(init=False)  # where this chunk starts
    samples: bool = field(init=False)  # the chunk reaches the last known token: its logits give the next

    def __post_init__(self) -> None:
        self.num_computed_tokens = self.request.num_computed_tokens
        known = self.num_new_tokens - len(self.draft)
        self.samples = self.num_computed_tokens + known == self.request.num_tokens

    @property
    def runs_as_decode_rows(self) -> bool:
        """A decode (with its drafts, if any): each of its tokens attends to the cache up to itself
        (engine/runner.py). A prompt chunk takes the prefill path instead."""
        return self.num_new_tokens == 1 or bool(self.draft)


@dataclass
class SchedulerOutput:
    """What the scheduler hands the runner for one step."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    num_preempted: int = 0
    paced: bool = False  # a busy step of decodes alone, drafted as the scheduler's pacer says and timed for it
    prompt_bounded: bool = False  # the time bound beside decodes (SchedulerConfig.max_step_ms) held prompt tokens back

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs
