"""Workloads: what one measured level sends, and the named sets `compare` runs.

Next to the fixed-length levels, two realistic mixes:
- "mix": prompt and output lengths drawn from long-tailed (log-normal) distributions, around
  `prompt_tokens` and MIX_MEDIAN_OUTPUT, capped at 4 x `prompt_tokens` and `max_tokens`;
- "chat": conversations of `turns` turns under one shared system prompt (`shared_prefix_tokens`):
  each turn sends the whole history (system prompt, earlier user messages and replies) and a new
  user message of `prompt_tokens` ids; reply lengths are drawn as in "mix", capped at `max_tokens`.
  The history carries a reply as random ids of the length the server produced: both servers then
  find the earlier prompt, not the earlier reply, in their prefix caches.
And structured output: "json" sends the fixed-length levels' prompts with JSON_SCHEMA as the
`json_schema` extension both servers take on /v1/completions, greedy, ending where the schema
does (no `ignore_eos`): output lengths may differ between servers, so compare tokens a second.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.prompts import make_prompts, random_ids

KINDS = ("decode", "prefill", "prefix", "mix", "chat", "system", "json")  # "prefix" is a pair: shared-prefix and cold
MIX_MEDIAN_OUTPUT = 64  # tokens; a log-normal of this median with MIX_SIGMA: p95 ~5x the median
MIX_SIGMA = 1.0
PROMPT_SIGMA = 0.8

# A record with bounded strings and a bounded array, as an extraction or tool-argument schema has.
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 10, "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 6},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "summary": {"type": "string", "minLength": 80, "maxLength": 400},
    },
    "required": ["title", "tags", "year", "summary"],
}

Turn = tuple[list[int], int]  # prompt ids, max_tokens
Job = list[Turn]  # turns sent one after another, each once the previous one has finished
DEFAULT_CONCURRENCIES = (1, 4, 16, 32, 64)
QUICK_CONCURRENCIES = (1, 4, 16)


@dataclass(frozen=True)
class Workload:
    """One measured level: `concurrency` requests kept in flight until `num_requests` are done."""

    name: str
    kind: str  # decode | prefill | shared | cold | mix | chat | json
    concurrency: int  # requests in flight; for chat, conversations in flight
    num_requests: int  # for chat, conversations x turns
    prompt_tokens: int  # for mix, the median prompt; for chat, each user message
    max_tokens: int  # for mix and chat, the cap of the drawn output lengths
    shared_prefix_tokens: int = 0
    turns: int = 1  # chat only

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_requests < 1 or self.max_tokens < 1:
            raise ValueError(f"{self.name}: concurrency, num_requests and max_tokens must be >= 1")
        if self.kind != "chat" and not 0 <= self.shared_prefix_tokens <= self.prompt_tokens:
            raise ValueError(f"{self.name}: shared prefix longer than the prompt")
        if self.kind == "chat" and self.num_requests % self.turns:
            raise ValueError(f"{self.name}: num_requests must be whole conversations of {self.turns} turns")

    @property
    def context_tokens(self) -> int:
        """Prompt plus output of the longest request: the KV a server must hold per sequence."""
        if self.kind == "mix":
            return 4 * self.prompt_tokens + self.max_tokens
        if self.kind == "chat":
            return self.shared_prefix_tokens + self.turns * (self.prompt_tokens + self.max_tokens)
        return self.prompt_tokens + self.max_tokens


def default_num_requests(concurrency: int) -> int:
    # Two rounds per level so the level is not all ramp-up and tail; at least 4 for percentiles.
    return max(2 * concurrency, 4)


def level_workloads(
    concurrencies: Sequence[int],
    prompt_tokens: int,
    max_tokens: int,
    shared_prefix_tokens: int = 0,
    num_requests: int | None = None,
) -> list[Workload]:
    """The levels of `bench run`: decode levels, or shared-prefix levels each followed by its cold twin."""
    workloads = []
    for concurrency in concurrencies:
        count = num_requests or default_num_requests(concurrency)
        if shared_prefix_tokens:
            shared = Workload(f"shared-c{concurrency}", "shared", concurrency, count, prompt_tokens,
                              max_tokens, shared_prefix_tokens)
            workloads += [shared, replace(shared, name=f"cold-c{concurrency}", kind="cold", shared_prefix_tokens=0)]
        else:
            workloads.append(
                Workload(f"decode-c{concurrency}", "decode", concurrency, count, prompt_tokens, max_tokens))
    return workloads


def parse_kinds(text: str) -> tuple[str, ...]:
    """'default' or 'all' -> every kind; else a comma list of them (KINDS)."""
    if text in ("default", "all"):
        return KINDS
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown workload kinds {unknown or text!r}; choose from default, {', '.join(KINDS)}")
    return kinds


def workload_set(
    kinds: Sequence[str] = KINDS,
    quick: bool = False,
    concurrencies: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> list[Workload]:
    """The side-by-side set. `quick` shrinks it for smoke runs; the overrides apply to decode levels
    (and cap the prefix pair's concurrency at the largest level asked for)."""
    concurrencies = tuple(concurrencies or (QUICK_CONCURRENCIES if quick else DEFAULT_CONCURRENCIES))
    workloads: list[Workload] = []
    if "decode" in kinds:
        decode_max = max_tokens or (64 if quick else 256)
        counts = {c: max(c, 2) if quick else default_num_requests(c) for c in concurrencies}
        workloads += [Workload(f"decode-c{c}", "decode", c, counts[c], 128, decode_max) for c in concurrencies]
    if "prefill" in kinds:
        workloads.append(Workload("prefill-1024" if quick else "prefill-2000", "prefill", 1,
                                  1 if quick else 3, 1024 if quick else 2000, 1))
    if "prefix" in kinds:
        workloads += _prefix_pair(min(4 if quick else 16, max(concurrencies)), 16 if quick else 32)
    concurrency = min(4 if quick else 16, max(concurrencies))
    if "mix" in kinds:
        workloads.append(Workload(f"mix-c{concurrency}", "mix", concurrency, 4 * concurrency, 128,
                                  128 if quick else 512))
    if "chat" in kinds:
        turns = 3 if quick else 6
        workloads.append(Workload(f"chat-c{concurrency}", "chat", concurrency, turns * concurrency, 48,
                                  64 if quick else 256, shared_prefix_tokens=400, turns=turns))
    if "system" in kinds:
        # Long replies under one long system prompt: the prompt computed once, then decode steps
        # whose sequences all begin with it (kernels/paged_attention.cpp attends to it once for them).
        workloads.append(Workload(f"system-c{concurrency}", "shared", concurrency, 2 * concurrency, 1600,
                                  64 if quick else 256, 1500))
    if "json" in kinds:
        workloads += [Workload(f"json-c{c}", "json", c, max(2 * c, 4), 128, 64 if quick else 256)
                      for c in sorted({1, concurrency})]
    return workloads


def json_schema(workload: Workload) -> dict | None:
    """The schema a workload's requests carry, if any."""
    return JSON_SCHEMA if workload.kind == "json" else None


def _prefix_pair(concurrency: int, max_tokens: int) -> list[Workload]:
    # One round of requests sharing a 1,500-token prefix, then the same count fully distinct.
    shared = Workload(f"shared-c{concurrency}", "shared", concurrency, concurrency, 1600, max_tokens, 1500)
    return [shared, replace(shared, name=f"cold-c{concurrency}", kind="cold", shared_prefix_tokens=0)]


def workload_prompts(workload: Workload, seed: str) -> list[list[int]]:
    """The warm-up prompt first, then one per measured request.

    Seeded by the workload's name, so levels never share prompts (no accidental prefix-cache hits
    across levels) while every server gets the same ones. The warm-up prompt shares the workload's
    prefix: for the shared-prefix workload it is what puts the prefix in the server's cache.
    """
    return make_prompts(workload.num_requests + 1, workload.prompt_tokens, workload.shared_prefix_tokens,
                        seed=f"{seed}:{workload.name}")


def drawn_length(rng: random.Random, median: int, sigma: float, low: int, high: int) -> int:
    """A log-normal draw of this median, rounded and clipped to [low, high]."""
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def workload_jobs(workload: Workload, seed: str) -> list[Job]:
    """The warm-up request first (one turn), then the measured jobs: one turn each, or for chat one
    conversation each, its turns sent one after another. Outputs are exact (`ignore_eos`), so a
    conversation's later prompts are known before it starts."""
    prompts = workload_prompts(workload, seed) if workload.kind not in ("mix", "chat") else None
    if prompts is not None:
        return [[(prompt, workload.max_tokens)] for prompt in prompts]
    rng = random.Random(f"{seed}:{workload.name}")
    if workload.kind == "mix":
        jobs = []
        for _ in range(workload.num_requests + 1):
            length = drawn_length(rng, workload.prompt_tokens, PROMPT_SIGMA, 16, 4 * workload.prompt_tokens)
            output = drawn_length(rng, MIX_MEDIAN_OUTPUT, MIX_SIGMA, 1, workload.max_tokens)
            jobs.append([(random_ids(rng, length), output)])
        return jobs
    system = random_ids(rng, workload.shared_prefix_tokens)
    jobs = [[(system + random_ids(rng, workload.prompt_tokens), 4)]]  # the warm-up caches the system prompt
    for _ in range(workload.num_requests // workload.turns):
        conversation: Job = []
        history = list(system)
        for turn in range(workload.turns):
            history += random_ids(rng, workload.prompt_tokens)
            reply = drawn_length(rng, MIX_MEDIAN_OUTPUT, MIX_SIGMA, 1, workload.max_tokens)
            conversation.append((list(history), reply))
            history += random_ids(rng, reply)  # the reply as the next turn's history carries it
        jobs.append(conversation)
    return jobs
