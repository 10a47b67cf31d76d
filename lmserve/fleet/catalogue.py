"""What a server can serve: model entries declared on the command line or found in a folder.

An entry is a name and a source, not a loaded model: the fleet (fleet.py) loads entries when they
are asked for. A `--models-dir` folder is read again each time the catalogue is listed, so a file
added or removed while the server runs shows up (or goes) without a restart.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

ModelKind = Literal["chat", "embedding"]
# Hugging Face model types served as embedding models (lmserve/model/bert.py); every other is chat.
EMBEDDING_MODEL_TYPES = frozenset({"bert"})
# Request fields that are one setting under the peers' names: a default for one of them is no
# default for a request that sets another (two that disagree in one request are a 400).
SAME_SETTING = (
    frozenset({"repeat_penalty", "repetition_penalty"}),
    frozenset({"repeat_last_n", "repetition_context_size", "repeat_penalty_num"}),  # llama.cpp's, mlx-lm's, lllms'
    frozenset({"min_tokens", "min_new_tokens"}),
    frozenset({"max_tokens", "n_predict", "max_completion_tokens"}),
)


@dataclass(frozen=True, kw_only=True)
class ModelEntry:
    id: str  # what clients send as `model`
    source: str  # a .gguf file or a Hugging Face folder
    kind: ModelKind = "chat"
    aliases: tuple[str, ...] = ()
    ttl: float | None = None  # seconds idle before it is unloaded (inf: never); None: the fleet's default
    pinned: bool = False  # loaded at start and never unloaded
    settings: dict = field(default_factory=dict, compare=False)  # engine settings: dtype, max_model_len, kv_cache_memory, draft_*
    defaults: dict = field(default_factory=dict, compare=False)  # sampling defaults a request's own values override
    preload: list[dict[str, str]] | None = field(default=None, compare=False)  # messages prefilled at load

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 1e-3, "s": 1, "": 1, "m": 60, "h": 3600}


def duration_seconds(value: str | float) -> float | None:
    """A duration as Ollama's keep_alive takes it: seconds (a number, or '300'), or '30s', '5m',
    '1h', '250ms'; a negative one (-1) means never (None). ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"not a duration: {value!r} (e.g. 300, '30s', '5m', '1h'; -1 for never)")
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (e.g. 300, '30s', '5m', '1h'; -1 for never)")
    seconds = float(match.group(1)) * _SECONDS[match.group(2) or ""]
    return None if seconds < 0 else seconds


def defaults_left_out(defaults: dict, fields_set: Iterable[str]) -> dict:
    """The defaults (request field -> value) of the settings `fields_set` leaves out under every
    one of their names: a server's repeat_penalty is no default for a request that sends
    repetition_penalty, so the two never meet and disagree."""
    taken = set(fields_set)
    for names in SAME_SETTING:
        if names & taken:
            taken |= names
    return {key: value for key, value in defaults.items() if key not in taken}


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"The model '{name}' does not exist; this server serves "
                         + ", ".join(f"'{k}'" for k in known) + ".")
        self.name, self.known = name, known


def served_name(path: Path | str) -> str:
    """A model's id from its file or folder: "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct";
    from a remote source, its last part ("hf:org/repo/x.Q4_0.gguf@v1" -> "x", "hf:org/repo" -> "repo")."""
    if isinstance(path, str):
        last = path.split("@")[0].rstrip("/").split("/")[-1].split(":")[-1]
        name = last[: -len(".gguf")] if last.lower().endswith(".gguf") else last
    else:
        name = path.name if path.is_dir() else path.stem
    return re.sub(r"[.-](Q\d\w*|F16|F32|BF16|IQ\w+)$", "", name, flags=re.IGNORECASE)


def model_kind(path: Path) -> ModelKind:
    """A GGUF is a chat model; a folder is an embedding model when its config.json names a BERT."""
    if path.is_dir() and (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return "chat"  # loading it will say what is wrong
        return "embedding" if model_type in EMBEDDING_MODEL_TYPES else "chat"
    return "chat"


def entry_for(path: Path | str, **fields) -> ModelEntry:
    """The entry for a local path, or a remote source (a string: "hf:...", "https://..."; a chat
    model unless `kind` says otherwise, since nothing of it can be read before it is downloaded)."""
    kind = fields.pop("kind", None) or (model_kind(path) if isinstance(path, Path) else "chat")
    return ModelEntry(id=fields.pop("id", None) or served_name(path), source=str(path), kind=kind, **fields)


def scan_models_dir(folder: Path) -> list[ModelEntry]:
    """Every .gguf file and every folder with a config.json directly in `folder`, by name."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if (path.is_file() and path.suffix.lower() == ".gguf") or (path.is_dir() and (path / "config.json").is_file()):
            found.append(entry_for(path))
    return found


class Catalogue:
    """Declared entries first, then those of the models folder that are not declared already (by
    name or by file). `sampling_defaults` are the server's (llama-server's --temp and the like):
    every chat model has them under its own `defaults`."""

    def __init__(self, declared: list[ModelEntry], models_dir: Path | None = None,
                 sampling_defaults: dict | None = None):
        seen: dict[str, str] = {}
        for entry in declared:
            for name in entry.names:
                if name in seen:
                    raise ValueError(f"two models are named {name!r}: {seen[name]} and {entry.source}")
                seen[name] = entry.source
        self.sampling_defaults = dict(sampling_defaults or {})
        self.declared = [self._with_server_defaults(entry) for entry in declared]
        self.models_dir = models_dir
        self._scanned: tuple[int | None, list[ModelEntry]] = (None, [])  # (folder mtime, its entries)

    def entries(self) -> list[ModelEntry]:
        if self.models_dir is None:
            return list(self.declared)
        return self.declared + self._folder_entries()

    def _folder_entries(self) -> list[ModelEntry]:
        """The models folder's entries, read again only when the folder changed (its mtime moves
        when a file is added, removed or renamed): every request resolves its model through here."""
        try:
            stamp = self.models_dir.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp is None or stamp != self._scanned[0]:
            taken = {name for entry in self.declared for name in entry.names}
            sources = {Path(entry.source).resolve() for entry in self.declared}
            found = [self._with_server_defaults(e) for e in scan_models_dir(self.models_dir)
                     if e.id not in taken and Path(e.source).resolve() not in sources]
            self._scanned = (stamp, found)
        return list(self._scanned[1])

    def _with_server_defaults(self, entry: ModelEntry) -> ModelEntry:
        if entry.kind != "chat" or not self.sampling_defaults:
            return entry
        return replace(entry, defaults={**defaults_left_out(self.sampling_defaults, entry.defaults), **entry.defaults})

    def resolve(self, name: str | None, kind: ModelKind = "chat") -> ModelEntry:
        """The entry `name` names (its id or an alias). None, or a name no entry has when the
        catalogue holds exactly one model of `kind`, means that one (clients written for OpenAI
        send "gpt-4o-mini"); otherwise UnknownModel listing the known ids."""
        entries = self.entries()
        for entry in entries:
            if name in entry.names:
                return entry
        of_kind = [e for e in entries if e.kind == kind]
        if len(of_kind) == 1:
            return of_kind[0]
        raise UnknownModel(name or "", [e.id for e in entries])
