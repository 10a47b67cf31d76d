"""Chat and text completion requests -> a GenerationPlan: prompt token ids and one SamplingParams per choice.

Every recognised request field is honoured here or refused with a 400 naming it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lmserve.parsing import ReplyFormat
from lmserve.request import SamplingParams
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InfillRequest,
    SamplingFields,
)
from lmserve.server.requests.chat_prompt import render_chat, reply_format
from lmserve.server.requests.constraints import check_compiles, grammar_spec
from lmserve.server.requests.cost import (
    check_chat_size,
    check_logit_bias,
    check_sequence_tokens,
    check_sequences,
    check_stop_strings,
    check_stop_token_ids,
)
from lmserve.server.requests.known_params import check_known_params
from lmserve.server.requests.peer_sampling import peer_sampling
from lmserve.server.requests.tokens import checked_token_ids, encode_prompt, encode_text
from lmserve.server.requests.tools import ToolsPlan, plan_tools
from lmserve.text.fim import infill_ids
from lmserve.text.special_text import PromptText

if TYPE_CHECKING:
    from lmserve.sampling.grammar import GrammarCompiler, RequestCompiler
    from lmserve.text.tokenizer import ChatTokenizer

MAX_ABS_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class ChoicePlan:
    """One choice of a response: one engine request."""

    index: int  # choice index in the response
    request_id: str  # engine request id
    prompt_index: int  # which of the plan's prompts it continues
    params: SamplingParams


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the engine runs for one API request."""

    prompts: list[list[int]]  # prompt token ids, one list per prompt
    choices: list[ChoicePlan]  # in choice index order
    echo_texts: list[str] | None = None  # per prompt: text put before each choice's output
    reply: ReplyFormat | None = None  # chat: how to split replies into reasoning, content, tool calls
    tools: ToolsPlan | None = None  # chat: the tools offered and how the model must use them

    @property
    def want_logprobs(self) -> bool:
        return self.choices[0].params.logprobs is not None


# ---------------------------------------------------------------- chat


def chat_plan(
    request: ChatCompletionRequest, response_id: str, tokenizer: ChatTokenizer, max_model_len: int,
    grammar: GrammarCompiler | RequestCompiler | None = None, *, clip_max_tokens: bool = False,
) -> GenerationPlan:
    """Render the chat template, tokenize it, and build one SamplingParams per choice.
    `clip_max_tokens`: max_tokens is the model's default, not the client's: it ends at the
    context's end rather than being refused for not fitting."""
    _check_chat_supported(request)
    _check_stream_options(request)
    check_known_params(request.model_extra or {}, "chat completions")
    check_chat_size(1 if isinstance(request.messages, str) else len(request.messages), len(request.tools or ()))
    tools = plan_tools(request, tokenizer)
    base = _with_tools(base_params(request, tokenizer, _chat_logprobs(request), grammar), tools, grammar)
    # After the fields' checks: a prompt too long to fit is refused, but a wrong field named first.
    prompt, prompt_ids = chat_prompt(request, tokenizer, tools, max_num_tokens=max_model_len - 1)
    max_tokens, param = _requested_max_tokens(request)
    limit = _ContextLimit(max_model_len, max_tokens, param, prompt_param="messages", clip=clip_max_tokens)
    choices = _choice_plans([prompt_ids], base, request.n, response_id, limit)
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
        return _n_predict(request), "n_predict"
    return request.max_tokens, "max_tokens"


def _n_predict(request: SamplingFields) -> int | None:
    """llama.cpp's n_predict as max_tokens: -1 is the rest of the context."""
    if "max_tokens" in request.model_fields_set and request.max_tokens != request.n_predict:
        raise bad_request("max_tokens and n_predict are the same setting and disagree", param="n_predict")
    if request.n_predict == 0:
        raise unsupported("n_predict", "n_predict: 0 (evaluating the prompt only)")
    return None if request.n_predict == -1 else request.n_predict


# ---------------------------------------------------------------- text completions


def completion_plan(
    request: CompletionRequest, response_id: str, tokenizer: ChatTokenizer, max_model_len: int,
    grammar: GrammarCompiler | RequestCompiler | None = None, *, clip_max_tokens: bool = False,
) -> GenerationPlan:
    """Tokenize the prompt(s) and build n SamplingParams per prompt (`clip_max_tokens` as for chat)."""
    _check_completion_supported(request)
    _check_stream_options(request)
    check_known_params(request.model_extra or {}, _COMPLETION_ROUTES.get(type(request).__name__, "completions"))
    prompt_items = _prompt_items(request.prompt)
    check_sequences(len(prompt_items), request.n)  # before tokenizing them all
    max_prompt_tokens = max_model_len - 1  # a prompt leaves room for one token of reply
    prompts = [_prompt_ids(item, i, tokenizer, max_prompt_tokens) for i, item in enumerate(prompt_items)]
    if request.suffix:  # OpenAI's insertion: the reply goes between each prompt and the suffix
        prompts = [_fim_prompt(tokenizer, ids, request.suffix, "suffix", max_prompt_tokens) for ids in prompts]
    logprobs = request.logprobs if request.logprobs is not None else request.n_probs or None
    base = base_params(request, tokenizer, logprobs, grammar)
    max_tokens, param = (_n_predict(request), "n_predict") if request.n_predict is not None else (
        request.max_tokens, "max_tokens")
    limit = _ContextLimit(max_model_len, max_tokens, param, prompt_param="prompt", clip=clip_max_tokens)
    choices = _choice_plans(prompts, base, request.n, response_id, limit)
    echo_texts = _echo_texts(prompt_items, tokenizer, request.skip_special_tokens) if request.echo else None
    return GenerationPlan(prompts, choices, echo_texts)


_COMPLETION_ROUTES = {"CompletionRequest": "/v1/completions (OpenAI's shape)",
                      "LlamaCompletionRequest": "llama.cpp's /completion", "InfillRequest": "/infill"}


def infill_plan(
    request: InfillRequest, response_id: str, tokenizer: ChatTokenizer, max_model_len: int,
    grammar: GrammarCompiler | RequestCompiler | None = None, *, clip_max_tokens: bool = False,
) -> GenerationPlan:
    """llama.cpp's /infill: its FIM prompt (other files, <PRE> prefix prompt <SUF> suffix <MID>),
    then a completion of it."""
    missing_fim(tokenizer, "input_prefix")
    max_prompt_tokens = max_model_len - 1
    prompt_ids = [] if request.prompt == "" else _prompt_ids(_prompt_items(request.prompt)[0], 0, tokenizer,
                                                              max_prompt_tokens)
    extra = [(chunk.filename, chunk.text) for chunk in request.input_extra]
    ids = infill_ids(tokenizer.fim, _plain_encoder(tokenizer, max_prompt_tokens), request.input_prefix,
                     request.input_suffix,
                     _without_bos(tokenizer, prompt_ids), extra, _bos_ids(tokenizer))
    return completion_plan(request.model_copy(update={"prompt": ids, "echo": False}), response_id, tokenizer,
                           max_model_len, grammar, clip_max_tokens=clip_max_tokens)


def missing_fim(tokenizer: ChatTokenizer, param: str) -> None:
    missing = tokenizer.fim.missing
    if missing:
        raise bad_request(f"this model has no fill-in-the-middle tokens ({', '.join(missing)} missing), "
                          "so it cannot infill", param=param, code="unsupported_parameter")


def _fim_prompt(tokenizer: ChatTokenizer, prompt_ids: list[int], suffix: str, param: str,
                max_num_tokens: int) -> list[int]:
    """OpenAI's suffix: the prompt is the prefix, the reply fills the middle."""
    missing_fim(tokenizer, param)
    return infill_ids(tokenizer.fim, _plain_encoder(tokenizer, max_num_tokens), "", suffix,
                      _without_bos(tokenizer, prompt_ids), [], _bos_ids(tokenizer))


def _bos_ids(tokenizer: ChatTokenizer) -> list[int]:
    """What the tokenizer puts before a text: BOS for models that want one, else nothing."""
    return tokenizer.encode("", add_special_tokens=True)


def _without_bos(tokenizer: ChatTokenizer, ids: list[int]) -> list[int]:
    bos = _bos_ids(tokenizer)
    return ids[len(bos):] if bos and ids[: len(bos)] == bos else ids


def _plain_encoder(tokenizer: ChatTokenizer, max_num_tokens: int):
    return lambda text: encode_text(tokenizer, text, add_special_tokens=False, param="prompt",
                                    max_num_tokens=max_num_tokens) if text else []


def _check_completion_supported(request: CompletionRequest) -> None:
    if request.suffix and request.echo:
        raise unsupported("suffix", "'suffix' with echo")
    if request.best_of is not None and request.best_of > request.n:
        raise unsupported("best_of", "best_of > n")
    if request.best_of is not None and request.best_of < request.n:
        raise bad_request(f"best_of ({request.best_of}) must be >= n ({request.n})", param="best_of")
    if request.echo and request.logprobs is not None:
        raise unsupported("echo", "echo with logprobs (prompt logprobs)")


def _prompt_items(prompt: str | list[int | str | list[int | str]]) -> list[str | list[int | str]]:
    """The request's prompts: a string or a list of ids (and, as llama.cpp takes them, strings) each.
    A list holding any id is one prompt; otherwise each of its items is one."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if any(isinstance(item, int) for item in prompt):
        if any(isinstance(item, list) for item in prompt):
            raise bad_request("prompt mixes token ids with lists: send one prompt (ids and strings) or a list of "
                              "prompts", param="prompt")
        return [prompt]
    return list(prompt)


def _prompt_ids(item: str | list[int | str], i: int, tokenizer: ChatTokenizer, max_num_tokens: int) -> list[int]:
    param = f"prompt[{i}]" if i else "prompt"
    if not item:
        raise bad_request("prompt must not be empty", param=param)
    if isinstance(item, str):
        return encode_text(tokenizer, item, add_special_tokens=True, param=param, max_num_tokens=max_num_tokens)
    ids: list[int] = []
    for position, piece in enumerate(item):  # llama.cpp: BOS only when the prompt opens with text
        if isinstance(piece, str):
            ids += encode_text(tokenizer, piece, add_special_tokens=position == 0, param=param,
                               max_num_tokens=max_num_tokens)
        else:
            ids.append(piece)
    return checked_token_ids(ids, tokenizer.vocab_size, param)


def _echo_texts(items: list[str | list[int | str]], tokenizer: ChatTokenizer,
                skip_special_tokens: bool) -> list[str]:
    return [_echo_text(item, tokenizer, skip_special_tokens) for item in items]


def _echo_text(item: str | list[int | str], tokenizer: ChatTokenizer, skip_special_tokens: bool) -> str:
    if isinstance(item, str):
        return item
    parts = []  # runs of ids decode together, so a character split over tokens stays whole
    for is_text, run in itertools.groupby(item, key=lambda piece: isinstance(piece, str)):
        run = list(run)
        parts.append("".join(run) if is_text else tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
    return "".join(parts)


# ---------------------------------------------------------------- shared


def _check_stream_options(request: SamplingFields) -> None:
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if request.stream_options is not None and (request.stream_options.model_extra or {}).get("continuous_usage_stats"):
        raise unsupported("stream_options.continuous_usage_stats", "usage on every chunk (continuous_usage_stats)")


def base_params(request: SamplingFields, tokenizer: ChatTokenizer, logprobs: int | None = None,
                grammar: GrammarCompiler | RequestCompiler | None = None) -> SamplingParams:
    """The request's sampling fields as SamplingParams (max_tokens is set per prompt later); a 400
    for a field no request may have. Start-up checks the server's sampling defaults with it."""
    vocab_size = tokenizer.vocab_size
    optional = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": 0 if request.top_k == -1 else request.top_k,  # vLLM spells "off" as -1
        "min_p": request.min_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "seed": None if request.seed == -1 else request.seed,  # llama.cpp's -1: a random seed
    }
    stop_strings, stop_ids = _stops(request.stop, request.stop_token_ids or [], vocab_size)
    return _make_params(
        **{name: value for name, value in optional.items() if value is not None},
        **peer_sampling(request, tokenizer),
        logit_bias=_logit_bias(request.logit_bias or {}, tokenizer),
        stop=stop_strings,
        stop_token_ids=stop_ids,
        ignore_eos=request.ignore_eos,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
        logprobs=logprobs,
        grammar=grammar_spec(request, grammar),
    )


def _make_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:  # its message starts with the field's name: "top_p must be ..."
        message = str(exc)
        raise bad_request(message, param=message.split(" ", 1)[0]) from exc


def _logit_bias(logit_bias: dict[str, float | bool] | list[list[int | str | float | bool]],
                tokenizer: ChatTokenizer) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias}, or llama.cpp's forms: [[id, bias]], a text instead of an id
    (each of its tokens gets the bias) and false for a bias that bans the token."""
    items = logit_bias.items() if isinstance(logit_bias, dict) else logit_bias
    check_logit_bias(len(items))  # before tokenizing text keys
    if not isinstance(logit_bias, dict) and not all(_is_bias_pair(item) for item in items):
        raise bad_request("logit_bias as a list takes [token id or text, bias or false] pairs", param="logit_bias")
    pairs = []
    for key, bias in items:
        pairs.extend((token_id, _bias_value(bias)) for token_id in _bias_ids(key, tokenizer))
    check_logit_bias(len(pairs))  # a text key counts as its tokens
    return tuple(pairs)


def _is_bias_pair(item: list) -> bool:
    return (len(item) == 2 and isinstance(item[0], int | str) and not isinstance(item[0], bool | float)
            and (item[1] is False or isinstance(item[1], int | float) and not isinstance(item[1], bool)))


def _bias_ids(key: int | str, tokenizer: ChatTokenizer) -> list[int]:
    if isinstance(key, int) or _token_id_key(key) >= 0:
        token_id = int(key)
        if not 0 <= token_id < tokenizer.vocab_size:
            raise bad_request(f"logit_bias key {key!r} is not a token id below {tokenizer.vocab_size}",
                              param="logit_bias")
        return [token_id]
    if not key:
        raise bad_request("logit_bias keys must not be empty", param="logit_bias")
    return encode_text(tokenizer, key, add_special_tokens=False, param="logit_bias")


def _bias_value(bias: float | bool) -> float:
    if bias is False:
        return -math.inf  # llama.cpp: the token is never produced
    if bias is True or abs(bias) > MAX_ABS_LOGIT_BIAS:
        raise bad_request(f"logit_bias values must be in [-100, 100] or false, got {bias}", param="logit_bias")
    return float(bias)


def _token_id_key(key: str) -> int:
    """A logit_bias key as a token id; -1 when it is not a plain decimal number."""
    key = key.strip()
    # isdigit() alone lets through digits int() refuses, such as "²".
    return int(key) if key.isascii() and key.isdigit() else -1


def _stops(stop: str | list[str] | list[int] | None, stop_token_ids: list[int],
           vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Stop strings, and stop token ids: vLLM's stop_token_ids plus mistral.rs' ids in `stop`."""
    if stop and isinstance(stop, list) and isinstance(stop[0], int):
        check_stop_token_ids(stop_token_ids + list(stop), "stop")
        ids = checked_token_ids(stop_token_ids + list(stop), vocab_size, "stop")
        return (), tuple(ids)
    check_stop_token_ids(stop_token_ids, "stop_token_ids")
    return _stop_strings(stop), tuple(checked_token_ids(stop_token_ids, vocab_size, "stop_token_ids"))


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(s == "" for s in strings):
        raise bad_request("stop strings must not be empty", param="stop")
    check_stop_strings(strings)
    return strings


@dataclass(frozen=True)
class _ContextLimit:
    """max_tokens as requested, checked against the room the context leaves after a prompt."""

    max_model_len: int
    requested: int | None  # None: all the remaining context
    param: str  # "max_tokens" or "max_completion_tokens"
    prompt_param: str  # "messages" or "prompt"
    clip: bool = False  # `requested` is a default: at most the room left, never a 400

    def max_tokens_for(self, num_prompt_tokens: int) -> int:
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"request has {num_prompt_tokens} input tokens. Please reduce the length of the input.",
                param=self.prompt_param,
                code="context_length_exceeded",
            )
        if self.requested is None:
            return room
        if self.clip:
            return min(self.requested, room)
        if self.requested > room:
            raise bad_request(
                f"'{self.param}' is too large: {self.requested}. This model's maximum context length is "
                f"{self.max_model_len} tokens and your request has {num_prompt_tokens} input tokens "
                f"({self.requested} > {self.max_model_len} - {num_prompt_tokens}).",
                param=self.param,
                code="context_length_exceeded",
            )
        return self.requested


def _choice_plans(
    prompts: list[list[int]], base: SamplingParams, n: int, response_id: str, limit: _ContextLimit
) -> list[ChoicePlan]:
    """n choices per prompt; choice index = prompt_index * n + i, as OpenAI numbers them."""
    num_choices = len(prompts) * n
    max_tokens = [limit.max_tokens_for(len(prompt_ids)) for prompt_ids in prompts]
    check_sequence_tokens([count for count in max_tokens for _ in range(n)], limit.param)
    choices = []
    for prompt_index, prompt_ids in enumerate(prompts):
        params = replace(base, max_tokens=max_tokens[prompt_index])
        for i in range(n):
            index = prompt_index * n + i
            request_id = response_id if num_choices == 1 else f"{response_id}-{index}"
            choices.append(ChoicePlan(index, request_id, prompt_index, _seeded(params, index)))
    return choices


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    # Distinct seeds keep seeded choices reproducible without making them identical.
    if params.seed is None or index == 0:
        return params
    return replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)  # wrap within int64
