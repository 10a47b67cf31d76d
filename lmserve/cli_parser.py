"""`lmserve`'s command line: the parser of every command and its flags, and the logging setup
(apart from cli.py, which runs the commands, so that what builds a server from flags, such as
the Ray Serve application, can parse them without importing the commands)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lmserve.arg_types import (
    non_negative_float,
    non_negative_int,
    parse_duration,
    parse_size,
    positive_duration,
    positive_int,
    positive_size,
    shutdown_duration,
    thread_count,
)
from lmserve.config import (
    DEFAULT_DRAFT_TOKENS,
    DEFAULT_MAX_STEP_MS,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_SPECULATIVE_TOKENS,
    DTYPE_CHOICES,
    KV_CACHE_DTYPES,
)
from lmserve.fleet.download import add_pull_parser
from lmserve.llama_flags import add_llama_flags
from lmserve.llama_options import DEFAULT_MAX_NUM_SEQS, add_llama_options
from lmserve.scale.options import add_scale_options
from lmserve.server.admission import DEFAULT_QUEUE_TIMEOUT
from lmserve.server.middleware.limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BODY,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
)

DEFAULT_CHAT_URL = "http://127.0.0.1:8080"  # where `lmserve chat` and `lmserve ps` look for a server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API",
                                description="Serve models over the OpenAI API. llama-server's flags are taken too: "
                                            "those below, and some that change nothing here (logged at start-up); "
                                            "any other is refused by name.")
    serve.add_argument("model", nargs="*", help="GGUF files or Hugging Face folders, one or several (default: packaged "
                                                "SmolLM2-135M-Instruct)")
    serve.add_argument("--config", metavar="FILE", type=Path,
                       help="a TOML file of models: [models.NAME] tables with source, aliases, dtype, max_model_len, "
                            "kv_cache_memory, ttl, pinned, preload and defaults")
    serve.add_argument("--models-dir", metavar="DIR", type=Path,
                       help="every .gguf file and Hugging Face folder in DIR is a model too (read again when listed)")
    serve.add_argument("--max-loaded-models", type=positive_int,
                       help="models loaded at once; loading another unloads the least recently used idle one")
    serve.add_argument("--models-memory", type=positive_size, metavar="SIZE",
                       help="what loaded models may take together (weights + KV cache budgets), e.g. 4GiB; loading "
                            "one more first unloads the least recently used idle ones")
    serve.add_argument("--default-ttl", type=parse_duration, default=None, metavar="DURATION",
                       help="unload a model idle this long (300, 5m, 1h; default: never)")
    serve.add_argument("--no-autoload", "--no-models-autoload", action="store_true",
                       help="do not load a model when a request names it (POST /models/load does)")
    serve.add_argument("--load-timeout", type=parse_duration, default=600.0, metavar="DURATION",
                       help="how long a request waits for its model to load before a 503 (default 600 s)")
    serve.add_argument("--shutdown-timeout", type=shutdown_duration, default=DEFAULT_SHUTDOWN_TIMEOUT,
                       metavar="DURATION",
                       help="on SIGTERM or SIGINT, how long requests in flight may take to finish before they end with "
                            "an error (default 30 s); new requests are refused meanwhile, and a second signal exits "
                            "at once")
    serve.add_argument("--data-dir", metavar="DIR",
                       help="where stored responses live (a SQLite file); 'none' keeps them in memory until the server "
                            "stops (default: $XDG_DATA_HOME/lmserve, else ~/.local/share/lmserve)")
    serve.add_argument("--max-queued-requests", type=positive_int, metavar="N",
                       help="sequences (a request with n choices counts n) that may wait for a turn on a model before "
                            "new requests get 429 with Retry-After (default: 4 x what its engine runs at once, "
                            "--max-num-seqs capped by its KV blocks)")
    serve.add_argument("--queue-timeout", type=parse_duration, default=DEFAULT_QUEUE_TIMEOUT, metavar="DURATION",
                       help="a request that waits longer than this to start gets 503 with Retry-After (default "
                            f"{DEFAULT_QUEUE_TIMEOUT:g} s; -1: wait without limit)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on, or a UNIX socket path ending "
                                                          "in .sock (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--served-model-name", help="the model id clients send, with one MODEL (default: from the file name)")
    serve.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=positive_int,
                       help=f"sequences decoded at once (default {DEFAULT_MAX_NUM_SEQS})")
    serve.add_argument("--max-num-batched-tokens", "-ub", "--ubatch-size", type=positive_int, default=512,
                       help="tokens per engine step (prefill chunk budget)")
    serve.add_argument("--max-step-ms", type=non_negative_float, default=DEFAULT_MAX_STEP_MS, metavar="MS",
                       help="a step that decodes for running streams takes only the prompt tokens that keep it "
                            "within about MS milliseconds, by a fit of the steps' measured time (never less than "
                            f"twice its decodes' own time), so that a new prompt does not stall them (default "
                            f"{DEFAULT_MAX_STEP_MS:g}; 0: the token budget alone)")
    serve.add_argument("--speculative-ngram", "--spec-ngram-simple-size-m", "--spec-ngram-size-m",
                       type=non_negative_int, metavar="K",
                       help="prompt-lookup speculative decoding: up to K draft tokens per step for greedy "
                            "requests (first the text a constrained request's grammar forces); with more than "
                            "4 running, a draft token runs only where the request's "
                            f"drafts come true at least 90%% of the time (default {DEFAULT_SPECULATIVE_TOKENS}; 0: off); "
                            "with --draft-model, on the steps the draft model does not draft")
    serve.add_argument("--speculative-sampling", action="store_true",
                       help="sampled requests (temperature > 0, no seed) take drafts too (prompt lookup's or "
                            "--draft-model's); the output keeps the sampling distribution")
    serve.add_argument("--draft-model", "--spec-draft-model", "-md", "--model-draft", metavar="PATH",
                       help="speculative decoding with a draft model: a smaller (or more quantized) GGUF or Hugging "
                            "Face folder with MODEL's vocabulary proposes --draft-tokens tokens, greedily, and MODEL "
                            "keeps those its own decoding picks (at steps where that pays, measured against the "
                            "steps without it, with at most 4 running; one MODEL)")
    serve.add_argument("--draft-dtype", choices=DTYPE_CHOICES,
                       help="the draft model's dtype, as --dtype (default auto: the checkpoint's own)")
    serve.add_argument("--draft-tokens", "--spec-draft-n-max", type=positive_int, metavar="N",
                       help=f"draft tokens per step with --draft-model (default {DEFAULT_DRAFT_TOKENS})")
    serve.add_argument("--kv-cache-memory", type=parse_size, help="KV cache budget, e.g. 512MiB (default 1GiB)")
    serve.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                       help="auto (the default): keys and values in the weights' float type (bfloat16 under "
                            "int8/int4 weights); int8: int8 rows with a scale each, half of bfloat16's memory")
    serve.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    serve.add_argument("--no-prefix-caching", "--no-cache-prompt", action="store_true",
                       help="disable automatic prefix caching")
    serve.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="matmul weights and KV cache; activations stay float32 (auto: the checkpoint's own, "
                            "e.g. int4 for a Q4 GGUF; float32: exact and batch-invariant; bfloat16: faster, not "
                            "bit-exact; int8: int8 x int8 (W8A8) products; int4: 4-bit weights x int8 (W4A8) "
                            "products, the smallest)")
    serve.add_argument("--threads", "-t", type=thread_count, help="torch threads for the engine (default: torch's)")
    serve.add_argument("--api-key", action="append", default=[],
                       help="require this key (repeatable; comma-separated keys, as llama-server splits them)")
    serve.add_argument("--api-key-file", metavar="PATH", help="require the keys in this file: one per line, '#' comments")
    serve.add_argument("--allowed-origins", "--cors-origins", action="append", default=[], metavar="ORIGINS",
                       help="CORS: browser origins allowed to call the API (repeatable or comma-separated; '*' for any)")
    serve.add_argument("--allowed-hosts", action="append", default=[], metavar="HOSTS",
                       help="Host header names served besides IP addresses and localhost, against DNS rebinding "
                            "(repeatable or comma-separated; NAME for any port, NAME:PORT for one; '*' for any; "
                            "default on 0.0.0.0: this machine's names)")
    serve.add_argument("--max-request-body", type=positive_size, default=DEFAULT_MAX_REQUEST_BODY,
                       help="largest request body, e.g. 16MiB (default); larger bodies answer 413")
    serve.add_argument("--read-timeout", type=positive_duration, default=DEFAULT_READ_TIMEOUT, metavar="DURATION",
                       help="how long a client may take to send a request's head, and its body (plus a second per "
                            "16 KiB received); slower ones answer 408 (default 30 s)")
    serve.add_argument("--write-timeout", type=positive_duration, default=DEFAULT_WRITE_TIMEOUT, metavar="DURATION",
                       help="how long a client may leave a response unread once the socket's buffers are full "
                            "before its connection is dropped and its request ended (default 10 min)")
    serve.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS,
                       help=f"open connections at once; past it a new one answers 503 (default {DEFAULT_MAX_CONNECTIONS})")
    embedding = serve.add_mutually_exclusive_group()
    embedding.add_argument("--embedding-model", metavar="PATH",
                           help="HF folder of a BERT-family embedding model to serve too (default: packaged all-MiniLM-L6-v2)")
    embedding.add_argument("--no-embedding-model", action="store_true", help="serve no embedding model")
    serve.add_argument("--embedding-model-name", help="the embedding model's id (default: from the folder name)")
    serve.add_argument("--chat-embedding-pooling", default="mean", choices=["mean", "last"],
                       help="how /v1/embeddings pools the chat model's hidden states")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_llama_options(serve)
    add_llama_flags(serve)
    add_scale_options(serve)
    add_pull_parser(commands)
    ps = commands.add_parser("ps", help="list a running server's models: status, memory, requests, time to unload")
    ps.add_argument("--url", default=DEFAULT_CHAT_URL, help=f"the server (default {DEFAULT_CHAT_URL})")
    ps.add_argument("--api-key", help="its API key, if it requires one")
    ps.add_argument("--all", action="store_true", help="every model it can serve, not only the loaded ones")
    ps.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    chat = commands.add_parser("chat", help="chat in the terminal with a model, streamed")
    chat.add_argument("model", nargs="?", help="a model id on the server; or a model file or folder, served for the "
                                               "chat by a server of its own (default: the server's first chat model, "
                                               "or the packaged model when no server answers)")
    chat.add_argument("--url", default=DEFAULT_CHAT_URL, help=f"the server (default {DEFAULT_CHAT_URL})")
    chat.add_argument("--api-key", help="its API key, if it requires one")
    chat.add_argument("--system", help="a system prompt to start with")
    chat.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    chat.add_argument("--max-tokens", type=positive_int, help="the longest reply (default: the rest of the context)")
    chat.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def configure_logging(level: str) -> None:
    """--log-level governs lmserve's loggers here (and uvicorn's, through uvicorn.run). Access
    lines are bare JSON objects on stdout; everything else is text on stderr."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lmserve").setLevel(level.upper())
    access = logging.getLogger("lmserve.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.propagate = False
