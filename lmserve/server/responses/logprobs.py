"""Sampled tokens' logprobs -> the two OpenAI shapes: chat's per-token entries and the legacy
completions' parallel lists."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve.request import SampleLogprobs, TokenLogprob
from lmserve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

if TYPE_CHECKING:
    from lmserve.text.tokenizer import ChatTokenizer

# JSON has no -inf; vLLM uses the same floor for impossible tokens.
MIN_LOGPROB = -9999.0


def token_text(tokenizer: ChatTokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


def _top_logprob(tokenizer: ChatTokenizer, entry: TokenLogprob) -> TopLogprob:
    raw = tokenizer.token_bytes(entry.token_id)
    return TopLogprob(
        token=raw.decode("utf-8", errors="replace"), logprob=_logprob(entry.logprob), bytes=list(raw)
    )


def chat_logprobs(tokenizer: ChatTokenizer, samples: list[SampleLogprobs]) -> ChatLogprobs:
    """`choices[i].logprobs` of a chat completion: one entry per generated token."""
    content = [
        ChatTokenLogprob(
            **_top_logprob(tokenizer, sample.sampled).model_dump(),
            top_logprobs=[_top_logprob(tokenizer, entry) for entry in sample.top],
        )
        for sample in samples
    ]
    return ChatLogprobs(content=content, refusal=None)


def response_logprobs(tokenizer: ChatTokenizer, samples: list[SampleLogprobs]) -> list[dict]:
    """The Responses API's `logprobs` of output text: chat's entries, as plain objects."""
    return [entry.model_dump() for entry in chat_logprobs(tokenizer, samples).content]


def completion_logprobs(
    tokenizer: ChatTokenizer, samples: list[SampleLogprobs], text_offset: int
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


def _top_dict(tokenizer: ChatTokenizer, sample: SampleLogprobs) -> dict[str, float]:
    """The k alternatives plus the sampled token (OpenAI: up to logprobs + 1 entries)."""
    top: dict[str, float] = {}
    for entry in [*sample.top, sample.sampled]:
        top.setdefault(token_text(tokenizer, entry.token_id), _logprob(entry.logprob))
    return top
