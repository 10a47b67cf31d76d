"""Hugging Face sources for download.py: the repo listed first, files fetched through
huggingface_hub's cache, each new file checked against the listing, progress counted from the
library's progress bars.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmserve.fleet.sources import (
    GGUF_MAGIC,
    MODEL_FILES,
    NOT_MODEL_FILES,
    REQUIRED_FOLDER_FILES,
    DownloadError,
    Progress,
    RemoteSource,
    _reason,
)

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoSibling
    from tqdm import tqdm

_HASH_CHUNK = 1 << 20

log = logging.getLogger("lmserve.download")


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
