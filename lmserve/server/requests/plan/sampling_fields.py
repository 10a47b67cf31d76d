"""The sampling fields every generation request shares -> SamplingParams (max_tokens aside): the
samplers' settings, logit_bias in OpenAI's and llama.cpp's forms, stop strings and stop token ids.
Start-up checks the server's sampling defaults with base_params too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lmserve.request import SamplingParams
from lmserve.server.errors import bad_request, unsupported
from lmserve.server.protocol import SamplingFields
from lmserve.server.requests.constraints import grammar_spec
from lmserve.server.requests.cost import check_logit_bias, check_stop_strings, check_stop_token_ids
from lmserve.server.requests.peer_sampling import peer_sampling
from lmserve.server.requests.tokens import checked_token_ids, encode_text

if TYPE_CHECKING:
    from lmserve.sampling.grammar import GrammarCompiler, RequestCompiler
    from lmserve.text.tokenizer import ChatTokenizer

MAX_ABS_LOGIT_BIAS = 100.0


def check_stream_options(request: SamplingFields) -> None:
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
