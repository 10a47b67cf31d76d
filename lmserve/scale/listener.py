"""The ingress answering HTTP itself (`lmserve serve --replicas`): lmserve's own uvicorn settings
on --host/--port, in the ingress replica's process, with no Ray Serve proxy in front.

Through Ray Serve's proxy, every SSE chunk of every stream crosses from the ingress to the proxy
as a Ray message of its own, and the proxy is one more process wanting the replicas' CPU
(bench/RESULTS.md, the ingress hop). Answered here, a stream's chunks go from the app straight to
its client's socket, and every listening flag means what it means in one process: a UNIX socket,
TLS, the deadlines on reading and writing, the cap on connections. `serve run lmserve.scale:app`
answers through Ray Serve's proxy, where the cluster's Serve is configured to listen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

_WHERE = ("host", "port", "uds")


def bind(options: dict[str, Any]) -> socket.socket:
    """The socket `options` (serve_settings.listen_options) name, bound and listening; OSError
    (a taken port, a missing folder) as binding raises it."""
    if "uds" in options:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(options["uds"])
            os.chmod(options["uds"], 0o666)  # as uvicorn makes it
        except OSError:
            sock.close()
            raise
    else:
        host, port = options["host"], options["port"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    sock.listen(2048)  # uvicorn's default backlog
    return sock


def check_free(options: dict[str, Any]) -> None:
    """Before anything starts: ValueError saying why `options`' address cannot be listened on."""
    if "uds" in options and os.path.exists(options["uds"]):
        raise ValueError(f"cannot listen on {options['uds']}: the file exists")
    try:
        bind(options).close()
    except OSError as exc:
        where = options.get("uds") or f"{options['host']}:{options['port']}"
        raise ValueError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    if "uds" in options:
        os.remove(options["uds"])


def start(app: Any, options: dict[str, Any]) -> asyncio.Task:
    """Serve `app` on the running loop (the ingress replica's) with uvicorn `options`: where to
    listen (bound before this returns) and how. The app's lifespan is Ray Serve's to run."""
    sock = bind(options)
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                            **{name: value for name, value in options.items() if name not in _WHERE})
    return asyncio.get_running_loop().create_task(_Server(config).serve(sockets=[sock]), name="lmserve-http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the process is a Ray replica: its signals are Ray's, and stopping is Ray Serve's
