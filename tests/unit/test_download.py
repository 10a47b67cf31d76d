"""Model downloads (lmserve/fleet/download.py) against a Hub stand-in on 127.0.0.1: nothing reaches the internet."""

import argparse
import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import constants, try_to_load_from_cache
from safetensors.numpy import save as save_safetensors

from lmserve.fleet import url_download as url_download_module
from lmserve.fleet.download import DownloadError, add_pull_parser, download, is_remote, parse_source, pull
from tests.helpers.hub_stand_in import HubStandIn

GGUF = b"GGUF" + random.Random(0).randbytes(300_000)  # a few 64 KiB chunks: several progress calls
CHUNK = 64 * 1024


def folder_repo() -> dict[str, bytes]:
    weights = save_safetensors({"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)})
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 64}).encode(),
        "model.safetensors": weights,
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": b'{"bos_token": "<s>"}',
        "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        # not what lmserve reads: left on the Hub
        "README.md": b"# tiny",
        "onnx/model.onnx": b"onnx" * 100,
        "original/consolidated.safetensors": weights,
        "pytorch_model.bin": b"pickle" * 100,
    }


LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Looking up or connecting to anything but this machine fails the test."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL_HOSTS:
            raise AssertionError(f"a test tried to reach {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS and host not in (b"127.0.0.1", b"localhost"):
            raise AssertionError(f"a test tried to look up {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in, with huggingface_hub pointed at it and the host's Hugging Face settings kept out."""
    with HubStandIn() as stand_in:
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                     "HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
            monkeypatch.delenv(name, raising=False)
        # Read by download() at each call. (Not constants.ENDPOINT: hf_hub_url swaps in the `endpoint`
        # argument only where the URL starts with it, and its URL template was made at import.)
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        # huggingface_hub read these when it was imported: set them too.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)  # 10 MiB by default: one call for a small file
        monkeypatch.setattr(url_download_module, "_URL_RETRY_DELAY", 0.0)  # retries at once
        monkeypatch.setattr("pathlib.Path.home", lambda: tmp_path / "home")
        stand_in.add_repo("org/gguf", {"model.gguf": GGUF, "other.Q8_0.gguf": GGUF[:1000], "README.md": b"# tiny"})
        stand_in.add_repo("org/folder", folder_repo())
        yield stand_in


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hub-cache")


class Recorder:
    def __init__(self, stop_after: int | None = None):
        self.calls: list[tuple[int, int]] = []
        self.stop_after = stop_after

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if self.stop_after is not None and done >= self.stop_after:
            raise Interrupted

    @property
    def done(self) -> list[int]:
        return [done for done, _ in self.calls]


class Interrupted(Exception):
    """Stands for Ctrl-C part-way through."""


def resolve_gets(hub, name):
    return [r for r in hub.seen("GET", "/resolve/") if r.path.endswith(f"/{name}")]


# --- sources -------------------------------------------------------------------------------------------------


def test_remote_sources_are_hf_and_https():
    assert is_remote("hf:org/repo") and is_remote("hf:org/repo/x.gguf") and is_remote("https://h/x.gguf")
    assert not is_remote("/models/x.gguf") and not is_remote("models/qwen") and not is_remote("http://h/x.gguf")


def test_parse_source():
    assert parse_source("hf:org/repo").is_folder
    file = parse_source("hf:org/repo/q4/model.Q4_K_M.gguf@v1.0")
    assert (file.repo_id, file.filename, file.revision, file.is_folder) == ("org/repo", "q4/model.Q4_K_M.gguf", "v1.0",
                                                                           False)
    assert parse_source("hf:org/repo@refs/pr/1").revision == "refs/pr/1"
    url = parse_source("https://example.com/models/tiny.gguf?download=true")
    assert (url.is_url, url.filename, url.repo_id) == (True, "tiny.gguf", None)


@pytest.mark.parametrize(("source", "says"), [
    ("hf:", "expected hf:org/repo"),
    ("hf:org", "expected hf:org/repo"),
    ("hf:org/", "expected hf:org/repo"),
    ("hf:/repo", "expected hf:org/repo"),
    ("hf:org/re po", "not a valid Hugging Face"),
    ("hf:org/-repo", "not a valid Hugging Face"),
    ("hf:org/repo/config.json", "must be a .gguf"),
    ("hf:org/repo/../x.gguf", "'.' or '..'"),
    ("hf:org/repo@", "nothing after '@'"),
    ("hf:org/repo@main/x.gguf", "the revision goes last"),
    ("https://", "no host"),
    ("https://example.com/", "URL of a .gguf"),
    ("https://example.com/model.bin", "URL of a .gguf"),
    ("https://example.com/a%2F..%2Fb.gguf", "cannot be used as a file name"),
    ("http://example.com/x.gguf", "use https://"),
    ("/models/x.gguf", "not a remote source"),
])
def test_malformed_sources_are_refused(source, says):
    with pytest.raises(DownloadError) as error:
        parse_source(source)
    assert says in str(error.value)


def test_plain_http_only_to_loopback_and_only_when_allowed():
    assert parse_source("http://127.0.0.1:9/x.gguf", allow_loopback_http=True).is_url
    with pytest.raises(DownloadError, match="only allowed to this machine"):
        parse_source("http://example.com/x.gguf", allow_loopback_http=True)
    with pytest.raises(DownloadError, match="use https://"):
        parse_source("http://127.0.0.1:9/x.gguf")


# --- Hugging Face: one GGUF ----------------------------------------------------------------------------------


def test_a_gguf_from_a_repo_downloads_with_progress(hub, cache):
    progress = Recorder()
    path = download("hf:org/gguf/model.gguf", progress, endpoint=hub.url, cache_dir=cache)
    assert path.name == "model.gguf" and path.is_relative_to(cache) and path.read_bytes() == GGUF
    assert len(progress.calls) >= 4 and progress.done == sorted(progress.done)
    assert all(total == len(GGUF) for _, total in progress.calls)
    assert progress.calls[-1] == (len(GGUF), len(GGUF))
    assert not hub.seen(path_contains="other.Q8_0.gguf")  # only the file asked for


def test_a_cached_gguf_is_not_downloaded_again(hub, cache):
    first = download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache)
    hub.requests.clear()
    progress = Recorder()
    assert download("hf:org/gguf/model.gguf", progress, endpoint=hub.url, cache_dir=cache) == first
    assert progress.calls == [(len(GGUF), len(GGUF))]
    assert not hub.seen("GET", "/resolve/")


def test_hf_endpoint_and_revision_are_respected(hub, cache):
    commit = hub.repos["org/gguf"].commit
    path = download(f"hf:org/gguf/model.gguf@{commit}", cache_dir=cache)  # HF_ENDPOINT: the stand-in
    assert path.parent.name == commit and path.read_bytes() == GGUF
    assert hub.seen("GET", f"/api/models/org/gguf/revision/{commit}")


def test_a_cut_download_is_resumed_with_a_range_request(hub, cache):
    hub.cut_next("org/gguf", "model.gguf", after=150_000)
    progress = Recorder()
    path = download("hf:org/gguf/model.gguf", progress, endpoint=hub.url, cache_dir=cache)
    assert path.read_bytes() == GGUF
    first, second = resolve_gets(hub, "model.gguf")
    assert "range" not in first.headers
    start = int(second.headers["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start < len(GGUF)  # where the first response stopped, to the chunk
    assert progress.done == sorted(progress.done) and progress.calls[-1] == (len(GGUF), len(GGUF))


def test_an_interrupted_download_leaves_nothing_that_passes_for_complete(hub, cache):
    with pytest.raises(Interrupted):
        download("hf:org/gguf/model.gguf", Recorder(stop_after=CHUNK), endpoint=hub.url, cache_dir=cache)
    assert try_to_load_from_cache("org/gguf", "model.gguf", cache_dir=cache) is None
    assert not [p for p in (hub_cache_folder(cache, "org/gguf") / "blobs").iterdir() if p.is_file()]
    # huggingface_hub 2.4.0 keeps no partial file between calls: the next one downloads it all again
    assert download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache).read_bytes() == GGUF


def hub_cache_folder(cache, repo_id):
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


# --- Hugging Face: a folder ----------------------------------------------------------------------------------


def test_a_folder_downloads_only_the_model_files(hub, cache):
    progress = Recorder()
    folder = download("hf:org/folder", progress, endpoint=hub.url, cache_dir=cache)
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "1_Pooling/config.json"}
    served = folder_repo()
    assert all((folder / name).read_bytes() == served[name] for name in files)
    total = sum(len(served[name]) for name in files)
    assert progress.calls[-1] == (total, total) and progress.done == sorted(progress.done)
    assert {t for _, t in progress.calls} == {total}  # known from the start
    for left_out in ("README.md", "onnx/model.onnx", "original/consolidated.safetensors", "pytorch_model.bin"):
        assert not hub.seen(path_contains=f"/resolve/{hub.repos['org/folder'].commit}/{left_out}")


def test_a_repo_that_is_not_a_loadable_folder_is_refused_before_downloading(hub, cache):
    with pytest.raises(DownloadError) as error:
        download("hf:org/gguf", endpoint=hub.url, cache_dir=cache)
    message = str(error.value)
    assert "not a safetensors model folder" in message and "config.json" in message and "*.safetensors" in message
    assert "hf:org/gguf/model.gguf" in message or "hf:org/gguf/other.Q8_0.gguf" in message
    assert not hub.seen(path_contains="/resolve/")


# --- Hugging Face: errors ------------------------------------------------------------------------------------


def test_a_missing_repo_is_named(hub, cache):
    with pytest.raises(DownloadError, match=r"hf:org/nope/x\.gguf: no repo org/nope on http://127\.0\.0\.1"):
        download("hf:org/nope/x.gguf", endpoint=hub.url, cache_dir=cache)
    with pytest.raises(DownloadError, match="no repo org/nope"):
        download("hf:org/nope", endpoint=hub.url, cache_dir=cache)


def test_a_missing_file_is_named_with_the_repo_s_gguf_files(hub, cache):
    with pytest.raises(DownloadError) as error:
        download("hf:org/gguf/missing.gguf", endpoint=hub.url, cache_dir=cache)
    assert "repo org/gguf has no file 'missing.gguf'" in str(error.value)
    assert "model.gguf, other.Q8_0.gguf" in str(error.value)


def test_a_missing_revision_is_named(hub, cache):
    with pytest.raises(DownloadError, match="repo org/gguf has no revision 'v9'"):
        download("hf:org/gguf/model.gguf@v9", endpoint=hub.url, cache_dir=cache)


def test_a_private_repo_needs_the_token(hub, cache, monkeypatch):
    hub.add_repo("org/private", {"model.gguf": GGUF}, token="hf_secret")
    with pytest.raises(DownloadError, match="if it is private, set HF_TOKEN or pass --token"):
        download("hf:org/private/model.gguf", endpoint=hub.url, cache_dir=cache)
    assert download("hf:org/private/model.gguf", endpoint=hub.url, token="hf_secret", cache_dir=cache).is_file()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.requests.clear()
    assert download("hf:org/private/model.gguf", endpoint=hub.url, cache_dir=str(cache) + "-2").is_file()
    assert {r.headers.get("authorization") for r in hub.requests} == {"Bearer hf_secret"}


def test_a_file_whose_bytes_do_not_match_its_hash_is_refused_and_deleted(hub, cache):
    bad = GGUF[:1000] + bytes(b ^ 0xFF for b in GGUF[1000:2000]) + GGUF[2000:]  # same size, other bytes
    hub.corrupt("org/gguf", "model.gguf", bad)
    with pytest.raises(DownloadError) as error:
        download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache)
    assert "model.gguf from repo org/gguf is corrupted (sha256" in str(error.value)
    assert try_to_load_from_cache("org/gguf", "model.gguf", cache_dir=cache) is None
    assert not [p for p in (hub_cache_folder(cache, "org/gguf") / "blobs").iterdir() if p.is_file()]
    hub.corrupt("org/gguf", "model.gguf", None)
    assert download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache).read_bytes() == GGUF


def test_a_file_shorter_than_announced_is_refused(hub, cache):
    hub.corrupt("org/gguf", "model.gguf", GGUF[:-100])
    with pytest.raises(DownloadError, match="Consistency check failed: file should be of size 300004"):
        download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache)
    assert try_to_load_from_cache("org/gguf", "model.gguf", cache_dir=cache) is None


def test_a_corrupted_small_file_of_a_folder_is_named(hub, cache):
    config = folder_repo()["config.json"]
    hub.corrupt("org/folder", "config.json", config.replace(b"64", b"99"))
    with pytest.raises(DownloadError, match="config.json from repo org/folder is corrupted \\(git sha1"):
        download("hf:org/folder", endpoint=hub.url, cache_dir=cache)


def test_a_file_named_gguf_that_is_not_one_is_refused(hub, cache):
    hub.add_repo("org/html", {"model.gguf": b"<html>not a model</html>"})
    with pytest.raises(DownloadError, match="not a GGUF file"):
        download("hf:org/html/model.gguf", endpoint=hub.url, cache_dir=cache)


# --- Hugging Face: offline -----------------------------------------------------------------------------------


def test_the_cached_copy_serves_when_the_hub_cannot_be_reached(hub, cache, monkeypatch):
    path = download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache)
    folder = download("hf:org/folder", endpoint=hub.url, cache_dir=cache)
    hub.stop()
    assert download("hf:org/gguf/model.gguf", endpoint=hub.url, cache_dir=cache) == path
    assert download("hf:org/folder", endpoint=hub.url, cache_dir=cache) == folder
    with pytest.raises(DownloadError, match="cannot reach .* and it is not in the cache"):
        download("hf:org/gguf/other.Q8_0.gguf", endpoint=hub.url, cache_dir=cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does
    progress = Recorder()
    assert download("hf:org/gguf/model.gguf", progress, endpoint=hub.url, cache_dir=cache) == path
    assert progress.calls == [(len(GGUF), len(GGUF))]


# --- https:// URLs -------------------------------------------------------------------------------------------


def url_download(url, cache, progress=None):
    return download(url, progress, cache_dir=cache, allow_loopback_http=True)


def test_a_url_downloads_with_progress(hub, cache):
    url = hub.add_file("tiny.gguf", GGUF)
    progress = Recorder()
    path = url_download(url, cache, progress)
    assert path.name == "tiny.gguf" and path.is_relative_to(cache) and path.read_bytes() == GGUF
    assert len(progress.calls) >= 3 and progress.done == sorted(progress.done)
    assert progress.calls[-1] == (len(GGUF), len(GGUF))
    assert not list(path.parent.glob("*.part*"))
    hub.requests.clear()
    assert url_download(url, cache) == path and not hub.requests  # cached: no request at all


def test_url_downloads_default_to_the_user_cache(hub, tmp_path):
    path = download(hub.add_file("tiny.gguf", GGUF), allow_loopback_http=True)
    assert path.is_relative_to(tmp_path / "home" / ".cache" / "lmserve" / "downloads")


def test_a_url_download_is_resumed_within_the_call_after_a_cut(hub, cache):
    url = hub.add_file("tiny.gguf", GGUF)
    hub.cut_next(None, "tiny.gguf", after=100_000)
    progress = Recorder()
    assert url_download(url, cache, progress).read_bytes() == GGUF
    first, second = hub.seen("GET", "/files/tiny.gguf")
    assert "range" not in first.headers and second.headers["range"] == "bytes=100000-"
    assert progress.done == sorted(progress.done) and progress.calls[-1] == (len(GGUF), len(GGUF))


def test_an_interrupted_url_download_is_resumed_by_the_next_call(hub, cache):
    url = hub.add_file("tiny.gguf", GGUF)
    with pytest.raises(Interrupted):
        url_download(url, cache, Recorder(stop_after=1))
    (part,) = hub_url_root(cache).rglob("tiny.gguf.part")
    kept = part.stat().st_size
    assert 0 < kept < len(GGUF) and not part.with_name("tiny.gguf").exists()
    progress = Recorder()
    assert url_download(url, cache, progress).read_bytes() == GGUF
    last = hub.seen("GET", "/files/tiny.gguf")[-1]
    assert last.headers["range"] == f"bytes={kept}-" and "if-range" in last.headers
    assert progress.calls[0] == (kept, len(GGUF))


def test_a_url_file_changed_since_the_partial_download_is_fetched_whole(hub, cache):
    url = hub.add_file("tiny.gguf", GGUF)
    with pytest.raises(Interrupted):
        url_download(url, cache, Recorder(stop_after=1))
    newer = b"GGUF" + random.Random(1).randbytes(200_000)
    hub.add_file("tiny.gguf", newer)  # If-Range no longer matches: the server sends all of it
    assert url_download(url, cache).read_bytes() == newer


def test_a_url_part_longer_than_the_file_starts_over(hub, cache):
    url = hub.add_file("tiny.gguf", GGUF)
    with pytest.raises(Interrupted):
        url_download(url, cache, Recorder(stop_after=1))
    (part,) = hub_url_root(cache).rglob("tiny.gguf.part")
    part.write_bytes(b"x" * (len(GGUF) + 10))  # e.g. left by an older, longer file
    part.with_name("tiny.gguf.part.json").unlink()
    assert url_download(url, cache).read_bytes() == GGUF


def test_a_url_that_keeps_failing_gives_up_and_keeps_the_part(hub, cache):
    url = hub.add_file("tiny.gguf", GGUF)
    hub.cut_next(None, "tiny.gguf", after=0, times=50)
    with pytest.raises(DownloadError, match="download failed: .* run again to resume"):
        url_download(url, cache)
    assert len(hub.seen("GET", "/files/tiny.gguf")) == 5


def test_a_url_that_is_not_a_gguf_is_refused_and_not_kept(hub, cache):
    url = hub.add_file("page.gguf", b"<html>sign in</html>")
    with pytest.raises(DownloadError, match="not a GGUF file .*nothing was kept"):
        url_download(url, cache)
    assert not [p for p in hub_url_root(cache).rglob("*") if p.is_file()]


def test_a_missing_url_is_a_clear_error(hub, cache):
    with pytest.raises(DownloadError, match=r"/files/gone\.gguf: not found \(HTTP 404\)"):
        url_download(f"{hub.url}/files/gone.gguf", cache)


def test_an_unreachable_url_is_a_clear_error(hub, cache):
    hub.stop()
    with pytest.raises(DownloadError, match="cannot connect"):
        url_download(f"{hub.url}/files/tiny.gguf", cache)


def hub_url_root(cache):
    return Path(cache) / "lmserve-downloads"


# --- lmserve pull --------------------------------------------------------------------------------------------


def pull_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmserve")
    add_pull_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["pull", *argv])


def test_pull_prints_the_local_path(hub, cache, capsys):
    args = pull_args("hf:org/gguf/model.gguf", "--endpoint", hub.url, "--cache-dir", cache)
    assert (args.command, args.log_level, args.token) == ("pull", "warning", None)
    pull(args)
    out = capsys.readouterr().out
    assert out.endswith("model.gguf\n") and out.count("\n") == 1
    with open(out.strip(), "rb") as f:
        assert f.read() == GGUF


def test_a_failing_pull_exits_with_the_reason(hub, cache):
    with pytest.raises(SystemExit) as exit_info:
        pull(pull_args("hf:org/nope/x.gguf", "--endpoint", hub.url, "--cache-dir", cache))
    assert str(exit_info.value.code).startswith("lmserve pull: hf:org/nope/x.gguf: no repo org/nope")
    with pytest.raises(SystemExit, match="lmserve pull: 'models/x.gguf' is not a remote source"):
        pull(pull_args("models/x.gguf"))
