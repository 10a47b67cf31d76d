"""`--config FILE`: the models a server serves, one TOML table each.

    [models.qwen]
    source = "/models/qwen2.5-0.5b-instruct-q8_0.gguf"   # a .gguf file, a Hugging Face folder, hf:..., https://...
    aliases = ["gpt-4o-mini"]          # other names requests may use
    dtype = "int8"                     # as --dtype (default: the server's)
    max_model_len = 4096               # as --max-model-len
    kv_cache_memory = "512MiB"         # as --kv-cache-memory
    ttl = "10m"                        # unload when idle this long (-1: never; default: --default-ttl)
    pinned = true                      # load at start-up, never unload
    preload = "You are a terse assistant."   # a system prompt (or a list of messages) prefilled at load
    draft_model = "/models/qwen2.5-0.5b-instruct-q4_0.gguf"   # as --draft-model (with draft_dtype, draft_tokens)

    [models.qwen.defaults]             # sampling defaults; a request's own values win
    temperature = 0.2
    max_tokens = 256

Anything the file gets wrong stops start-up with a message naming the file, the model and the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from lmserve.config import DTYPE_CHOICES
from lmserve.fleet.catalogue import ModelEntry, duration_seconds, model_kind
from lmserve.fleet.sources import is_remote

MODEL_KEYS = frozenset({"source", "aliases", "kind", "dtype", "max_model_len", "kv_cache_memory", "ttl", "pinned",
                        "preload", "defaults", "draft_model", "draft_dtype", "draft_tokens"})
# Sampling defaults a model may set, with the types TOML gives them.
DEFAULT_KEYS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "min_p": (int, float),
    "max_tokens": (int,), "presence_penalty": (int, float), "frequency_penalty": (int, float),
    "repetition_penalty": (int, float), "seed": (int,), "stop": (str, list),
}


class ConfigError(ValueError):
    pass


def read_config(path: Path, parse_size) -> list[ModelEntry]:
    """The models `path` declares, in file order. `parse_size` reads "512MiB" as the CLI does."""
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(document) - {"models"}
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {sorted(unknown)[0]!r} (models are [models.NAME] tables)")
    models = document.get("models", {})
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{path}: no models: declare each as a [models.NAME] table")
    return [_entry(path, name, table, parse_size) for name, table in models.items()]


def _entry(path: Path, name: str, table: Any, parse_size) -> ModelEntry:
    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: model {name!r}: {key!r} {why}")

    if not isinstance(table, dict):
        raise ConfigError(f"{path}: model {name!r}: must be a table ([models.{name}])")
    for key in table:
        if key not in MODEL_KEYS:
            raise fail(key, f"is not a model setting (known: {', '.join(sorted(MODEL_KEYS))})")
    source = table.get("source")
    if not isinstance(source, str) or not source:
        raise fail("source", "is required: a .gguf file or a Hugging Face folder")
    if is_remote(source):  # downloaded when first needed
        source_path = source
    else:
        source_path = (path.parent / source).expanduser() if not Path(source).is_absolute() else Path(source)
        if not source_path.exists():
            raise fail("source", f"names {str(source_path)!r}, which does not exist")
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise fail("aliases", "must be a list of names")
    kind = table.get("kind", model_kind(source_path) if isinstance(source_path, Path) else "chat")
    if kind not in ("chat", "embedding"):
        raise fail("kind", "must be 'chat' or 'embedding'")
    pinned = table.get("pinned", False)
    if not isinstance(pinned, bool):
        raise fail("pinned", "must be true or false")
    settings = _engine_settings(path, table, fail, parse_size)
    if settings and kind == "embedding":
        raise fail(next(iter(settings)), "applies to chat models only")
    return ModelEntry(id=name, source=str(source_path), kind=kind, aliases=tuple(aliases), pinned=pinned,
                      ttl=_ttl(table, fail), settings=settings, defaults=_defaults(table, fail),
                      preload=_preload(table, fail))


def _engine_settings(path: Path, table: dict, fail, parse_size) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if "dtype" in table:
        if table["dtype"] not in DTYPE_CHOICES:
            raise fail("dtype", f"must be one of {', '.join(DTYPE_CHOICES)}")
        settings["dtype"] = table["dtype"]
    if "max_model_len" in table:
        if not isinstance(table["max_model_len"], int) or isinstance(table["max_model_len"], bool) \
                or table["max_model_len"] < 1:
            raise fail("max_model_len", "must be a positive integer")
        settings["max_model_len"] = table["max_model_len"]
    if "kv_cache_memory" in table:
        try:
            settings["kv_cache_memory"] = parse_size(str(table["kv_cache_memory"]))
        except Exception as exc:  # noqa: BLE001 - the CLI's parser raises its own error type
            raise fail("kv_cache_memory", f"is not a memory size: {exc}") from None
    return settings | _draft_settings(path, table, fail)


def _draft_settings(path: Path, table: dict, fail) -> dict[str, Any]:
    if "draft_model" not in table:
        for key in ("draft_dtype", "draft_tokens"):
            if key in table:
                raise fail(key, "sets the draft model's drafts: give draft_model too")
        return {}
    draft = table["draft_model"]
    if not isinstance(draft, str) or not draft or is_remote(draft):
        raise fail("draft_model", "must name a local .gguf file or Hugging Face folder")
    draft_path = (path.parent / draft).expanduser() if not Path(draft).is_absolute() else Path(draft)
    if not draft_path.exists():
        raise fail("draft_model", f"names {str(draft_path)!r}, which does not exist")
    settings: dict[str, Any] = {"draft_model": str(draft_path), "draft_dtype": table.get("draft_dtype", "auto")}
    if settings["draft_dtype"] not in DTYPE_CHOICES:
        raise fail("draft_dtype", f"must be one of {', '.join(DTYPE_CHOICES)}")
    if "draft_tokens" in table:
        tokens = table["draft_tokens"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise fail("draft_tokens", "must be a positive integer")
        settings["draft_tokens"] = tokens
    return settings


def _ttl(table: dict, fail) -> float | None:
    if "ttl" not in table:
        return None
    try:
        seconds = duration_seconds(table["ttl"])
    except ValueError as exc:
        raise fail("ttl", str(exc)) from None
    return float("inf") if seconds is None else seconds


def _defaults(table: dict, fail) -> dict[str, Any]:
    defaults = table.get("defaults", {})
    if not isinstance(defaults, dict):
        raise fail("defaults", "must be a table of sampling settings")
    for key, value in defaults.items():
        if key not in DEFAULT_KEYS:
            raise fail(f"defaults.{key}", f"is not a sampling setting (known: {', '.join(sorted(DEFAULT_KEYS))})")
        if isinstance(value, bool) or not isinstance(value, DEFAULT_KEYS[key]):
            raise fail(f"defaults.{key}", f"has the wrong type ({type(value).__name__})")
    if defaults.get("max_tokens", 1) < 1:
        raise fail("defaults.max_tokens", "must be at least 1")
    if not -(2**63) <= defaults.get("seed", 0) < 2**63:
        raise fail("defaults.seed", "must fit in 64 bits")
    if isinstance(defaults.get("stop"), list) and not all(isinstance(s, str) for s in defaults["stop"]):
        raise fail("defaults.stop", "must be a string or a list of strings")
    # TOML writes 1 for 1.0: a float setting takes it as a float, as a request's JSON would
    normalized = {key: float(value) if float in DEFAULT_KEYS[key] and isinstance(value, int) else value
                  for key, value in defaults.items()}
    return normalized


def _preload(table: dict, fail) -> list[dict[str, str]] | None:
    preload = table.get("preload")
    if preload is None:
        return None
    if isinstance(preload, str):
        return [{"role": "system", "content": preload}]
    if isinstance(preload, list) and preload and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
            for m in preload):
        return [dict(m) for m in preload]
    raise fail("preload", "must be a system prompt or a list of {role, content} messages")
