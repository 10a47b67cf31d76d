"""Every choice's whole result -> one OpenAI response (requests without "stream": true)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmserve.parsing import ReplyFormat, parse_reply
from lmserve.request import FinishReason
from lmserve.server.protocol import (
    ChatChoice,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionResponse,
    ResponseFunction,
    ResponseToolCall,
)
from lmserve.server.requests.plan import GenerationPlan
from lmserve.server.responses.choices import ChoiceResult, ResponseMeta, chat_finish_name, finish_name, usage
from lmserve.server.responses.logprobs import chat_logprobs, completion_logprobs

if TYPE_CHECKING:
    from lmserve.text.tokenizer import ChatTokenizer


def chat_response(
    meta: ResponseMeta, plan: GenerationPlan, results: dict[int, ChoiceResult], tokenizer: ChatTokenizer
) -> ChatCompletionResponse:
    choices = []
    for index, result in sorted(results.items()):
        message = chat_message(plan.reply, result.text, truncated=result.finish_reason == FinishReason.LENGTH)
        choices.append(ChatChoice(
            index=index,
            message=message,
            logprobs=chat_logprobs(tokenizer, result.logprobs) if plan.want_logprobs else None,
            finish_reason=chat_finish_name(plan.tools, result.finish_reason, bool(message.tool_calls)),
        ))
    return ChatCompletionResponse(
        id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage(plan, results)
    )


def chat_message(fmt: ReplyFormat | None, text: str, truncated: bool = False) -> ChatResponseMessage:
    """The assistant message of a whole reply: content, and reasoning and tool calls when parsed
    (`truncated`: max_tokens ended the reply)."""
    if fmt is None:
        return ChatResponseMessage(content=text)
    reply = parse_reply(fmt, text, truncated)
    calls = [ResponseToolCall(id=c.id, function=ResponseFunction(name=c.name, arguments=c.arguments))
             for c in reply.tool_calls]
    return ChatResponseMessage(content=reply.content, tool_calls=calls or None, reasoning_content=reply.reasoning)


def completion_response(
    meta: ResponseMeta, plan: GenerationPlan, results: dict[int, ChoiceResult], tokenizer: ChatTokenizer
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
