"""Text completion requests -> a GenerationPlan: OpenAI's /v1/completions, llama.cpp's /completion
and /infill. Prompts as text, token ids or both; fill-in-the-middle prompts (OpenAI's suffix,
llama.cpp's infill); echo.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import CompletionRequest, InfillRequest
from lmserve.server.requests.cost import check_sequences
from lmserve.server.requests.known_params import check_known_params
from lmserve.server.requests.plan.generation_plan import (
    ContextLimit,
    GenerationPlan,
    choice_plans,
    n_predict_max_tokens,
)
from lmserve.server.requests.plan.sampling_fields import base_params, check_stream_options
from lmserve.server.requests.tokens import checked_token_ids, encode_text
from lmserve.text.fim import infill_ids

if TYPE_CHECKING:
    from lmserve.sampling.grammar import GrammarCompiler, RequestCompiler
    from lmserve.text.tokenizer import ChatTokenizer


def completion_plan(
    request: CompletionRequest, response_id: str, tokenizer: ChatTokenizer, max_model_len: int,
    grammar: GrammarCompiler | RequestCompiler | None = None, *, clip_max_tokens: bool = False,
) -> GenerationPlan:
    """Tokenize the prompt(s) and build n SamplingParams per prompt (`clip_max_tokens` as for chat)."""
    _check_completion_supported(request)
    check_stream_options(request)
    check_known_params(request.model_extra or {}, _COMPLETION_ROUTES.get(type(request).__name__, "completions"))
    prompt_items = _prompt_items(request.prompt)
    check_sequences(len(prompt_items), request.n)  # before tokenizing them all
    max_prompt_tokens = max_model_len - 1  # a prompt leaves room for one token of reply
    prompts = [_prompt_ids(item, i, tokenizer, max_prompt_tokens) for i, item in enumerate(prompt_items)]
    if request.suffix:  # OpenAI's insertion: the reply goes between each prompt and the suffix
        prompts = [_fim_prompt(tokenizer, ids, request.suffix, "suffix", max_prompt_tokens) for ids in prompts]
    logprobs = request.logprobs if request.logprobs is not None else request.n_probs or None
    base = base_params(request, tokenizer, logprobs, grammar)
    max_tokens, param = (n_predict_max_tokens(request), "n_predict") if request.n_predict is not None else (
        request.max_tokens, "max_tokens")
    limit = ContextLimit(max_model_len, max_tokens, param, prompt_param="prompt", clip=clip_max_tokens)
    choices = choice_plans(prompts, base, request.n, response_id, limit)
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
