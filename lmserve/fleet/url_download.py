"""https:// sources for download.py: streamed into a .part file, resumed with Range and If-Range,
checked for length and the GGUF magic before it is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lmserve.fleet.sources import (
    GGUF_MAGIC,
    DownloadError,
    Progress,
    RemoteSource,
    _reason,
)

if TYPE_CHECKING:
    import httpx

_URL_ATTEMPTS = 5
_URL_RETRY_DELAY = 1.0
_URL_TIMEOUT = 60.0  # seconds without a byte before an attempt fails

log = logging.getLogger("lmserve.download")


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
