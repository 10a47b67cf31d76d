"""What the engine reports: a step's outputs and stats, how busy it is, and that it was closed.
Plain data, read by the server, its metrics and the Ray Serve replicas outside the engine's thread."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.request import RequestOutput


@dataclass(kw_only=True)
class StepStats:
    """What one step did; metrics consume these outside the core."""

    num_scheduled_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_preempted: int = 0
    kv_cache_usage: float = 0.0
    step_seconds: float = 0.0
    num_prefix_cache_queries: int = 0  # KV blocks looked up in the prefix cache, since start
    num_prefix_cache_hits: int = 0  # of those, blocks found cached, since start
    num_draft_tokens: int = 0  # speculative drafts verified, since start
    num_accepted_tokens: int = 0  # of those, drafts kept, since start
    prompt_bounded: bool = False  # the time bound beside decodes (--max-step-ms) held prompt tokens back


@dataclass
class EngineStep:
    """What one call of step() produced: an output per sequence that moved, and the step's stats
    (None when no batch ran, or the model failed before the step was done)."""

    outputs: list[RequestOutput]
    stats: StepStats | None


@dataclass(frozen=True, kw_only=True)
class EngineLoad:
    """How busy the engine is now."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int


class EngineClosed(RuntimeError):
    """The engine was closed (its model unloaded); it takes no more requests."""
