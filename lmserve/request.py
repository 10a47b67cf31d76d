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
    UNSATISFIABLE = "unsatisfiable"  # its output constraint allows no next token: the request's fault


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a sequence's output, enforced by a token mask every step.

    Plain data, so params stay hashable and torch-free; sampling/grammar.py compiles it.
    """

    kind: str  # "json_object" | "json_schema" | "regex" | "ebnf" | "structural_tag" | "choice"
    text: str = ""  # the JSON schema / regex / EBNF (GBNF) grammar / structural tag JSON / JSON list of choices
    strict: bool = True  # json_schema: no properties beyond those the schema names


# llama.cpp's default sampler order (its `samplers` list, penalties aside: they always come first).
DEFAULT_CHAIN_ORDER = ("dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
CHAIN_SAMPLERS = frozenset(DEFAULT_CHAIN_ORDER)
DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")


@dataclass(frozen=True)
class DryPenalty:
    """DRY ("don't repeat yourself"): a token that would extend a repeat of an earlier sequence
    longer than `allowed_length` loses multiplier * base ** (length - allowed_length)."""

    multiplier: float
    base: float = 1.75
    allowed_length: int = 2
    window: int = 64  # how many of the last tokens (prompt + output) are scanned; 0: all of them
    breaker_ids: tuple[tuple[int, ...], ...] = ()  # each sequence breaker, tokenized: a repeat never spans one

    def __post_init__(self) -> None:
        checks = [
            (self.multiplier > 0.0, "dry_multiplier must be > 0"),
            (self.base >= 1.0, "dry_base must be >= 1"),
            (self.allowed_length >= 1, "dry_allowed_length must be >= 1"),
            (self.window >= 0, "dry_penalty_last_n must be >= -1"),
        ]
        _check(checks)


@dataclass(frozen=True)
class SamplerChain:
    """llama.cpp's sampler chain, for rows that ask for one of its samplers or its order.

    Applied after the penalties and logit bias, in `order`; it reads top_k, top_p, min_p and
    temperature from the row's SamplingParams. Mirostat (1 or 2) replaces the truncating
    samplers and dynamic temperature, as in llama.cpp (DRY still applies). min_keep binds
    top_p, min_p, typ_p and xtc, the samplers llama.cpp gives it. sampling/chain.py runs it.
    """

    order: tuple[str, ...] = DEFAULT_CHAIN_ORDER
    typical_p: float = 1.0
    top_n_sigma: float = 0.0  # 0: off (llama.cpp spells off as -1)
    min_keep: int = 0  # truncating samplers keep at least this many tokens
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    mirostat: int = 0  # 0 off, 1 Mirostat, 2 Mirostat 2.0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry: DryPenalty | None = None

    def __post_init__(self) -> None:
        unknown = [name for name in self.order if name not in CHAIN_SAMPLERS]
        checks = [
            (not unknown, f"samplers has unknown names {unknown}; known: {sorted(CHAIN_SAMPLERS)}"),
            (0.0 < self.typical_p <= 1.0, "typical_p must be in (0, 1]"),
            (self.top_n_sigma >= 0.0, "top_n_sigma must be > 0, or -1 to disable it"),
            (self.min_keep >= 0, "min_keep must be >= 0"),
            (0.0 <= self.xtc_probability <= 1.0, "xtc_probability must be in [0, 1]"),
            (0.0 <= self.xtc_threshold <= 1.0, "xtc_threshold must be in [0, 1]"),
            (self.dynatemp_range >= 0.0, "dynatemp_range must be >= 0"),
            (self.dynatemp_exponent > 0.0, "dynatemp_exponent must be > 0"),
            (self.mirostat in (0, 1, 2), "mirostat must be 0, 1 or 2"),
            (self.mirostat_tau > 0.0, "mirostat_tau must be > 0"),
            (self.mirostat_eta > 0.0, "mirostat_eta must be > 0"),
        ]
        _check(checks)


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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
    repetition_window: int = 0  # repetition_penalty sees the last N tokens (prompt + output); 0: all
    unpenalized_ids: tuple[int, ...] = ()  # ids every penalty leaves alone (llama.cpp's penalize_nl: false)
    min_tokens: int = 0  # eos and stop token ids are banned until this many tokens are out (vLLM)
    chain: SamplerChain | None = None  # llama.cpp's samplers; None: the fast path's order (sampler.py)
    post_sampling_probs: bool = False  # logprobs report probabilities after the chain (llama.cpp)
    read_prefix_cache: bool = True  # false: the prompt is computed afresh (llama.cpp's cache_prompt: false)

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
            (self.repetition_window >= 0, "repeat_last_n must be >= -1"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
        ]
        _check(checks)

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
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet through the model: 1 for a decode, more for a prompt (or after preemption)."""
        return len(self.all_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class TokenLogprob:
    """Log-probability of one token (its text and bytes are looked up from the id when a response is built)."""

    token_id: int
    logprob: float  # of the raw model distribution; under post_sampling_probs, log(prob)
    prob: float | None = None  # post_sampling_probs only: the probability after the sampler chain


@dataclass
class SampleLogprobs:
    """The sampled token's logprob and its `k` most likely alternatives: of the raw model
    distribution, or under post_sampling_probs of what the sampler chain left (then each entry
    has a `prob`, and the list holds only tokens the chain kept, so it may be shorter than k)."""

    sampled: TokenLogprob
    top: list[TokenLogprob]

    @property
    def post_sampling(self) -> bool:
        """True when the values are probabilities after the chain (llama.cpp's post_sampling_probs)."""
        return self.sampled.prob is not None


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
    stop_string: str | None = None  # the stop string that finished it (finish_reason STOP)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
