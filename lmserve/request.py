"""Request state shared by the scheduler, the runner and the server.

Plain Python only: the scheduler imports this module and must stay free of torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client went away or the server aborted it
    ERROR = "error"  # the engine failed while running it


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a sequence's output, enforced by a token mask every step.

    Plain data, so params stay hashable and torch-free; sampling/grammar.py compiles it.
    """

    kind: str  # "json_object" | "json_schema" | "regex" | "ebnf" | "structural_tag"
    text: str = ""  # the JSON schema / regex / EBNF (GBNF) grammar / structural tag JSON
    strict: bool = True  # json_schema: no properties beyond those the schema names


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops.

    Validated once at construction; every field is honoured by the sampler or the
    detokenizer. `seed` makes a sequence reproducible whatever else shares its batch.
    """

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token plus k alternatives
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # constrained decoding

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top_logprobs must be in [0, 20]"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed must fit in a signed 64-bit integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence being generated. The engine owns it; the scheduler mutates it."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of the full blocks so far
    num_registered_blocks: int = 0  # leading blocks already published to the prefix cache
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        self.all_ids: list[int] = self.prompt_ids + self.output_ids  # kept in step, read every step

    def append_output(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.all_ids.append(token_id)

    @property
    def num_tokens(self) -> int:
        return len(self.all_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class TokenLogprob:
    """Log-probability of one token (its text and bytes are looked up from the id when a response is built)."""

    token_id: int
    logprob: float


@dataclass
class SampleLogprobs:
    """The sampled token's logprob and its `k` most likely alternatives."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence: new tokens and, at the end, why."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str = ""  # detokenized text for new_token_ids, stop strings already cut
    new_logprobs: list[SampleLogprobs] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
