"""Chat completion requests -> a GenerationPlan: the prompt the chat template renders (tools
included), and chat's own fields (logprobs and top_logprobs, max_completion_tokens, functions).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from lmserve.request import SamplingParams
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import ChatCompletionRequest
from lmserve.server.requests.chat_prompt import render_chat, reply_format
from lmserve.server.requests.constraints import check_compiles
from lmserve.server.requests.cost import check_chat_size
from lmserve.server.requests.known_params import check_known_params
from lmserve.server.requests.plan.generation_plan import (
    ContextLimit,
    GenerationPlan,
    choice_plans,
    n_predict_max_tokens,
)
from lmserve.server.requests.plan.sampling_fields import base_params, check_stream_options
from lmserve.server.requests.tokens import encode_prompt
from lmserve.server.requests.tools import ToolsPlan, plan_tools
from lmserve.text.special_text import PromptText

if TYPE_CHECKING:
    from lmserve.sampling.grammar import GrammarCompiler, RequestCompiler
    from lmserve.text.tokenizer import ChatTokenizer


def chat_plan(
    request: ChatCompletionRequest, response_id: str, tokenizer: ChatTokenizer, max_model_len: int,
    grammar: GrammarCompiler | RequestCompiler | None = None, *, clip_max_tokens: bool = False,
) -> GenerationPlan:
    """Render the chat template, tokenize it, and build one SamplingParams per choice.
    `clip_max_tokens`: max_tokens is the model's default, not the client's: it ends at the
    context's end rather than being refused for not fitting."""
    _check_chat_supported(request)
    check_stream_options(request)
    check_known_params(request.model_extra or {}, "chat completions")
    check_chat_size(1 if isinstance(request.messages, str) else len(request.messages), len(request.tools or ()))
    tools = plan_tools(request, tokenizer)
    base = _with_tools(base_params(request, tokenizer, _chat_logprobs(request), grammar), tools, grammar)
    # After the fields' checks: a prompt too long to fit is refused, but a wrong field named first.
    prompt, prompt_ids = chat_prompt(request, tokenizer, tools, max_num_tokens=max_model_len - 1)
    max_tokens, param = _requested_max_tokens(request)
    limit = ContextLimit(max_model_len, max_tokens, param, prompt_param="messages", clip=clip_max_tokens)
    choices = choice_plans([prompt_ids], base, request.n, response_id, limit)
    # Only tool_choice "auto" leaves free text before the grammar; any other grammar shapes the
    # reply from its first token, so it holds no reasoning even when the prompt opened <think>.
    forced = base.grammar is not None and (tools is None or tools.mode != "auto")
    reply = reply_format(tokenizer, prompt.text, tools, forced)
    return GenerationPlan([prompt_ids], choices, reply=reply, tools=tools)


def chat_prompt(request: ChatCompletionRequest, tokenizer: ChatTokenizer, tools: ToolsPlan | None,
                max_num_tokens: int | None = None) -> tuple[PromptText, list[int]]:
    """The rendered prompt and its token ids (the template holds the BOS; special-token text the
    request wrote is plain text unless it sets parse_special); a prompt that cannot take at most
    `max_num_tokens` tokens is refused by its length, untokenized."""
    prompt = render_chat(request, tokenizer, tools)
    prompt_ids = encode_prompt(tokenizer, prompt, param="messages", max_num_tokens=max_num_tokens)
    if not prompt_ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    return prompt, prompt_ids


def count_chat_tokens(request: ChatCompletionRequest, tokenizer: ChatTokenizer) -> int:
    """How many tokens the request's prompt takes, tools included (however long it is)."""
    return len(chat_prompt(request, tokenizer, plan_tools(request, tokenizer))[1])


def chat_prompt_text(request: ChatCompletionRequest, tokenizer: ChatTokenizer) -> str:
    """The prompt text the chat template makes of the request, tools included."""
    return render_chat(request, tokenizer, plan_tools(request, tokenizer)).text


def _with_tools(base: SamplingParams, tools: ToolsPlan | None,
                grammar: GrammarCompiler | RequestCompiler | None) -> SamplingParams:
    """Params whose grammar enforces the tool calls, and which keep the special tokens a format needs."""
    if tools is None:
        return base
    if base.grammar is not None:
        raise bad_request("an output constraint (response_format, grammar, ...) cannot be combined with tools; "
                          "set tool_choice to 'none' or drop the constraint", param="tools")
    spec = tools.grammar()
    check_compiles(spec, grammar, "tools", "tool calling", "a tool's parameters schema is not usable: ")
    return replace(base, grammar=spec, skip_special_tokens=base.skip_special_tokens and not tools.needs_special_tokens)


def _check_chat_supported(request: ChatCompletionRequest) -> None:
    if request.functions and request.function_call != "none":
        raise unsupported("functions", "function calling ('functions')")
    if request.function_call not in (None, "none", "auto"):
        raise unsupported("function_call", f"function_call {request.function_call!r}")
    if request.audio is not None:
        raise unsupported("audio", "audio output")
    if request.modalities and any(m != "text" for m in request.modalities):
        raise unsupported("modalities", f"modalities {request.modalities!r} (only ['text'])")
    if request.top_logprobs and request.logprobs is not True:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")


def _chat_logprobs(request: ChatCompletionRequest) -> int | None:
    """How many top logprobs per token, None for none: OpenAI's logprobs + top_logprobs, mlx-lm's
    logprobs: N, or llama.cpp's n_probs."""
    if request.logprobs is True:
        return request.top_logprobs or 0
    if request.logprobs not in (None, False):  # an integer: mlx-lm's number of top logprobs
        if not 0 <= request.logprobs <= 20:
            raise bad_request("logprobs as a number of top logprobs must be in [0, 20]", param="logprobs")
        return request.logprobs
    return request.n_probs or None


def _requested_max_tokens(request: ChatCompletionRequest) -> tuple[int | None, str]:
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens, "max_completion_tokens"
    if request.n_predict is not None:
        return n_predict_max_tokens(request), "n_predict"
    return request.max_tokens, "max_tokens"
