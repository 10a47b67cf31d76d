"""The ingress's own HTTP listener (scale/listener.py), without Ray: it serves an app on the running
loop with lmserve's connection settings, on a port or a UNIX socket, and an address that cannot
be listened on is named before anything starts."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest
from fastapi import FastAPI

from lmserve.cli import build_parser
from lmserve.scale import listener
from lmserve.scale.options import check_node_address, check_proxy_listening, scale_settings
from lmserve.server.connections import ConnectionLimits, uvicorn_options


def app() -> FastAPI:
    served = FastAPI()

    @served.get("/where")
    async def where() -> dict:
        return {"loop": id(asyncio.get_running_loop())}

    return served


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_it_serves_the_app_on_the_running_loop_at_once():
    async def run() -> None:
        port = free_port()
        task = listener.start(app(), {"host": "127.0.0.1", "port": port, "log_level": "warning"})
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass  # bound and listening before start returned, before the loop ran the server
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{port}/where")
            assert answer.json() == {"loop": id(asyncio.get_running_loop())}
        finally:
            await stop(task)

    asyncio.run(run())


def test_lmserve_connection_limits_hold_on_it():
    async def run() -> None:
        port = free_port()
        options = {"host": "127.0.0.1", "port": port, "log_level": "warning"} | uvicorn_options(
            ConnectionLimits(read_timeout=0.5))
        task = listener.start(app(), options)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /where HTTP/1.1\r\nHost: localhost\r\n")  # a head that never ends
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(65536), timeout=5)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408")
            assert json.loads(body)["error"]["code"] == "request_timeout"
            writer.close()
        finally:
            await stop(task)

    asyncio.run(run())


def test_it_serves_on_a_unix_socket(tmp_path):
    async def run() -> None:
        path = str(tmp_path / "lmserve.sock")
        task = listener.start(app(), {"uds": path, "log_level": "warning"})
        try:
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=path)) as client:
                answer = await client.get("http://localhost/where")
            assert answer.status_code == 200
        finally:
            await stop(task)

    asyncio.run(run())


def test_a_taken_port_is_named_before_anything_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listener.check_free({"host": "127.0.0.1", "port": port})
    listener.check_free({"host": "127.0.0.1", "port": port})  # free again: checking holds nothing


def test_a_unix_socket_path_in_use_is_named(tmp_path):
    path = tmp_path / "lmserve.sock"
    path.write_text("")
    with pytest.raises(ValueError, match="the file exists"):
        listener.check_free({"uds": str(path)})
    free = tmp_path / "free.sock"
    listener.check_free({"uds": str(free)})
    assert not free.exists()  # the check leaves no socket file behind


def settings(*flags: str):
    return scale_settings(build_parser().parse_args(["serve", "model.gguf", *flags]))


def test_lmserve_serve_runs_on_a_node_of_the_cluster():
    check_node_address(settings("--ray-address", "auto"))
    with pytest.raises(ValueError, match="--ray-address ray://head:10001.*serve run lmserve.scale:app"):
        check_node_address(settings("--ray-address", "ray://head:10001"))


def test_behind_ray_serves_proxy_no_listening_flag_is_taken(tmp_path):
    def check(*flags: str) -> None:
        check_proxy_listening(build_parser().parse_args(["serve", "model.gguf", *flags]),
                              build_parser().parse_args(["serve"]))

    check("--replicas", "2")
    with pytest.raises(ValueError, match="UNIX socket"):
        check("--host", "/tmp/lmserve.sock")
    with pytest.raises(ValueError, match="plain HTTP"):
        check("--ssl-key-file", "k.pem", "--ssl-cert-file", "c.pem")
    with pytest.raises(ValueError, match="--port, --read-timeout would change nothing"):
        check("--port", "9000", "--read-timeout", "7")
    with pytest.raises(ValueError, match="--max-connections would change nothing"):
        check("--max-connections", "10")
