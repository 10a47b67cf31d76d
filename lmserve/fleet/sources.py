"""Where a model to download lives: the sources `lmserve pull` and the fleet take (hf:org/repo,
hf:org/repo/file.gguf, @revision, https://.../file.gguf), parsed into a RemoteSource, and what
the download halves (hub_download.py, url_download.py) share: the files a folder needs, the
progress callback, the error they raise. download.py picks the half for a source.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

Progress = Callable[[int, int], None]

# What lmserve reads from a Hugging Face folder (weights/load.py, text/tokenizer.py, embeddings/pooling.py);
# the rest of a repo (other formats, ONNX, images, the README) is not downloaded.
MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    # sentence-transformers: the module list, the max length, the pooling module's config
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "*Pooling/config.json",
)
# Only top-level weights: lmserve loads folder/*.safetensors, and some repos keep other checkpoints in subfolders.
NOT_MODEL_FILES = ("*/*.safetensors",)
# A folder lmserve can load has these, and at least one *.safetensors.
REQUIRED_FOLDER_FILES = ("config.json", "tokenizer.json")
GGUF_MAGIC = b"GGUF"

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# An org or repo name as the Hub accepts it: word characters, '.', '-'; no '--' or '..'; at most 96.
_HUB_NAME = re.compile(r"^(?!.*(?:--|\.\.))\w(?:[\w.-]{0,94}\w)?$", re.ASCII)


class DownloadError(ValueError):
    """A source that cannot be downloaded; the message names the source and says why."""


@dataclass(frozen=True)
class RemoteSource:
    """A parsed source: a Hugging Face repo (a folder, or one file of it), or a URL."""

    text: str  # as written
    repo_id: str | None = None
    filename: str | None = None  # the GGUF's path in the repo, or the URL's file name
    revision: str | None = None  # None: the repo's default branch
    url: str | None = None

    @property
    def is_url(self) -> bool:
        return self.url is not None

    @property
    def is_folder(self) -> bool:
        return self.url is None and self.filename is None

    def __str__(self) -> str:
        return self.text


# --- sources ---------------------------------------------------------------------------------------------------


def is_remote(source: str) -> bool:
    """Whether `source` is to be downloaded (hf:... or https://...) rather than a local path."""
    return source.startswith(("hf:", "https://"))


def parse_source(source: str, *, allow_loopback_http: bool = False) -> RemoteSource:
    """hf:org/repo[/file.gguf][@rev] or https://.../file.gguf -> RemoteSource; DownloadError if malformed.

    `allow_loopback_http` is for tests only: it lets http:// through when the host is this machine."""
    if source.startswith("hf:"):
        return _parse_hub_source(source)
    if source.startswith("https://") or (allow_loopback_http and source.startswith("http://")):
        return _parse_url_source(source)
    if source.startswith("http://"):
        raise DownloadError(f"{source}: plain http:// is refused, nothing would vouch for the bytes: use https://")
    raise DownloadError(f"{source!r} is not a remote source: expected hf:org/repo, hf:org/repo/file.gguf "
                        "or an https:// URL of a .gguf file")


def _parse_hub_source(source: str) -> RemoteSource:
    body, at, revision = source.removeprefix("hf:").partition("@")
    if at and not revision:
        raise DownloadError(f"{source}: nothing after '@' (expected a branch, tag or commit)")
    if revision.lower().endswith(".gguf"):
        raise DownloadError(f"{source}: the revision goes last, after the file: hf:org/repo/file.gguf@revision")
    parts = body.split("/")
    if len(parts) < 2 or not all(parts):
        raise DownloadError(f"{source}: expected hf:org/repo (a safetensors folder) or hf:org/repo/file.gguf")
    for name in parts[:2]:
        if not _HUB_NAME.match(name):
            raise DownloadError(f"{source}: {name!r} is not a valid Hugging Face org or repo name")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if filename is not None:
        if any(part in (".", "..") for part in parts[2:]):
            raise DownloadError(f"{source}: the file path may not contain '.' or '..'")
        if not filename.lower().endswith(".gguf"):
            raise DownloadError(f"{source}: a file source must be a .gguf; for a safetensors model name the repo "
                                f"alone: hf:{repo_id}")
    return RemoteSource(source, repo_id=repo_id, filename=filename, revision=revision or None)


def _parse_url_source(source: str) -> RemoteSource:
    try:
        parts = urlsplit(source)
        host = parts.hostname
    except ValueError as exc:
        raise DownloadError(f"{source}: not a valid URL ({exc})") from None
    if not host:
        raise DownloadError(f"{source}: the URL has no host")
    if parts.scheme == "http" and host not in _LOOPBACK_HOSTS:
        raise DownloadError(f"{source}: plain http:// is only allowed to this machine (for tests): use https://")
    name = unquote(PurePosixPath(parts.path).name)
    if not name.lower().endswith(".gguf"):
        raise DownloadError(f"{source}: an https:// source must be the URL of a .gguf file")
    if name.startswith(".") or any(c in name for c in "/\\\0"):
        raise DownloadError(f"{source}: {name!r} cannot be used as a file name")
    return RemoteSource(source, filename=name, url=source)


def _reason(exc: BaseException) -> str:
    # A library's messages run over several lines of advice; the first says what happened.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
