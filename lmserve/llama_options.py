"""The llama-server options `lmserve serve` honours (llama_flags.py lists them all), and what they
set in lmserve's terms: the models, the served name, the context limits of -c and -np, the chat
template, HTTPS. The sampling options and the defaults they set are sampling_defaults.py's.

-c and -np. llama-server's -c N is the size of its KV cache in tokens. With an explicit -np S (and
no -kvu) each of its S slots gets N / S of it (llama.cpp rounds that up to a multiple of 256;
lmserve does not round); without -np (S is "auto": 4 slots sharing one unified cache) or with -kvu,
each request may use all N. lmserve's KV cache is paged and shared, so the same limits are:
a KV budget of N tokens, a context of N / S (or N) per request (--max-model-len) and S sequences
at once (--max-num-seqs). Two differences: without -c (or with -c 0) a request gets the model's
own context and the KV budget is --kv-cache-memory, where llama-server would split the model's
context across explicit -np slots; and a context beyond the model's stops start-up, where
llama-server caps each slot at the model's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from lmserve.arg_types import integer, non_negative_int, positive_duration
from lmserve.sampling_defaults import add_sampling_options

DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_KV_CACHE_MEMORY = 1 << 30
# llama-server's -lv levels (0 generic, 1 error, 2 warning, 3 info, 4 trace, 5 debug) as --log-level's.
VERBOSITY_LEVELS = ("error", "error", "warning", "info", "debug", "debug")
POOLINGS = ("mean", "last")  # of llama-server's none, mean, cls, last, rank: what --chat-embedding-pooling does


def add_llama_options(serve: argparse.ArgumentParser) -> None:
    """The honoured llama-server options that are not another spelling of an lmserve option."""
    group = serve.add_argument_group("llama-server's options", "as llama-server takes them; any other llama-server "
                                     "flag is refused by name")
    group.add_argument("--usage", action="help", help="print this help")
    group.add_argument("--version", action="version", version=f"lmserve {importlib.metadata.version('lmserve')}",
                       help="print lmserve's version")
    _add_model_options(group)
    _add_context_options(group)
    add_sampling_options(group)
    _add_server_options(group)


def _add_model_options(group) -> None:
    group.add_argument("-m", "--model", dest="model_files", action="append", default=[], metavar="FILE",
                       help="a MODEL")
    group.add_argument("-mu", "--model-url", dest="model_urls", action="append", default=[], metavar="URL",
                       help="a MODEL: the https:// URL of a GGUF")
    group.add_argument("-hf", "-hfr", "--hf-repo", metavar="USER/MODEL",
                       help="with -hff FILE: MODEL hf:USER/MODEL/FILE")
    group.add_argument("-hff", "--hf-file", metavar="FILE", help="the GGUF file of the -hf repo")
    group.add_argument("-a", "--alias", metavar="NAMES",
                       help="comma-separated names of the MODEL: the first in sorted order is its id (as llama-server "
                            "shows it), the others aliases")


def _add_context_options(group) -> None:
    group.add_argument("-c", "--ctx-size", type=non_negative_int, metavar="N",
                       help="the KV cache size in tokens, shared by the -np slots as in llama-server: each request's "
                            "context (--max-model-len) is N / -np, or N with -kvu or without -np; 0: the model's own "
                            "context and --kv-cache-memory")
    group.add_argument("-np", "--parallel", type=_slot_count, metavar="N",
                       help="sequences decoded at once (--max-num-seqs); with -c, each request's context is -c / N; "
                            f"-1: the default ({DEFAULT_MAX_NUM_SEQS})")
    group.add_argument("-ctk", "--cache-type-k", type=_cache_type, metavar="q8_0",
                       help="with -ctv q8_0: --kv-cache-dtype int8")
    group.add_argument("-ctv", "--cache-type-v", type=_cache_type, metavar="q8_0",
                       help="with -ctk q8_0: --kv-cache-dtype int8")
    group.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_true", default=None,
                       help="with -c and -np: each request may use all of -c")
    group.add_argument("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_false", default=None,
                       help="with -c and -np: -c is split across the slots (the default)")


def _add_server_options(group) -> None:
    group.add_argument("--embedding", "--embeddings", dest="embeddings_only", action="store_true",
                       help="serve MODEL for /v1/embeddings only: no packaged embedding model beside it, and the "
                            "generation routes answer 501")
    group.add_argument("--pooling", dest="chat_embedding_pooling", type=_pooling, default=argparse.SUPPRESS,
                       metavar="{mean,last}", help="--chat-embedding-pooling")
    group.add_argument("--slots", dest="serve_slots", action="store_true", default=True,
                       help="serve GET /slots (the default)")
    group.add_argument("--no-slots", dest="serve_slots", action="store_false", help="do not serve GET /slots")
    group.add_argument("--slot-save-path", type=_folder, metavar="DIR", help="where POST /slots saves slots")
    group.add_argument("--spec-type", type=_spec_type, metavar="{none,ngram-simple,draft-simple}",
                       help="ngram-simple: prompt lookup (on by default, --speculative-ngram); draft-simple: "
                            "--draft-model's drafts (with ngram-simple too: lookup on the steps it leaves, as by "
                            "default); none: --speculative-ngram 0, without a draft model")
    group.add_argument("--chat-template", metavar="NAME|JINJA",
                       help="every chat model's template: a llama.cpp built-in name (chatml, llama3, mistral-v7, ...) "
                            "or a Jinja template")
    group.add_argument("--chat-template-file", type=Path, metavar="FILE", help="every chat model's Jinja template")
    group.add_argument("-to", "--timeout", action=_BothTimeouts, type=positive_duration, default=argparse.SUPPRESS,
                       metavar="N", help="--read-timeout and --write-timeout: N seconds")
    group.add_argument("--ssl-key-file", metavar="FILE", help="serve HTTPS with this PEM key (and --ssl-cert-file)")
    group.add_argument("--ssl-cert-file", metavar="FILE", help="serve HTTPS with this PEM certificate")
    group.add_argument("--models-max", dest="max_loaded_models", type=_models_max, default=argparse.SUPPRESS,
                       metavar="N", help="--max-loaded-models; 0: no limit")
    group.add_argument("--models-autoload", dest="no_autoload", action="store_false", default=argparse.SUPPRESS,
                       help="load a model when a request names it (the default)")
    group.add_argument("-v", "--verbose", "--log-verbose", dest="log_level", action="store_const", const="debug",
                       default=argparse.SUPPRESS, help="--log-level debug")
    group.add_argument("-lv", "--verbosity", "--log-verbosity", dest="log_level", type=_verbosity,
                       default=argparse.SUPPRESS, metavar="N", help="--log-level: 0-1 error, 2 warning, 3 info, "
                                                                    "4-5 debug")


class _BothTimeouts(argparse.Action):
    """llama-server's -to: one timeout for reading requests and writing responses."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.read_timeout = namespace.write_timeout = values


def _slot_count(text: str) -> int | None:
    """-np: a positive count, or -1 for the default (None)."""
    value = integer(text)
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or -1, not {text!r}")
    return None if value == -1 else value


def _cache_type(text: str) -> str:
    """-ctk/-ctv: q8_0, which lmserve's int8 KV rows serve; the float types follow the weights."""
    if text != "q8_0":
        raise argparse.ArgumentTypeError(f"{text!r}: lmserve's KV cache is the weights' float type, or int8 rows "
                                         "with -ctk q8_0 -ctv q8_0 (--kv-cache-dtype int8)")
    return text


def kv_cache_dtype(args: argparse.Namespace) -> str:
    """--kv-cache-dtype, or llama-server's -ctk q8_0 -ctv q8_0 (keys and values together)."""
    llama = {args.cache_type_k, args.cache_type_v} - {None}
    if not llama:
        return args.kv_cache_dtype or "auto"
    if args.cache_type_k != args.cache_type_v:
        raise ValueError("lmserve quantizes keys and values together: give -ctk q8_0 with -ctv q8_0")
    if args.kv_cache_dtype not in (None, "int8"):
        raise ValueError(f"-ctk/-ctv q8_0 asks for an int8 KV cache; --kv-cache-dtype {args.kv_cache_dtype} another")
    return "int8"


def _spec_type(text: str) -> str:
    """--spec-type's comma-separated types: "draft-simple" (a draft model, --draft-model),
    "ngram-simple" (llama.cpp's lookup decoding is lmserve's prompt lookup) or both
    ("draft-simple,ngram-simple": the draft model, and lookup on the steps it leaves) when among
    them, "none" when that is all; any other type is refused."""
    types = {name.strip() for name in text.split(",")}
    others = sorted(types - {"none", "ngram-simple", "draft-simple"})
    if others:
        raise argparse.ArgumentTypeError(f"{others[0]!r}: lmserve's speculative decoding is prompt lookup "
                                         "(ngram-simple) or a draft model (draft-simple); it has no other kinds")
    return ",".join(kind for kind in ("draft-simple", "ngram-simple") if kind in types) or "none"


def _models_max(text: str) -> int | None:
    value = non_negative_int(text)
    return value or None


def _verbosity(text: str) -> str:
    value = integer(text)
    return VERBOSITY_LEVELS[min(max(value, 0), len(VERBOSITY_LEVELS) - 1)]


def _pooling(text: str) -> str:
    if text not in POOLINGS:
        raise argparse.ArgumentTypeError(f"{text!r} is not supported: lmserve pools a chat model's hidden states by "
                                         f"{' or '.join(POOLINGS)}")
    return text


def _folder(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {text!r}")
    return Path(text)


# ---------------------------------------------------------------- what they set


@dataclass(frozen=True, kw_only=True)
class ContextLimits:
    max_model_len: int | None  # per request; None: the model's own
    max_num_seqs: int
    kv_cache_tokens: int | None  # the KV budget in tokens; None: kv_cache_memory_bytes decides
    kv_cache_memory_bytes: int


def context_limits(args: argparse.Namespace) -> ContextLimits:
    """-c, -np and -kvu, or lmserve's --max-model-len, --max-num-seqs and --kv-cache-memory (see
    the module docstring); ValueError when both spellings of one limit are given."""
    if args.ctx_size is not None and args.max_model_len is not None:
        raise ValueError("-c and --max-model-len both set the context: give one (-c N is llama-server's KV cache "
                         "size, split across the -np slots)")
    if args.ctx_size and args.kv_cache_memory is not None:
        raise ValueError("-c sizes the KV cache in tokens and --kv-cache-memory in bytes: give one")
    if args.parallel is not None and args.max_num_seqs is not None:
        raise ValueError("-np is llama-server's spelling of --max-num-seqs: give one")
    max_num_seqs = args.parallel or args.max_num_seqs or DEFAULT_MAX_NUM_SEQS
    kv_bytes = args.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
    if not args.ctx_size:  # the model's context, lmserve's budget
        return ContextLimits(max_model_len=args.max_model_len, max_num_seqs=max_num_seqs, kv_cache_tokens=None,
                             kv_cache_memory_bytes=kv_bytes)
    split = args.parallel is not None and not args.kv_unified
    per_request = args.ctx_size // args.parallel if split else args.ctx_size
    if per_request < 2:
        raise ValueError(f"-c {args.ctx_size} leaves each of the {args.parallel} slots {per_request} token(s) of "
                         "context: raise -c")
    return ContextLimits(max_model_len=per_request, max_num_seqs=max_num_seqs, kv_cache_tokens=args.ctx_size,
                         kv_cache_memory_bytes=kv_bytes)


def model_sources(args: argparse.Namespace) -> list[str]:
    """The MODELs, then -m's, -mu's and -hf/-hff's."""
    sources = [*args.model, *args.model_files]
    for url in args.model_urls:
        if not url.startswith("https://"):
            raise ValueError(f"-mu {url!r}: lmserve downloads GGUF files over https:// only")
        sources.append(url)
    if args.hf_repo is not None or args.hf_file is not None:
        if args.hf_repo is None or args.hf_file is None:
            raise ValueError("-hf REPO needs -hff FILE (lmserve does not pick a quantization from a repo), and -hff "
                             "needs -hf; or name a MODEL hf:org/repo/file.gguf")
        sources.append(f"hf:{args.hf_repo.split(':')[0]}/{args.hf_file}")
    return sources


def served_names(args: argparse.Namespace) -> tuple[str | None, tuple[str, ...]]:
    """The MODEL's id and aliases: --served-model-name's, or -a's (its first name in sorted order is
    the id, as llama-server keeps its aliases in a sorted set); (None, ()) for the file's name."""
    if args.alias is None:
        return args.served_model_name, ()
    if args.served_model_name is not None:
        raise ValueError("-a and --served-model-name both name the model: give one")
    names = sorted({name.strip() for name in args.alias.split(",") if name.strip()})
    if not names:
        raise ValueError(f"-a {args.alias!r} names nothing")
    return names[0], tuple(names[1:])


def chat_template(args: argparse.Namespace) -> str | None:
    """The Jinja source of --chat-template (a built-in name, or Jinja) or --chat-template-file,
    checked by rendering one user message; None for the models' own."""
    from lmserve.text.builtin_templates import builtin_template
    from lmserve.text.chat_template import compile_chat_template

    if args.chat_template is not None and args.chat_template_file is not None:
        raise ValueError("--chat-template and --chat-template-file both set the template: give one")
    if args.chat_template_file is not None:
        try:
            source = args.chat_template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --chat-template-file {str(args.chat_template_file)!r}: {exc}") from None
    elif args.chat_template is not None:
        jinja = "{{" in args.chat_template or "{%" in args.chat_template
        source = args.chat_template if jinja else builtin_template(args.chat_template)
    else:
        return None
    try:
        compile_chat_template(source).render(messages=[{"role": "user", "content": "test"}],
                                             add_generation_prompt=True, bos_token="", eos_token="")
    except Exception as exc:  # noqa: BLE001 - any template error: syntax, undefined, raise_exception()
        raise ValueError(f"the chat template does not render: {exc}") from None
    return source


def ssl_options(args: argparse.Namespace) -> dict[str, str]:
    """uvicorn's ssl_keyfile and ssl_certfile, or nothing for plain HTTP."""
    if args.ssl_key_file is None and args.ssl_cert_file is None:
        return {}
    if args.ssl_key_file is None or args.ssl_cert_file is None:
        raise ValueError("HTTPS needs both --ssl-key-file and --ssl-cert-file")
    for path in (args.ssl_key_file, args.ssl_cert_file):
        if not Path(path).is_file():
            raise ValueError(f"{path!r} is not a file")
    return {"ssl_keyfile": args.ssl_key_file, "ssl_certfile": args.ssl_cert_file}
