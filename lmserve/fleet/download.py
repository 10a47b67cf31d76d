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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmserve.fleet.hub_download import _download_hub, _hub_endpoint
from lmserve.fleet.sources import DownloadError, Progress, RemoteSource, is_remote, parse_source
from lmserve.fleet.url_download import _download_url, _url_cache_dir

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["DownloadError", "RemoteSource", "add_pull_parser", "download", "is_remote", "parse_source", "pull"]

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
