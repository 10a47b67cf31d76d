"""Each choice's result as the engine produces it, recorded while streaming or gathered whole, and
what both response forms say of it: labels, usage, finish reasons."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.request import FinishReason, RequestOutput, SampleLogprobs
from lmserve.server.errors import bad_request, server_error
from lmserve.server.protocol import FinishReasonName, PromptTokensDetails, UsageInfo
from lmserve.server.requests.plan import GenerationPlan
from lmserve.server.requests.tools import ToolsPlan
from lmserve.server.responses.fanout import merge_outputs

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseMeta:
    """How a response labels itself: the same id, created and model on every chunk."""

    id: str
    created: int
    model: str


@dataclass
class ChoiceResult:
    """What one choice has produced so far, and when (llama.cpp's timings)."""

    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_string: str | None = None  # the stop string that finished it
    num_cached_tokens: int = 0
    num_prompt_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # the prompt is computed by then
    last_token_at: float | None = None

    def add(self, output: RequestOutput) -> None:
        """Record `output`; an engine ERROR or ABORT finish becomes a server error, an UNSATISFIABLE
        one a 400."""
        _raise_if_failed(output)
        self.text_parts.append(output.text_delta)
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs or ())
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        self.num_prompt_tokens = output.num_prompt_tokens or self.num_prompt_tokens
        self.finish_reason = output.finish_reason or self.finish_reason
        self.stop_string = output.stop_string or self.stop_string
        self.last_token_at = time.monotonic()
        self.first_token_at = self.first_token_at or self.last_token_at

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def _raise_if_failed(output: RequestOutput) -> None:
    if output.finish_reason == FinishReason.UNSATISFIABLE:  # the request's constraint, not the server
        raise bad_request(output.error or "the output constraint allows no token", code="unsatisfiable_constraint")
    if output.finish_reason == FinishReason.ERROR:
        # The engine's reason names code ("sampling failed: RuntimeError: ..."): the log has it.
        logger.error("generation of %s failed: %s", output.request_id, output.error or "engine error")
        raise server_error(f"Generation failed; the server log has the details under request {output.request_id}.")
    if output.finish_reason == FinishReason.ABORT:
        raise server_error(output.error or "the request was aborted by the server", status_code=503)


def finish_name(reason: FinishReason | None) -> FinishReasonName | None:
    return None if reason is None else reason.value  # type: ignore[return-value]


def chat_finish_name(tools: ToolsPlan | None, reason: FinishReason | None,
                     has_tool_calls: bool) -> FinishReasonName | None:
    """OpenAI answers "tool_calls" when the model chose to call tools, "stop" when a named
    tool_choice forced the call."""
    if has_tool_calls and reason == FinishReason.STOP and tools is not None and tools.mode != "named":
        return "tool_calls"
    return finish_name(reason)


def new_results(plan: GenerationPlan) -> dict[int, ChoiceResult]:
    return {choice.index: ChoiceResult() for choice in plan.choices}


async def recorded_outputs(
    engine: AsyncEngine, plan: GenerationPlan, results: dict[int, ChoiceResult]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """merge_outputs, each output added to its choice's result before it is yielded; at the end,
    a server error if a choice ended without a finish reason. Use it under `contextlib.aclosing`."""
    async with aclosing(merge_outputs(engine, plan)) as outputs:
        async for index, output in outputs:
            results[index].add(output)
            yield index, output
    check_finished(results)


async def collect_results(engine: AsyncEngine, plan: GenerationPlan) -> dict[int, ChoiceResult]:
    """Run `plan` to the end and gather every choice (for a whole response)."""
    results = new_results(plan)
    async with aclosing(recorded_outputs(engine, plan, results)) as outputs:
        async for _ in outputs:
            pass
    return results


def check_finished(results: dict[int, ChoiceResult]) -> None:
    unfinished = [index for index, result in results.items() if result.finish_reason is None]
    if unfinished:
        raise server_error(f"the engine ended choice {unfinished[0]} without a finish reason")


def usage(plan: GenerationPlan, results: dict[int, ChoiceResult]) -> UsageInfo:
    """Prompt tokens count once per prompt however many choices continue it."""
    num_prompt_tokens = sum(len(ids) for ids in plan.prompts)
    num_completion_tokens = sum(result.num_tokens for result in results.values())
    cached_by_prompt: dict[int, int] = {}
    for choice in plan.choices:
        cached = results[choice.index].num_cached_tokens
        cached_by_prompt[choice.prompt_index] = min(cached, cached_by_prompt.get(choice.prompt_index, cached))
    return UsageInfo(
        prompt_tokens=num_prompt_tokens,
        completion_tokens=num_completion_tokens,
        total_tokens=num_prompt_tokens + num_completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached_by_prompt.values())),
        **throughput(num_prompt_tokens, num_completion_tokens, list(results.values())),
    )


def throughput(num_prompt_tokens: int, num_completion_tokens: int, results: list[ChoiceResult]) -> dict[str, float]:
    """mistral.rs' usage fields: the request's times (its slowest choice) and tokens per second."""
    now = time.monotonic()
    started = min(result.started_at for result in results)
    first = max(result.first_token_at or now for result in results)
    last = max(result.last_token_at or now for result in results)
    prompt_seconds, completion_seconds, total_seconds = first - started, last - first, last - started
    return {
        "avg_tok_per_sec": _per_second(num_prompt_tokens + num_completion_tokens, total_seconds),
        "avg_prompt_tok_per_sec": _per_second(num_prompt_tokens, prompt_seconds),
        "avg_compl_tok_per_sec": _per_second(num_completion_tokens, completion_seconds),
        "total_time_sec": total_seconds,
        "total_prompt_time_sec": prompt_seconds,
        "total_completion_time_sec": completion_seconds,
    }


def _per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def timings(result: ChoiceResult) -> dict[str, float | int]:
    """llama.cpp's `timings` of one choice, as the server sees it: the prompt's time runs from
    arrival to the first token (queueing included), generation from there to the last."""
    now = time.monotonic()
    first = result.first_token_at or now
    prompt_ms = (first - result.started_at) * 1000
    predicted_ms = ((result.last_token_at or now) - first) * 1000
    num_prompt = max(result.num_prompt_tokens - result.num_cached_tokens, 0)
    num_predicted = max(result.num_tokens - 1, 0)  # the first token comes with the prompt
    return {
        "cache_n": result.num_cached_tokens,
        "prompt_n": num_prompt,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / num_prompt if num_prompt else 0.0,
        "prompt_per_second": num_prompt / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
        "predicted_n": result.num_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / num_predicted if num_predicted else 0.0,
        "predicted_per_second": num_predicted / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
    }
