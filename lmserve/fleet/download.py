"""Models that are not on this machine yet: Hugging Face repos and https:// GGUF URLs, downloaded into a cache.

A source names where a model lives rather than a local path:

    hf:org/repo                   a safetensors folder: only the files lmserve reads (MODEL_FILES), not the whole repo
    hf:org/repo/file.gguf         one GGUF file of a repo (the path may have folders: hf:org/repo/q4/file.gguf)
    hf:org/repo@rev               ... at a branch, tag or commit, always last: hf:org/repo/file.gguf@v1.0
    https://host/path/file.gguf   a GGUF anywhere else

`download(source, progress)` returns the local path (the .gguf, or the snapshot folder), calling
progress(done_bytes, total_bytes) as bytes arrive (total 0 while unknown), so `lmserve pull` can draw a
bar and the server can show a loading model's progress. A second call finds the cached copy.

Hugging Face sources go through huggingface_hub (hf_hub_download, snapshot_download) into its cache, so
a model pulled by any Hugging Face tool is reused, and HF_ENDPOINT (read at each call here, not only when
huggingface_hub is imported), HF_TOKEN (or the saved login) and HF_HUB_CACHE are respected. What the
library does and does not do, in huggingface_hub 2.4.0, and what this module adds:
- Resuming: the library resumes a transfer cut mid-way within the same call (a Range request, up to 5
  times), but it keeps no partial file between calls: a download killed part-way starts over next time.
- Integrity: the library checks a file's size only. Each newly downloaded file is checked here against
  the repo listing: the sha256 of LFS files (weights), the git blob sha1 of small files (JSON). A
  mismatching copy is deleted, so the cache never holds it as if it were complete.
- Offline: when the Hub cannot be reached (or HF_HUB_OFFLINE is set), a copy already cached is used.
- The repo listing is read first, so a missing repo, revision or file is named before any download,
  and the progress total is known from the start.
Xet storage (hf_xet) is used when installed and the Hub offers it; its progress bars feed the same counter.

URL sources are streamed with httpx into <cache>/<hash of the URL>/<file>.part and renamed when complete.
An interrupted download (a cut connection, Ctrl-C, a crash) resumes from the .part with a Range request;
If-Range makes the server send the whole file instead if it changed since. With no checksum to compare,
a finished URL download is checked against the length the server announced and the GGUF magic, and a
file that fails is deleted. Plain http:// is refused (nothing would vouch for the bytes), except, for
tests, on loopback with `allow_loopback_http=True`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import httpx
    from huggingface_hub.hf_api import RepoSibling
    from tqdm import tqdm

log = logging.getLogger("lmserve.download")

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
_HASH_CHUNK = 1 << 20
# URL downloads: attempts in a row without a new byte before giving up, and the pause between them.
_URL_ATTEMPTS = 5
_URL_RETRY_DELAY = 1.0
_URL_TIMEOUT = 60.0  # seconds without a byte before an attempt fails


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


# --- download --------------------------------------------------------------------------------------------------


def download(source: str, progress: Progress | None = None, *, endpoint: str | None = None,
             token: str | None = None, cache_dir: str | None = None, allow_loopback_http: bool = False) -> Path:
    """Download `source` (unless cached) and return its local path: the .gguf file, or the folder of a repo.

    progress(done, total) is called as bytes arrive (from worker threads, for a folder), and once more at
    the end with done == total. endpoint: the Hub (default $HF_ENDPOINT, else https://huggingface.co);
    token: for private or gated repos (default $HF_TOKEN or the saved login), never sent to URL sources;
    cache_dir: the Hugging Face cache to use (default huggingface_hub's); URL downloads then go to its
    lmserve-downloads folder (default ~/.cache/lmserve/downloads). allow_loopback_http: tests only.
    Raises DownloadError with the reason.
    """
    remote = parse_source(source, allow_loopback_http=allow_loopback_http)
    report = progress or _no_progress
    if remote.url is not None:
        return _download_url(remote, report, _url_cache_dir(cache_dir))
    return _download_hub(remote, report, endpoint=_hub_endpoint(endpoint), token=token, cache_dir=cache_dir)


def _no_progress(done: int, total: int) -> None:
    pass


def _hub_endpoint(endpoint: str | None) -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it here too lets a later setting count.
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# --- Hugging Face sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Listing:
    commit: str
    files: dict[str, RepoSibling]  # by path in the repo


def _download_hub(remote: RemoteSource, report: Progress, *, endpoint: str, token: str | None,
                  cache_dir: str | None) -> Path:
    with _hub_errors(remote, endpoint):
        try:
            listing = _list_repo(remote.repo_id, remote.revision, endpoint=endpoint, token=token)
        except Exception as exc:
            if not _hub_unreachable(exc):
                raise
            return _cached_copy(remote, report, endpoint=endpoint, cache_dir=cache_dir, reason=exc)
        wanted = _wanted_files(remote, listing)
        cached = {name for name in wanted if _is_cached(remote.repo_id, name, listing.commit, cache_dir)}
        counter = _ByteCounter(report, total=_total_size(listing, wanted),
                               done=_total_size(listing, cached))
        path = _fetch_hub(remote, endpoint=endpoint, token=token, cache_dir=cache_dir,
                          bar_class=_counting_bar_class(counter))
        snapshot = _snapshot_folder(path, remote.filename)
        if snapshot.name != listing.commit:  # the branch moved on between the listing and the download
            listing = _list_repo(remote.repo_id, snapshot.name, endpoint=endpoint, token=token)
            cached = set()
        _verify(remote, snapshot, [listing.files[name] for name in wanted if name in listing.files],
                fresh=set(wanted) - cached)
    if remote.filename is not None:
        _check_gguf_magic(remote, path)
    counter.finish()
    return path


def _list_repo(repo_id: str, revision: str | None, *, endpoint: str, token: str | None) -> _Listing:
    """The repo's commit and files with their sizes and hashes (the Hub's model info with blobs)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token=token, library_name="lmserve").model_info(
        repo_id, revision=revision, files_metadata=True)
    return _Listing(info.sha, {sibling.rfilename: sibling for sibling in info.siblings or []})


def _wanted_files(remote: RemoteSource, listing: _Listing) -> list[str]:
    """The files to download, or a DownloadError saying what the repo lacks."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(listing.files)
    ggufs = [name for name in names if name.lower().endswith(".gguf")]
    if remote.filename is not None:
        if remote.filename not in listing.files:
            listed = f"its GGUF files: {', '.join(ggufs[:20])}" if ggufs else "it has no GGUF files"
            raise DownloadError(f"{remote}: repo {remote.repo_id} has no file {remote.filename!r} ({listed})")
        return [remote.filename]
    wanted = list(filter_repo_objects(names, allow_patterns=list(MODEL_FILES), ignore_patterns=list(NOT_MODEL_FILES)))
    missing = [name for name in REQUIRED_FOLDER_FILES if name not in wanted]
    if not any(name.endswith(".safetensors") for name in wanted):
        missing.append("*.safetensors")
    if missing:
        hint = f"; to download one of its GGUF files, name it: hf:{remote.repo_id}/{ggufs[0]}" if ggufs else ""
        raise DownloadError(f"{remote}: repo {remote.repo_id} is not a safetensors model folder lmserve can load: "
                            f"it has no {', '.join(missing)}{hint}")
    return wanted


def _total_size(listing: _Listing, names: Sequence[str] | set[str]) -> int:
    return sum(listing.files[name].size or 0 for name in names)


def _is_cached(repo_id: str, filename: str, commit: str, cache_dir: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=commit), str)


def _fetch_hub(remote: RemoteSource, *, endpoint: str, token: str | None, cache_dir: str | None,
               bar_class: type) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    # The revision as given (not the listed commit): the library then records branch -> commit in the
    # cache, which is how an offline run finds the copy again.
    common: dict[str, Any] = dict(revision=remote.revision, endpoint=endpoint, token=token, cache_dir=cache_dir,
                                  tqdm_class=bar_class, library_name="lmserve")
    if remote.filename is not None:
        return Path(hf_hub_download(remote.repo_id, remote.filename, **common))
    return Path(snapshot_download(remote.repo_id, allow_patterns=list(MODEL_FILES),
                                  ignore_patterns=list(NOT_MODEL_FILES), **common))


def _snapshot_folder(path: Path, filename: str | None) -> Path:
    """<cache>/models--org--repo/snapshots/<commit> from a file's path in it (or the folder itself)."""
    for _ in filename.split("/") if filename else ():
        path = path.parent
    return path


def _cached_copy(remote: RemoteSource, report: Progress, *, endpoint: str, cache_dir: str | None,
                 reason: BaseException) -> Path:
    """The copy already in the cache, when the Hub cannot be reached (or HF_HUB_OFFLINE is set)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if remote.filename is not None:
            path = Path(hf_hub_download(remote.repo_id, remote.filename, revision=remote.revision,
                                        cache_dir=cache_dir, local_files_only=True))
        else:
            path = Path(snapshot_download(remote.repo_id, revision=remote.revision, cache_dir=cache_dir,
                                          allow_patterns=list(MODEL_FILES), ignore_patterns=list(NOT_MODEL_FILES),
                                          local_files_only=True))
            if not all((path / name).is_file() for name in REQUIRED_FOLDER_FILES):
                raise LocalEntryNotFoundError(f"{path} is not a complete model folder")
    except LocalEntryNotFoundError:
        raise DownloadError(f"{remote}: cannot reach {endpoint} ({_reason(reason)}) and it is not in the cache") \
            from None
    log.warning("%s: cannot reach %s (%s): using the cached copy", remote, endpoint, _reason(reason))
    size = _local_size(path)
    report(size, size)
    return path


def _hub_unreachable(exc: BaseException) -> bool:
    """A network failure, offline mode or a Hub outage: a cached copy will do."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, _transport_errors())


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors as huggingface_hub raises them: httpx2's since 2.0, httpx's before; offline mode."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except ImportError:
            pass
    return tuple(errors)


@contextmanager
def _hub_errors(remote: RemoteSource, endpoint: str) -> Iterator[None]:
    """huggingface_hub's exceptions -> DownloadError naming the repo, the file or the reason."""
    from huggingface_hub import errors

    repo, name = remote.repo_id, remote.filename
    try:
        yield
    except DownloadError:
        raise
    except errors.GatedRepoError:
        raise DownloadError(f"{remote}: {repo} is gated: accept its conditions on its page on the Hub, then set "
                            "HF_TOKEN (or pass --token)") from None
    except errors.RepositoryNotFoundError:
        raise DownloadError(f"{remote}: no repo {repo} on {endpoint} (if it is private, set HF_TOKEN or pass "
                            "--token)") from None
    except errors.RevisionNotFoundError:
        raise DownloadError(f"{remote}: repo {repo} has no revision {remote.revision!r}") from None
    except errors.RemoteEntryNotFoundError:
        raise DownloadError(f"{remote}: repo {repo} has no file {name!r}" if name else
                            f"{remote}: a file of repo {repo} disappeared during the download") from None
    except errors.LocalEntryNotFoundError as exc:
        raise DownloadError(f"{remote}: cannot reach {endpoint} and it is not in the cache ({_reason(exc)})") \
            from None
    except errors.HfHubHTTPError as exc:
        raise DownloadError(f"{remote}: {endpoint} answered HTTP {exc.response.status_code}: {_reason(exc)}") \
            from None
    except _transport_errors() as exc:
        raise DownloadError(f"{remote}: network error talking to {endpoint}: {_reason(exc)}") from None
    except OSError as exc:  # the library's size check ("Consistency check failed"), a full disk
        raise DownloadError(f"{remote}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    # The library's messages run over several lines of advice; the first says what happened.
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- integrity -------------------------------------------------------------------------------------------------


def _verify(remote: RemoteSource, snapshot: Path, files: list[RepoSibling], *, fresh: set[str]) -> None:
    """Every file has the listed size; the newly downloaded ones the listed hash too. A bad copy is deleted."""
    for sibling in files:
        local = snapshot / sibling.rfilename
        problem = _mismatch(local, sibling, check_hash=sibling.rfilename in fresh)
        if problem is not None:
            _discard(local)
            raise DownloadError(f"{remote}: {sibling.rfilename} from repo {remote.repo_id} is corrupted ({problem}); "
                                "the bad copy was deleted: run again to download it again")


def _mismatch(path: Path, sibling: RepoSibling, *, check_hash: bool) -> str | None:
    size = path.stat().st_size
    if sibling.size is not None and size != sibling.size:
        return f"{size} bytes where the Hub lists {sibling.size}"
    if not check_hash:
        return None  # cached earlier, and checked then: rehashing gigabytes at every load would be slow
    if sibling.lfs is not None:
        expected, actual, kind = sibling.lfs.sha256, _file_digest(path, hashlib.sha256()), "sha256"
    elif sibling.blob_id:
        # A small file's id is its git blob sha1: sha1("blob <size>\0" + content).
        expected, actual, kind = sibling.blob_id, _file_digest(path, hashlib.sha1(b"blob %d\0" % size)), "git sha1"
    else:
        return None
    return None if actual == expected.lower() else f"{kind} {actual} where the Hub lists {expected}"


def _file_digest(path: Path, digest: Any) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _discard(pointer: Path) -> None:
    """Delete a cached file: the snapshot's link and the blob it points to."""
    blob = pointer.resolve()
    pointer.unlink(missing_ok=True)
    if blob != pointer:
        blob.unlink(missing_ok=True)


def _check_gguf_magic(remote: RemoteSource, path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise DownloadError(f"{remote}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r})")


def _local_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- progress from huggingface_hub's progress bars -------------------------------------------------------------


class _ByteCounter:
    """Bytes downloaded so far, fed by the progress bars huggingface_hub opens, reported as progress(done, total).

    snapshot_download feeds the same bytes to two bars (received and written) and hf_xet reports both
    too, so the largest count is the progress, never the sum. `done` starts at the bytes already cached.
    """

    def __init__(self, report: Progress, *, total: int, done: int = 0) -> None:
        self._report, self._total, self._base = report, total, done
        self._counts: list[int] = []
        self._last: int | None = None
        self._lock = threading.Lock()  # bars are updated from snapshot_download's worker threads

    def new_bar(self) -> int:
        with self._lock:
            self._counts.append(0)
            return len(self._counts) - 1

    def add(self, bar: int, n: int) -> None:
        with self._lock:
            self._counts[bar] += n
            self._emit(self._base + max(self._counts))

    def finish(self) -> None:
        with self._lock:
            self._emit(self._total or (self._last or 0))

    def _emit(self, done: int) -> None:
        if self._total:
            done = min(done, self._total)  # xet's transfer count may run ahead of the file's size
        if done != self._last:
            self._last = done
            self._report(done, self._total)


def _counting_bar_class(counter: _ByteCounter) -> type[tqdm]:
    """A tqdm class for huggingface_hub's tqdm_class parameter: it draws nothing and counts the bytes."""
    from tqdm import tqdm

    class CountingBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Byte bars only: snapshot_download also counts files done with one.
            self._slot = counter.new_bar() if kwargs.get("unit") == "B" else None
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._slot is not None and n:
                counter.add(self._slot, int(n))
            return super().update(n)

    return CountingBar


# --- URL sources -----------------------------------------------------------------------------------------------


def _url_cache_dir(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "lmserve-downloads"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmserve" / "downloads"


def _download_url(remote: RemoteSource, report: Progress, root: Path) -> Path:
    # One folder per URL (without its query: signed URLs change it), so equal file names do not collide.
    parts = urlsplit(remote.url)
    folder = root / hashlib.sha256(f"{parts.scheme}://{parts.netloc}{parts.path}".encode()).hexdigest()[:16]
    final = folder / remote.filename
    if final.is_file():
        size = final.stat().st_size
        report(size, size)
        return final
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{remote.filename}.part"
    total = _fetch_url_resuming(remote, part, report)
    _check_url_file(remote, part, total)
    part.replace(final)
    _validator_file(part).unlink(missing_ok=True)
    return final


def _fetch_url_resuming(remote: RemoteSource, part: Path, report: Progress) -> int:
    """Download into `part`, resuming after a cut; returns the length the server announced (0 if none)."""
    import httpx

    failures = 0
    while True:
        before = _size(part)
        try:
            return _fetch_url_once(remote, part, report)
        except httpx.ConnectError as exc:  # nobody there: trying again at once will not help
            raise DownloadError(f"{remote}: cannot connect: {_reason(exc)}") from None
        except httpx.TransportError as exc:
            failures = 0 if _size(part) > before else failures + 1
            if failures >= _URL_ATTEMPTS:
                raise DownloadError(f"{remote}: download failed: {_reason(exc)} ({_size(part)} bytes kept in {part}: "
                                    "run again to resume)") from None
            log.warning("%s: %s; trying again from byte %d", remote, _reason(exc), _size(part))
            time.sleep(_URL_RETRY_DELAY)


def _fetch_url_once(remote: RemoteSource, part: Path, report: Progress) -> int:
    import httpx

    offset = _size(part)
    headers = {"Accept-Encoding": "identity"}  # lengths and ranges in bytes of the file itself
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator := _read_validator(part):
            headers["If-Range"] = validator
    with httpx.stream("GET", remote.url, headers=headers, follow_redirects=True,
                      timeout=httpx.Timeout(_URL_TIMEOUT, connect=15.0)) as response:
        stale = offset and (response.status_code == 416
                            or (response.status_code == 206 and _range_start(response) != offset))
        if not stale:
            _raise_for_url_status(remote, response)
            return _write_body(response, part, report, resumed=response.status_code == 206)
    # The .part is not a prefix of what the server has now (it is longer, or the server disagrees): start over.
    _forget(part)
    return _fetch_url_once(remote, part, report)


def _raise_for_url_status(remote: RemoteSource, response: httpx.Response) -> None:
    if response.status_code == 404:
        raise DownloadError(f"{remote}: not found (HTTP 404)")
    if response.status_code >= 400:
        raise DownloadError(f"{remote}: the server answered HTTP {response.status_code}")


def _write_body(response: httpx.Response, part: Path, report: Progress, *, resumed: bool) -> int:
    done = _size(part) if resumed else 0
    total = _announced_length(response, done)
    _write_validator(part, response)
    report(done, total)
    with open(part, "ab" if resumed else "wb") as out:
        for chunk in response.iter_bytes():
            out.write(chunk)
            done += len(chunk)
            report(done, total)
    return total


def _announced_length(response: httpx.Response, offset: int) -> int:
    """The whole file's length: from Content-Range for a 206, else Content-Length (+ offset); 0 if unknown."""
    if response.status_code == 206:
        _, _, total = response.headers.get("Content-Range", "").rpartition("/")
        return int(total) if total.isdigit() else 0
    length = response.headers.get("Content-Length", "")
    return int(length) + offset if length.isdigit() else 0


def _range_start(response: httpx.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match[1]) if match else None


def _check_url_file(remote: RemoteSource, part: Path, total: int) -> None:
    """The finished .part has the announced length and is a GGUF; if not it is deleted, never kept as complete."""
    size = _size(part)
    if total and size != total:
        _forget(part)
        raise DownloadError(f"{remote}: got {size} bytes where the server announced {total}; the partial file "
                            "was deleted: run again")
    with open(part, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        _forget(part)
        raise DownloadError(f"{remote}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); "
                            "nothing was kept")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _forget(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


# The server's ETag (strong only) or Last-Modified for the .part, sent back as If-Range when resuming.
def _validator_file(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _write_validator(part: Path, response: httpx.Response) -> None:
    etag = response.headers.get("ETag")
    validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
    _validator_file(part).write_text(json.dumps({"validator": validator}))


def _read_validator(part: Path) -> str | None:
    try:
        return json.loads(_validator_file(part).read_text()).get("validator")
    except (OSError, ValueError, AttributeError):
        return None


# --- `lmserve pull` --------------------------------------------------------------------------------------------


def add_pull_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `pull SOURCE` to the CLI's subcommands."""
    pull_parser = commands.add_parser(
        "pull", help="download a model into the cache ahead of serving it (like `ollama pull`)",
        description="Download hf:org/repo (a safetensors folder), hf:org/repo/file.gguf or an https:// GGUF URL "
                    "into the cache, then print its local path. An interrupted URL download resumes where it stopped.")
    pull_parser.add_argument("source", help="hf:org/repo[/file.gguf][@revision] or https://.../file.gguf")
    pull_parser.add_argument("--endpoint",
                             help="the Hugging Face Hub (default: $HF_ENDPOINT or https://huggingface.co)")
    pull_parser.add_argument("--token", help="a Hugging Face token, for private or gated repos (default: $HF_TOKEN "
                                             "or the saved login)")
    pull_parser.add_argument("--cache-dir", help="the Hugging Face cache (default: $HF_HUB_CACHE or "
                                                 "~/.cache/huggingface/hub); URL downloads go in its lmserve-downloads")
    pull_parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return pull_parser


def pull(args: argparse.Namespace) -> None:
    """`lmserve pull SOURCE`: download with a progress bar on stderr, then print the local path on stdout."""
    bar = _TerminalBar(args.source)
    try:
        path = download(args.source, bar.update, endpoint=args.endpoint, token=args.token, cache_dir=args.cache_dir)
    except DownloadError as exc:
        raise SystemExit(f"lmserve pull: {exc}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"lmserve pull: {args.source}: interrupted") from None
    finally:
        bar.close()
    print(path)


@dataclass
class _TerminalBar:
    """A tqdm bar on stderr fed by progress(done, total); drawn only when stderr is a terminal."""

    source: str
    _bar: tqdm | None = field(default=None, init=False)

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.source.rsplit("/", 1)[-1], total=total or None, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, disable=None, dynamic_ncols=True)
        if total and self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
