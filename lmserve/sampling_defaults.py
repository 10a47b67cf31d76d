"""llama-server's sampling options on `lmserve serve` (--temp, --top-k, --samplers, -n, ...), and
the server's sampling defaults they set: the values of the request fields a request leaves out.
Start-up checks the defaults as the request side checks a request's own fields, so a default
holds exactly when a request could send it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmserve.arg_types import integer, non_negative_int


def add_sampling_options(group) -> None:
    """The sampling options, in llama_options.py's group of llama-server's options."""
    group.add_argument("-n", "--predict", "--n-predict", dest="n_predict", type=_n_predict, metavar="N",
                       help="max_tokens of requests that send none, ending at the context's end; -1: until the "
                            "context ends")
    for option in SAMPLING_OPTIONS:
        group.add_argument(*option.spellings, dest=option.dest, type=option.parse, metavar="N",
                           help=f"{option.field} of requests that send none{option.note}")
    group.add_argument("--samplers", dest="default_samplers", type=_sampler_list, metavar="SAMPLERS",
                       help="samplers of requests that send none: llama.cpp's sampler names in order, separated by ';'")
    group.add_argument("--sampler-seq", "--sampling-seq", dest="default_samplers", metavar="SEQUENCE",
                       help="samplers of requests that send none: llama.cpp's one-letter sequence (edskypmxt)")
    group.add_argument("--dry-sequence-breaker", dest="default_dry_sequence_breakers", action="append",
                       metavar="STRING", help="one of the dry_sequence_breakers of requests that send none, in place "
                                              "of the default ones; none: no breakers")
    group.add_argument("-e", "--escape", dest="escape", action="store_true", default=True,
                       help="--dry-sequence-breaker's escapes (\\n, \\t, \\xHH, ...) are processed (the default)")
    group.add_argument("--no-escape", dest="escape", action="store_false",
                       help="--dry-sequence-breaker's values are taken as they are")
    group.add_argument("-s", "--seed", dest="default_seed", type=int, metavar="SEED",
                       help="seed of requests that send none (-1: random)")
    group.add_argument("--ignore-eos", action="store_true", help="ignore_eos of requests that send none")
    group.add_argument("-sp", "--special", action="store_true",
                       help="requests that do not say otherwise keep special tokens in their text")


def _n_predict(text: str) -> int:
    value = integer(text)
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or -1 (until the context ends), not {text!r}")
    return value


def _sampler_list(text: str) -> list[str]:
    """--samplers "top_k;top_p;temperature": the names between the semicolons."""
    return [name for name in text.split(";") if name]


@dataclass(frozen=True)
class SamplingOption:
    """One of llama-server's sampling options: the default of one request field."""

    spellings: tuple[str, ...]
    field: str  # the request field it is the default of, in llama.cpp's sense (requests.py: SamplingFields)
    parse: Callable[[str], Any] = float  # argparse's type
    note: str = ""  # appended to the help

    @property
    def dest(self) -> str:
        return f"default_{self.field}"


SAMPLING_OPTIONS = (
    SamplingOption(("--temp", "--temperature"), "temperature", note=" (<= 0: greedy)"),
    SamplingOption(("--top-k",), "top_k", integer, " (0: off)"),
    SamplingOption(("--top-p",), "top_p"),
    SamplingOption(("--min-p",), "min_p"),
    SamplingOption(("--top-nsigma", "--top-n-sigma"), "top_n_sigma", note=" (-1: off)"),
    SamplingOption(("--xtc-probability",), "xtc_probability"),
    SamplingOption(("--xtc-threshold",), "xtc_threshold"),
    SamplingOption(("--typical", "--typical-p"), "typical_p"),
    SamplingOption(("--repeat-last-n",), "repeat_last_n", non_negative_int, " (repeat_penalty's window; 0: off)"),
    SamplingOption(("--repeat-penalty",), "repeat_penalty", note=" (over the last repeat_last_n tokens: 64 unless "
                                                                  "--repeat-last-n)"),
    SamplingOption(("--presence-penalty",), "presence_penalty"),
    SamplingOption(("--frequency-penalty",), "frequency_penalty"),
    SamplingOption(("--dry-multiplier",), "dry_multiplier", note=" (0: off)"),
    SamplingOption(("--dry-base",), "dry_base"),
    SamplingOption(("--dry-allowed-length",), "dry_allowed_length", integer),
    SamplingOption(("--dry-penalty-last-n",), "dry_penalty_last_n", non_negative_int, " (0: off)"),
    SamplingOption(("--dynatemp-range",), "dynatemp_range", note=" (0: off)"),
    SamplingOption(("--dynatemp-exp",), "dynatemp_exponent"),
    SamplingOption(("--mirostat",), "mirostat", integer, " (0: off, 1: Mirostat, 2: Mirostat 2.0)"),
    SamplingOption(("--mirostat-lr",), "mirostat_eta"),
    SamplingOption(("--mirostat-ent",), "mirostat_tau"),
)


# ---------------------------------------------------------------- the defaults they set


def sampling_defaults(args: argparse.Namespace) -> dict:
    """The server's sampling defaults (request field -> value), from llama-server's sampling
    options, as llama.cpp means them; ValueError for a value a request could not have."""
    defaults = _sampler_defaults(args)
    _check_sampling_defaults(defaults)
    if args.n_predict is not None:
        defaults["max_tokens"] = None if args.n_predict == -1 else args.n_predict  # None: the rest of the context
    if args.ignore_eos:
        defaults["ignore_eos"] = True
    if args.special:
        defaults["skip_special_tokens"] = False
    return defaults


def _sampler_defaults(args: argparse.Namespace) -> dict:
    defaults = {option.field: getattr(args, option.dest) for option in SAMPLING_OPTIONS
                if getattr(args, option.dest) is not None}
    if defaults.get("temperature", 0.0) < 0:
        defaults["temperature"] = 0.0  # llama.cpp: <= 0 is greedy
    if defaults.get("top_k", 0) < 0:
        defaults["top_k"] = 0  # llama.cpp: <= 0 is off
    if args.default_seed is not None and args.default_seed != -1:
        defaults["seed"] = args.default_seed
    if args.default_samplers is not None:
        defaults["samplers"] = args.default_samplers
    if args.default_dry_sequence_breakers is not None:
        defaults["dry_sequence_breakers"] = _breakers(args.default_dry_sequence_breakers, args.escape)
    return defaults


def _breakers(values: list[str], escape: bool) -> list[str]:
    """llama-server's --dry-sequence-breaker: the first replaces the default breakers, "none"
    clears those given before it; escapes are processed unless --no-escape."""
    breakers: list[str] = []
    for value in values:
        breakers = [] if value == "none" else [*breakers, _unescape(value) if escape else value]
    return breakers


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def _unescape(text: str) -> str:
    """llama.cpp's string_process_escapes: \\n \\r \\t \\' \\" \\\\ and \\xHH; any other
    backslash stays as it is."""
    def replace(match: re.Match) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if code[0] == "x" else _ESCAPES[code]
    return re.sub(r"\\(x[0-9A-Fa-f]{2}|[nrt'\"\\])", replace, text)


# Each sampler a request can turn on, turned on: the server's settings for it must hold then too
# (a request that turns DRY on must not get a 400 for the server's --dry-base).
_SAMPLERS_ON = {"dry_multiplier": 1.0, "dry_penalty_last_n": -1, "xtc_probability": 1.0, "dynatemp_range": 1.0,
                "mirostat": 2}


def _check_sampling_defaults(defaults: dict) -> None:
    """ValueError, naming the option, unless `defaults` plan as a request's own fields would: as
    they are, and with every sampler a request can turn on turned on. They are planned by the
    request side itself (base_params), so a default holds exactly when a request could send it."""
    import pydantic

    from lmserve.server.errors import APIError
    from lmserve.server.protocol import ChatCompletionRequest
    from lmserve.server.requests.plan import base_params

    turned_on = {field: value for field, value in _SAMPLERS_ON.items() if not defaults.get(field)}
    for fields in (defaults, defaults | turned_on):
        try:
            base_params(ChatCompletionRequest(messages="test", **fields), _BytesTokenizer())
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            raise ValueError(_refusal(str(error["loc"][0]), f"{error['loc'][0]}: {error['msg']}")) from None
        except APIError as exc:
            raise ValueError(_refusal(exc.param, exc.message)) from None


def _refusal(field: str | None, message: str) -> str:
    spellings = {option.field: option.spellings for option in SAMPLING_OPTIONS}
    spellings |= {"samplers": ("--samplers", "--sampler-seq"), "dry_sequence_breakers": ("--dry-sequence-breaker",)}
    return f"{'/'.join(spellings.get(field, ('a sampling option',)))} cannot be a request's default: {message}"


class _BytesTokenizer:
    """What planning sampling fields asks of a tokenizer (DRY's breakers are tokenized), without a model."""

    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())
