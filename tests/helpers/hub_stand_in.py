"""A Hugging Face Hub stand-in on 127.0.0.1, so download tests never reach huggingface.co.

It serves repos held in memory (repo id -> {filename: bytes}) through exactly the endpoints
huggingface_hub 2.4.0 calls for `HfApi.model_info`, `hf_hub_download` and `snapshot_download`:

    GET  /api/models/{repo}[/revision/{rev}]   model info; `?blobs=true` adds sizes, blob ids, LFS sha256
    GET  /api/models/{repo}/tree/{rev}[/{path}] the file listing snapshot_download filters (one page, no Link)
    HEAD /{repo}/resolve/{rev}/{file}           metadata: X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size
    GET  /{repo}/resolve/{rev}/{file}           the bytes; `Range: bytes=N-` answers 206 with Content-Range

and plain files at /files/{name} (ETag, Range and If-Range) for the https:// URL case.

How the client reads those headers (huggingface_hub/file_download.py `get_hf_file_metadata`): the
commit from X-Repo-Commit (required), the etag from X-Linked-Etag or else ETag (required; it names
the cached blob), the size from X-Linked-Size or else Content-Length. LFS files (.gguf, .safetensors
and anything over 10 KB, as on the Hub) get X-Linked-* and an etag that is their sha256; small
files get their git blob sha1. No X-Xet-* header and no `xetHash` in listings is ever sent, so the
client stays on plain HTTP even with hf_xet installed. The resolve answers 200 directly rather than
the Hub's 302 to a CDN: the client follows same-host redirects anyway and only the headers matter.

Errors carry the Hub's X-Error-Code, which `hf_raise_for_status` turns into typed exceptions:
RepoNotFound (404, or 401 for a private repo asked without its token), RevisionNotFound and
EntryNotFound (with X-Repo-Commit).

Faults, for the tests: `cut_next(repo, name, after=N)` sends the next GET's headers, N body bytes,
then closes the connection; `corrupt(repo, name, data)` serves `data` while the listing and the
headers keep announcing the original's size and hash. `repo=None` means a plain /files/ file.
Every request is recorded in `requests` (method, path, query, headers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
LFS_MIN_SIZE = 10 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_PLAIN = re.compile(r"^/files/(?P<path>.+)$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names


@dataclass
class _File:
    data: bytes  # what the Hub announces (size, hashes)
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    @property
    def blob_id(self) -> str:
        # An LFS file's git blob is its pointer file.
        if not self.lfs:
            return git_blob_sha1(self.data)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        return git_blob_sha1(pointer.encode())


@dataclass
class _Repo:
    files: dict[str, _File]
    commit: str
    token: str | None


@dataclass
class _Cut:
    after: int
    times: int


@dataclass
class HubStandIn:
    """Start with `with HubStandIn() as hub:`; `hub.url` is the endpoint to hand to the client."""

    repos: dict[str, _Repo] = field(default_factory=dict)
    plain: dict[str, bytes] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    _corrupt: dict[tuple[str | None, str], bytes] = field(default_factory=dict)
    _cuts: dict[tuple[str | None, str], _Cut] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _connections: set[socket.socket] = field(default_factory=set)  # open keep-alive connections

    # --- content and faults -------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, token: str | None = None) -> str:
        """Serve a repo; with `token`, it is private: asked without `Bearer <token>` it answers 401.
        Returns its commit sha."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        entries = {name: _File(data, lfs=name.endswith(LFS_SUFFIXES) or len(data) > LFS_MIN_SIZE)
                   for name, data in files.items()}
        self.repos[repo_id] = _Repo(entries, digest.hexdigest(), token)
        return digest.hexdigest()

    def add_file(self, name: str, data: bytes) -> str:
        """Serve a plain file; returns its URL."""
        self.plain[name] = data
        return f"{self.url}/files/{quote(name)}"

    def cut_next(self, repo_id: str | None, name: str, *, after: int, times: int = 1) -> None:
        """The next `times` GETs of the file stop after `after` body bytes, the connection closed."""
        self._cuts[(repo_id, name)] = _Cut(after, times)

    def corrupt(self, repo_id: str | None, name: str, data: bytes | None) -> None:
        """Serve `data` for the file (None: stop), while still announcing the original's size and hash."""
        if data is None:
            self._corrupt.pop((repo_id, name), None)
        else:
            self._corrupt[(repo_id, name)] = data

    def seen(self, method: str | None = None, path_contains: str = "") -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and path_contains in r.path]

    # --- server -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "start the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-stand-in",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering, on new connections and on the keep-alive ones clients hold in their pools."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what the handler asks ----------------------------------------------------------------

    def _record(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        seen = Seen(handler.command, unquote(parts.path), parse_qs(parts.query),
                    {k.lower(): v for k, v in handler.headers.items()})
        with self._lock:
            self.requests.append(seen)

    def _take_cut(self, key: tuple[str | None, str]) -> int | None:
        with self._lock:
            cut = self._cuts.get(key)
            if cut is None:
                return None
            cut.times -= 1
            if cut.times <= 0:
                del self._cuts[key]
            return cut.after


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client hanging up (or stop() cutting a keep-alive connection) is expected here, not a failure.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stand_in: HubStandIn

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.stand_in._lock:
            self.stand_in._connections.add(self.connection)

    def finish(self) -> None:
        with self.stand_in._lock:
            self.stand_in._connections.discard(self.connection)
        super().finish()

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def do_GET(self) -> None:
        self._handle(head=False)

    def _handle(self, head: bool) -> None:
        hub = self.stand_in
        hub._record(self)
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        try:
            if match := _TREE.match(path):
                self._json(self._tree(match["repo"], unquote(match["rev"]), unquote(match["path"] or "")), head)
            elif match := _INFO.match(path):
                blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
                self._json(self._info(match["repo"], unquote(match["rev"] or "main"), blobs), head)
            elif match := _RESOLVE.match(path):
                self._resolve(match["repo"], unquote(match["rev"]), unquote(match["path"]), head)
            elif match := _PLAIN.match(path):
                self._plain(unquote(match["path"]), head)
            else:
                raise _Error(404, None, f"no route for {path}")
        except _Error as exc:
            body = json.dumps({"error": str(exc)}).encode()
            self.send_response(exc.status)
            if exc.code:
                self.send_header("X-Error-Code", exc.code)
            self.send_header("X-Error-Message", str(exc))
            for name, value in exc.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    # --- API ----------------------------------------------------------------------------------

    def _repo(self, repo_id: str, revision: str) -> _Repo:
        repo = self.stand_in.repos.get(repo_id)
        if repo is None:
            raise _Error(404, "RepoNotFound", "Repository not found")
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            raise _Error(401, "RepoNotFound", "Invalid username or password.")
        if revision not in ("main", repo.commit):
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo

    def _info(self, repo_id: str, revision: str, blobs: bool) -> dict:
        repo = self._repo(repo_id, revision)
        siblings = []
        for name, file in sorted(repo.files.items()):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling |= {"size": len(file.data), "blobId": file.blob_id}
                if file.lfs:
                    sibling["lfs"] = {"size": len(file.data), "sha256": file.sha256, "pointerSize": 134}
            siblings.append(sibling)
        return {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": repo.token is not None,
                "siblings": siblings}

    def _tree(self, repo_id: str, revision: str, prefix: str) -> list[dict]:
        # Always the recursive listing (snapshot_download asks recursive=True), in one page.
        repo = self._repo(repo_id, revision)
        base = prefix.rstrip("/") + "/" if prefix else ""
        entries, folders = [], set()
        for name, file in sorted(repo.files.items()):
            if not name.startswith(base):
                continue
            *dirs, _ = name.split("/")
            folders.update("/".join(dirs[: i + 1]) for i in range(len(dirs)))
            entry: dict = {"type": "file", "oid": file.blob_id, "size": len(file.data), "path": name}
            if file.lfs:
                entry["lfs"] = {"oid": file.sha256, "size": len(file.data), "pointerSize": 134}
            entries.append(entry)
        folders = {f for f in folders if (f + "/").startswith(base) and f + "/" != base}
        tree_oid = hashlib.sha1(repo.commit.encode()).hexdigest()
        return [{"type": "directory", "oid": tree_oid, "path": f} for f in sorted(folders)] + entries

    def _json(self, payload: object, head: bool) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    # --- files --------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        file = repo.files.get(name)
        if file is None:
            raise _Error(404, "EntryNotFound", f"{name} does not exist on {revision}",
                         {"X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{file.etag}"'}
        if file.lfs:
            headers |= {"X-Linked-Etag": f'"{file.etag}"', "X-Linked-Size": str(len(file.data))}
        served = self.stand_in._corrupt.get((repo_id, name), file.data)
        if head:
            # HEAD announces the real file, whatever a corrupt() would serve.
            self._send_file_headers(200, len(file.data), headers)
            return
        self._send_bytes(served, headers, (repo_id, name), etag=file.etag)

    def _plain(self, name: str, head: bool) -> None:
        data = self.stand_in.plain.get(name)
        if data is None:
            raise _Error(404, None, f"no file {name}")
        etag = hashlib.sha256(data).hexdigest()[:16]
        served = self.stand_in._corrupt.get((None, name), data)
        if head:
            self._send_file_headers(200, len(data), {"ETag": f'"{etag}"'})
            return
        self._send_bytes(served, {"ETag": f'"{etag}"'}, (None, name), etag=etag)

    def _send_file_headers(self, status: int, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_bytes(self, data: bytes, headers: dict[str, str], key: tuple[str | None, str], etag: str) -> None:
        status, start, end = 200, 0, len(data)
        requested = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if requested and (if_range is None or if_range.strip('"') == etag):
            match = _RANGE.match(requested)
            if match is None:
                raise _Error(400, None, f"unsupported Range {requested!r}")
            start = int(match[1])
            end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            if start >= len(data):
                raise _Error(416, None, "range not satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
        self._send_file_headers(status, end - start, headers)
        body = data[start:end]
        cut = self.stand_in._take_cut(key)
        if cut is not None and cut < len(body):
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(body)
