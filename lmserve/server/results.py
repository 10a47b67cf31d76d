"""Engine outputs -> OpenAI response objects: choices, logprobs, usage, whole responses."""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmserve.parsing import ReplyFormat, parse_reply
from lmserve.request import FinishReason, RequestOutput, SampleLogprobs, TokenLogprob
from lmserve.server.convert import GenerationPlan
from lmserve.server.errors import server_error
from lmserve.server.fanout import merge_outputs
from lmserve.server.protocol import (
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FinishReasonName,
    PromptTokensDetails,
    ResponseFunction,
    ResponseToolCall,
    TopLogprob,
    UsageInfo,
)

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.server.tools import ToolsPlan
    from lmserve.text.tokenizer import Tokenizer

# JSON has no -inf; vLLM uses the same floor for impossible tokens.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ResponseMeta:
    """How a response labels itself: the same id, created and model on every chunk."""

    id: str
    created: int
    model: str


@dataclass
class ChoiceResult:
    """What one choice has produced so far."""

    text_parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[SampleLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        """Record `output`; an engine ERROR or ABORT finish becomes a server error."""
        _raise_if_failed(output)
        self.text_parts.append(output.text_delta)
        self.num_tokens += len(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs or ())
        self.num_cached_tokens = max(self.num_cached_tokens, output.num_cached_tokens)
        self.finish_reason = output.finish_reason or self.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def _raise_if_failed(output: RequestOutput) -> None:
    if output.finish_reason == FinishReason.ERROR:
        raise server_error(f"generation failed: {output.error or 'engine error'}")
    if output.finish_reason == FinishReason.ABORT:
        raise server_error("the request was aborted by the server", status_code=503)


def finish_name(reason: FinishReason | None) -> FinishReasonName | None:
    return None if reason is None else reason.value  # type: ignore[return-value]


def new_results(plan: GenerationPlan) -> dict[int, ChoiceResult]:
    return {choice.index: ChoiceResult() for choice in plan.choices}


def check_finished(results: dict[int, ChoiceResult]) -> None:
    unfinished = [index for index, result in results.items() if result.finish_reason is None]
    if unfinished:
        raise server_error(f"the engine ended choice {unfinished[0]} without a finish reason")


async def collect_results(engine: AsyncEngine, plan: GenerationPlan) -> dict[int, ChoiceResult]:
    """Run `plan` to the end and gather every choice (non-streaming responses)."""
    results = new_results(plan)
    async with aclosing(merge_outputs(engine, plan)) as outputs:
        async for index, output in outputs:
            results[index].add(output)
    check_finished(results)
    return results


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
    )


# ---------------------------------------------------------------- logprobs


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _top_logprob(tokenizer: Tokenizer, entry: TokenLogprob) -> TopLogprob:
    raw = tokenizer.token_bytes(entry.token_id)
    return TopLogprob(
        token=raw.decode("utf-8", errors="replace"), logprob=_logprob(entry.logprob), bytes=list(raw)
    )


def chat_logprobs(tokenizer: Tokenizer, samples: list[SampleLogprobs]) -> ChatLogprobs:
    """`choices[i].logprobs` of a chat completion: one entry per generated token."""
    content = [
        ChatTokenLogprob(
            **_top_logprob(tokenizer, sample.sampled).model_dump(),
            top_logprobs=[_top_logprob(tokenizer, entry) for entry in sample.top],
        )
        for sample in samples
    ]
    return ChatLogprobs(content=content, refusal=None)


def completion_logprobs(
    tokenizer: Tokenizer, samples: list[SampleLogprobs], text_offset: int
) -> CompletionLogprobs:
    """Legacy completions logprobs; `text_offset` is where the first token's text starts."""
    logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for sample in samples:
        text = token_text(tokenizer, sample.sampled.token_id)
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(_logprob(sample.sampled.logprob))
        logprobs.top_logprobs.append(_top_dict(tokenizer, sample))
        logprobs.text_offset.append(text_offset)
        text_offset += len(text)
    return logprobs


def _top_dict(tokenizer: Tokenizer, sample: SampleLogprobs) -> dict[str, float]:
    """The k alternatives plus the sampled token (OpenAI: up to logprobs + 1 entries)."""
    top: dict[str, float] = {}
    for entry in [*sample.top, sample.sampled]:
        top.setdefault(token_text(tokenizer, entry.token_id), _logprob(entry.logprob))
    return top


# ---------------------------------------------------------------- whole responses


def chat_response(
    meta: ResponseMeta, plan: GenerationPlan, results: dict[int, ChoiceResult], tokenizer: Tokenizer
) -> ChatCompletionResponse:
    choices = []
    for index, result in sorted(results.items()):
        message = chat_message(plan.reply, result.text)
        choices.append(ChatChoice(
            index=index,
            message=message,
            logprobs=chat_logprobs(tokenizer, result.logprobs) if plan.want_logprobs else None,
            finish_reason=chat_finish_name(plan.tools, result.finish_reason, bool(message.tool_calls)),
        ))
    return ChatCompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage(plan, results)
    )


def chat_message(fmt: ReplyFormat | None, text: str) -> ChatResponseMessage:
    """The assistant message of a whole reply: content, and reasoning and tool calls when parsed."""
    if fmt is None:
        return ChatResponseMessage(content=text)
    reply = parse_reply(fmt, text)
    calls = [ResponseToolCall(id=c.id, function=ResponseFunction(name=c.name, arguments=c.arguments))
             for c in reply.tool_calls]
    return ChatResponseMessage(content=reply.content, tool_calls=calls or None, reasoning_content=reply.reasoning)


def chat_finish_name(tools: ToolsPlan | None, reason: FinishReason | None,
                     has_tool_calls: bool) -> FinishReasonName | None:
    """OpenAI answers "tool_calls" when the model chose to call tools, "stop" when a named
    tool_choice forced the call."""
    if has_tool_calls and reason == FinishReason.STOP and tools is not None and tools.mode != "named":
        return "tool_calls"
    return finish_name(reason)


def completion_response(
    meta: ResponseMeta, plan: GenerationPlan, results: dict[int, ChoiceResult], tokenizer: Tokenizer
) -> CompletionResponse:
    choices = []
    for choice in plan.choices:
        result = results[choice.index]
        prefix = plan.echo_texts[choice.prompt_index] if plan.echo_texts else ""
        logprobs = (
            completion_logprobs(tokenizer, result.logprobs, len(prefix)) if plan.want_logprobs else None
        )
        choices.append(
            CompletionChoice(
                index=choice.index,
                text=prefix + result.text,
                logprobs=logprobs,
                finish_reason=finish_name(result.finish_reason),
            )
        )
    return CompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage(plan, results)
    )
