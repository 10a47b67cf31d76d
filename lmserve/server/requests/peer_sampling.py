"""The peers' sampling fields (llama.cpp's, and the same samplers under mlx-lm's, lmdeploy's and
vLLM's names) -> SamplingParams keyword arguments.

Neutral values (typical_p 1, mirostat 0, dry_multiplier 0, ...) leave a request on the fast
path; any other value puts it on llama.cpp's sampler chain (sampling/chain.py), which then runs
llama.cpp's samplers in llama.cpp's order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmserve.request import DEFAULT_DRY_BREAKERS, DryPenalty, SamplerChain
from lmserve.server.errors import bad_request

if TYPE_CHECKING:
    from lmserve.server.protocol import SamplingFields
    from lmserve.text.tokenizer import ChatTokenizer

LLAMA_REPEAT_LAST_N = 64  # llama.cpp's default window for repeat_penalty

# llama.cpp's sampler names, their aliases and one-letter codes -> the chain's names.
_SAMPLER_NAMES = {
    "dry": "dry", "top_k": "top_k", "top_p": "top_p", "top_n_sigma": "top_n_sigma", "typ_p": "typ_p",
    "min_p": "min_p", "temperature": "temperature", "xtc": "xtc", "penalties": "penalties",
    "nucleus": "top_p", "temp": "temperature", "typ": "typ_p", "typical_p": "typ_p",
}
_SAMPLER_NAMES |= {name.replace("_", "-"): chain for name, chain in _SAMPLER_NAMES.items()}
_SAMPLER_NAMES |= {name.replace("_", ""): chain for name, chain in _SAMPLER_NAMES.items()}
_SAMPLER_LETTERS = {"d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma", "m": "min_p",
                    "t": "temperature", "x": "xtc", "e": "penalties"}
_NOT_SUPPORTED_SAMPLERS = {"infill": "infill", "adaptive_p": "adaptive-p", "adaptive-p": "adaptive-p",
                           "adaptivep": "adaptive-p", "i": "infill", "a": "adaptive-p"}


def peer_sampling(request: SamplingFields, tokenizer: ChatTokenizer) -> dict[str, Any]:
    """SamplingParams keywords for the request's peer fields; empty when it sends none."""
    params = _repetition(request)
    if request.penalize_nl is False:
        params["unpenalized_ids"] = tuple(_newline_ids(tokenizer))
    min_tokens = _one_of(request, "min_tokens", "min_new_tokens")
    if min_tokens:
        params["min_tokens"] = min_tokens
    if request.post_sampling_probs:
        params["post_sampling_probs"] = True
    if not request.cache_prompt:
        params["read_prefix_cache"] = False
    chain = _chain(request, tokenizer)
    if chain is not None:
        params["chain"] = chain
    return params


def _one_of(request: SamplingFields, *names: str) -> Any:
    """The value of whichever of `names` (synonyms) the request sets; a 400 if two disagree."""
    values = {name: getattr(request, name) for name in names if getattr(request, name) is not None}
    if len(set(map(repr, values.values()))) > 1:
        raise bad_request(f"{' and '.join(values)} are the same setting and disagree: {values}", param=names[-1])
    return next(iter(values.values()), None)


# ---------------------------------------------------------------- repetition penalty


def _repetition(request: SamplingFields) -> dict[str, Any]:
    """repetition_penalty and its window. llama.cpp's repeat_penalty looks at the last
    repeat_last_n tokens (64 by default, 0 turns it off, -1 is the whole context); vLLM's
    repetition_penalty at the whole context unless a window is given (repeat_last_n, or
    mlx-lm's repetition_context_size)."""
    penalty = _one_of(request, "repeat_penalty", "repetition_penalty")
    if penalty is None or penalty == 1.0:
        return {}
    window = _one_of(request, "repeat_last_n", "repetition_context_size", "repeat_penalty_num")
    if window is None and request.repeat_penalty is not None:
        window = LLAMA_REPEAT_LAST_N
    if window == 0:
        return {}  # llama.cpp: 0 disables the penalty
    return {"repetition_penalty": penalty, "repetition_window": 0 if window in (None, -1) else window}


def _newline_ids(tokenizer: ChatTokenizer) -> list[int]:
    """The token a lone newline is written with (llama.cpp's penalize_nl: false spares it)."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise bad_request("penalize_nl: false needs a model with a newline token", param="penalize_nl")
    return ids


# ---------------------------------------------------------------- llama.cpp's sampler chain


def _chain(request: SamplingFields, tokenizer: ChatTokenizer) -> SamplerChain | None:
    settings = _chain_settings(request)
    dry = _dry(request, tokenizer)
    if dry is not None:
        settings["dry"] = dry
    if request.samplers is not None:
        settings["order"] = _order(request.samplers, request)
    if not settings:
        return None
    try:
        return SamplerChain(**settings)
    except ValueError as exc:  # its message starts with the field's name
        raise bad_request(str(exc), param=str(exc).split(" ", 1)[0]) from exc


def _chain_settings(request: SamplingFields) -> dict[str, Any]:
    """The chain fields the request sets to something other than their neutral value."""
    neutral = {"typical_p": 1.0, "min_keep": 0, "xtc_probability": 0.0, "dynatemp_range": 0.0, "mirostat": 0}
    settings = {name: getattr(request, name) for name, off in neutral.items()
                if getattr(request, name) is not None and getattr(request, name) != off}
    if request.top_n_sigma is not None and request.top_n_sigma > 0:
        settings["top_n_sigma"] = request.top_n_sigma
    if "xtc_probability" in settings and request.xtc_threshold is not None:
        settings["xtc_threshold"] = request.xtc_threshold
    if "dynatemp_range" in settings and request.dynatemp_exponent is not None:
        settings["dynatemp_exponent"] = request.dynatemp_exponent
    if "mirostat" in settings:
        settings |= {name: getattr(request, name) for name in ("mirostat_tau", "mirostat_eta")
                     if getattr(request, name) is not None}
    return settings


def _dry(request: SamplingFields, tokenizer: ChatTokenizer) -> DryPenalty | None:
    if not request.dry_multiplier or request.dry_penalty_last_n == 0:
        return None  # llama.cpp: a multiplier or window of 0 turns DRY off
    breakers = DEFAULT_DRY_BREAKERS if request.dry_sequence_breakers is None else request.dry_sequence_breakers
    settings = {
        "multiplier": request.dry_multiplier,
        "breaker_ids": tuple(tuple(tokenizer.encode(b, add_special_tokens=False)) for b in breakers if b),
    }
    if request.dry_base is not None:
        settings["base"] = request.dry_base
    if request.dry_allowed_length is not None:
        settings["allowed_length"] = request.dry_allowed_length
    if request.dry_penalty_last_n is not None:
        settings["window"] = 0 if request.dry_penalty_last_n == -1 else request.dry_penalty_last_n
    try:
        return DryPenalty(**settings)
    except ValueError as exc:
        raise bad_request(str(exc), param=str(exc).split(" ", 1)[0]) from exc


def defaults_for_order(defaults: dict[str, Any], request: SamplingFields) -> dict[str, Any]:
    """The defaults (request field -> value) a request gets, squared with the penalties and order it
    sets itself. llama.cpp runs the penalties only where `samplers` lists them, so a request whose
    own order leaves them out gets no default penalty; and a default order that leaves them out
    lists them first for a request that sets its own penalty (which llama-server would drop unsaid;
    a 400 would blame the client for the server's order)."""
    if request.samplers is not None:
        if "penalties" in sampler_names(request.samplers):
            return defaults
        return {field: value for field, value in defaults.items() if field not in _PENALTY_FIELDS}
    order = defaults.get("samplers")
    if order is None or not _penalised(request) or "penalties" in sampler_names(order):
        return defaults
    return defaults | {"samplers": "e" + order if isinstance(order, str) else ["penalties", *order]}


def sampler_names(samplers: list[str] | str) -> list[str]:
    """llama.cpp's `samplers` (names in any case, its aliases, or its one-letter sequence
    "edkypmxt") in llama.cpp's own names; a 400 naming one lmserve does not have."""
    if isinstance(samplers, str):
        return [_named(letter, _SAMPLER_LETTERS) for letter in samplers]
    return [_named(name.lower(), _SAMPLER_NAMES) for name in samplers]


def _order(samplers: list[str] | str, request: SamplingFields) -> tuple[str, ...]:
    names = sampler_names(samplers)
    if "penalties" in names[1:]:
        raise bad_request("samplers: 'penalties' is supported only in the first place (penalties come first)",
                          param="samplers")
    if names[:1] != ["penalties"] and _penalised(request):
        raise bad_request("samplers leaves out 'penalties' while a penalty is set (repeat_penalty, "
                          "repetition_penalty, presence_penalty or frequency_penalty); add 'penalties' first or drop "
                          "the penalty", param="samplers")
    return tuple(name for name in names if name != "penalties")


def _named(name: str, table: dict[str, str]) -> str:
    if name in _NOT_SUPPORTED_SAMPLERS:
        raise bad_request(f"samplers: the {_NOT_SUPPORTED_SAMPLERS[name]} sampler is not supported by lmserve",
                          param="samplers", code="unsupported_parameter")
    if name not in table:
        raise bad_request(f"samplers: unknown sampler {name!r}; known: {sorted(set(table))}", param="samplers")
    return table[name]


def _penalised(request: SamplingFields) -> bool:
    penalties = (request.repeat_penalty, request.repetition_penalty)
    return any(p not in (None, 1.0) for p in penalties) or bool(request.presence_penalty or request.frequency_penalty)


_PENALTY_FIELDS = ("repeat_penalty", "repetition_penalty", "presence_penalty", "frequency_penalty")
