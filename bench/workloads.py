"""Workloads: what one measured level sends, and the named sets `compare` runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from bench.prompts import make_prompts

KINDS = ("decode", "prefill", "prefix")  # "prefix" is a pair: shared-prefix and cold
DEFAULT_CONCURRENCIES = (1, 4, 16, 32, 64)
QUICK_CONCURRENCIES = (1, 4, 16)


@dataclass(frozen=True)
class Workload:
    """One measured level: `concurrency` requests kept in flight until `num_requests` are done."""

    name: str
    kind: str  # decode | prefill | shared | cold
    concurrency: int
    num_requests: int
    prompt_tokens: int
    max_tokens: int
    shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.num_requests < 1 or self.max_tokens < 1:
            raise ValueError(f"{self.name}: concurrency, num_requests and max_tokens must be >= 1")
        if not 0 <= self.shared_prefix_tokens <= self.prompt_tokens:
            raise ValueError(f"{self.name}: shared prefix longer than the prompt")

    @property
    def context_tokens(self) -> int:
        """Prompt plus output of one request: the KV a server must hold per sequence."""
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
    """'default' or 'all' -> every kind; else a comma list of decode, prefill, prefix."""
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
    return workloads


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
