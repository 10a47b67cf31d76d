"""What the sampler takes and gives for one step of B sequences, in batch-row order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lmserve.request import SamplingParams
from lmserve.sampling.processors import BiasTensors


class GrammarMaskLike(Protocol):
    def apply(self, logits: torch.Tensor) -> None:
        """Set the tokens each constrained row may not take to -inf, in place."""


@dataclass(kw_only=True)
class SamplingMetadata:
    """Per-step sampling inputs for B sequences, in batch-row order.

    Only the rows whose params need them read `prompt_ids` and `output_ids`. A generator must
    live on the logits' device or on the CPU; it is advanced only by rows that draw. Per-request
    state lives with the request (the engine's LiveRequest) and comes in here each step:
    the generators, and Mirostat's mu, whose next value the sampler hands back in SamplerOutput.
    """

    params: list[SamplingParams]
    prompt_ids: list[list[int]]  # for repetition_penalty and DRY (prompt + output tokens)
    output_ids: list[list[int]]  # for presence/frequency penalties and min_tokens (generated tokens only)
    generators: list[torch.Generator | None]  # per-row generator for seeded rows, else None
    grammar_mask: GrammarMaskLike | None = None  # constrained rows' allowed tokens this step
    eos_token_ids: list[frozenset[int]] | None = None  # per row, banned under min_tokens; None: no row has any
    mirostat_mu: list[float | None] | None = None  # per row; None (or a None entry): first step, mu = 2 * tau
    logit_bias: list[BiasTensors | None] | None = None  # per row, made once per request; None: made here each step

    def __post_init__(self) -> None:
        lengths = {len(self.params), len(self.prompt_ids), len(self.output_ids), len(self.generators)}
        lengths |= {len(x) for x in (self.eos_token_ids, self.mirostat_mu, self.logit_bias) if x is not None}
        assert len(lengths) == 1, "SamplingMetadata fields must have one entry per row"

    def select(self, rows: list[int]) -> SamplingMetadata:
        """The inputs of `rows` only, in that order; without the grammar mask, applied before."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in rows]

        return SamplingMetadata(params=pick(self.params), prompt_ids=pick(self.prompt_ids),
                                output_ids=pick(self.output_ids), generators=pick(self.generators),
                                eos_token_ids=pick(self.eos_token_ids), mirostat_mu=pick(self.mirostat_mu),
                                logit_bias=pick(self.logit_bias))

    def eos_ids(self, row: int) -> frozenset[int]:
        return frozenset() if self.eos_token_ids is None else self.eos_token_ids[row]

    def bias(self, row: int) -> BiasTensors:
        """The row's logit_bias as tensors: the request's own copy when given."""
        given = None if self.logit_bias is None else self.logit_bias[row]
        return given if given is not None else BiasTensors.of(self.params[row].logit_bias)

    def mu(self, row: int) -> float | None:
        return None if self.mirostat_mu is None else self.mirostat_mu[row]


@dataclass
class SamplerOutput:
    """One sampled token per row, plus logprobs when some row asked, plus Mirostat's next mu.

    A row's logprobs are of the raw model distribution, or, under post_sampling_probs, of the
    distribution the sampler chain left (llama.cpp's post_sampling_probs); there a token the
    chain dropped has -inf, and `to_sample_logprobs` leaves it out. The logprob tensors hold
    zeros in rows that did not ask; `to_sample_logprobs` drops them.
    """

    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32 logprob of the sampled token, None if no row asked
    top_ids: torch.Tensor | None  # (B, K) int64, K = max top_logprobs asked in the batch
    top_logprobs: torch.Tensor | None  # (B, K) float32, sorted descending along K
    mirostat_mu: list[float | None] | None = None  # per row: mu after this step, None without Mirostat;
    # the list is None when no row uses Mirostat
