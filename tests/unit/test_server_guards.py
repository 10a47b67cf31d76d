"""API keys (and key files), CORS, the Host check and the request-body cap, over ASGI against
the fake engine."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from lmserve.cli import build_parser
from lmserve.serve_settings import api_keys, read_api_key_file, state_settings
from lmserve.server.middleware.cors import parse_origins
from lmserve.server.middleware.hosts import default_allowed_hosts, host_allowed, machine_names
from lmserve.server.middleware.limits import BodyLimitMiddleware
from tests.helpers.server import chat, make_client

KEY = "sk-test-1"
KEYS = (KEY, "sk-test-2")
ALLOWED = "https://app.example"
OTHER = "https://evil.example"


# ---------------------------------------------------------------- API keys


@pytest.fixture
def keyed():
    return make_client(api_keys=KEYS)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "wrong"},
                                     {"Authorization": KEY}, {"Authorization": "Basic " + KEY}])
@pytest.mark.parametrize("method, path", [("POST", "/tokenize"), ("POST", "/v1/detokenize"), ("GET", "/props"),
                                          ("GET", "/v1/models"), ("POST", "/v1/chat/completions")])
def test_missing_or_wrong_key_is_401(keyed, headers, method, path):
    response = keyed.request(method, path, headers=headers, json={"content": "a"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": KEY},
                                     {"Authorization": "bearer sk-test-2"}])
def test_bearer_and_x_api_key_are_accepted(keyed, headers):
    assert keyed.post("/tokenize", headers=headers, json={"content": "a"}).status_code == 200
    assert chat(make_client(api_keys=KEYS, headers=headers)).status_code == 200


def test_health_and_metrics_need_no_key(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_api_key_file_skips_blanks_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\n\n  sk-one  \n#sk-disabled\nsk-two\n")
    assert read_api_key_file(path) == ("sk-one", "sk-two")


@pytest.mark.parametrize("content", [None, "", "\n# only a comment\n   \n"])
def test_missing_or_keyless_api_key_file_stops_start_up(tmp_path, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    args = build_parser().parse_args(["serve", "--api-key-file", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        api_keys(args)
    assert str(path) in str(exit_info.value)
    assert ("no keys" if content is not None else "cannot read") in str(exit_info.value)


def test_api_key_flags_and_file_combine(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-file\nsk-flag\n")
    args = build_parser().parse_args(["serve", "--api-key", "sk-flag", "--api-key-file", str(path)])
    assert api_keys(args) == ("sk-flag", "sk-file")
    assert api_keys(build_parser().parse_args(["serve"])) == ()


# ---------------------------------------------------------------- CORS


@pytest.fixture
def cors():
    return make_client(api_keys=(KEY,), allowed_origins=parse_origins([f"{ALLOWED}/,https://b.example"]))


def preflight(client, origin, method="POST", headers="authorization,content-type"):
    return client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


def test_parse_origins_splits_commas_and_repeats():
    assert parse_origins(["https://a.example/, https://b.example", "https://a.example", "http://c:3000"]) == (
        "https://a.example", "https://b.example", "http://c:3000")


def test_preflight_from_an_allowed_origin_needs_no_key(cors):
    response = preflight(cors, ALLOWED)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization,content-type"
    assert preflight(cors, "https://b.example").status_code == 200


def test_preflight_from_another_origin_is_403(cors):
    response = preflight(cors, OTHER)
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "origin_not_allowed")


def test_preflight_for_an_unserved_method_is_400(cors):
    response = preflight(cors, ALLOWED, method="DELETE")
    assert response.status_code == 400 and response.json()["error"]["code"] == "cors_preflight_refused"


def test_actual_responses_carry_cors_headers_for_allowed_origins_even_401(cors):
    ok = cors.get("/v1/models", headers={"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    refused = cors.get("/v1/models", headers={"Origin": ALLOWED})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED


def test_other_origins_get_no_cors_headers(cors):
    response = cors.get("/v1/models", headers={"Origin": OTHER, "Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_without_allowed_origins_there_is_no_cors():
    client = make_client()
    assert "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": ALLOWED}).headers
    assert preflight(client, ALLOWED).status_code == 405


# ---------------------------------------------------------------- Host header (DNS rebinding)


@pytest.mark.parametrize(("host", "allowed", "served"), [
    ("localhost:8080", (), True),
    ("LOCALHOST.", (), True),
    ("app.localhost:3000", (), True),
    ("127.0.0.1:8080", (), True),
    ("[::1]:8080", (), True),
    ("192.168.1.20", (), True),  # an address: the browser was pointed at it, no name to rebind
    (None, (), True),  # HTTP/1.0: no browser
    ("evil.example:8080", (), False),
    ("localhost.evil.example", (), False),
    ("127.0.0.1.nip.io:8080", (), False),
    ("[::1", (), False),
    ("localhost:80:80", (), False),
    ("mybox:8080", ("mybox",), True),
    ("MyBox.:9000", ("mybox",), True),
    ("mybox:8080", ("mybox:8080",), True),
    ("mybox:9000", ("mybox:8080",), False),
    ("anything.example", ("*",), True),
])
def test_host_allowed(host, allowed, served):
    assert host_allowed(host, allowed) is served


def test_a_host_it_does_not_answer_to_is_403_before_the_key_check():
    client = make_client(api_keys=KEYS, allowed_hosts=("mybox",), raise_server_exceptions=False)
    refused = client.get("/health", headers={"Host": "evil.example:8080"})
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "host_not_allowed")
    assert "evil.example" in error["message"] and "--allowed-hosts" in error["message"]
    assert client.get("/health", headers={"Host": "mybox:8080"}).status_code == 200
    assert client.get("/v1/models", headers={"Host": "localhost:8080"}).status_code == 401  # the key, next


@pytest.mark.parametrize(("listen", "names"), [
    ("127.0.0.1", ()), ("localhost", ()), ("::1", ()), ("127.0.0.5", ()), ("/tmp/lmserve.sock", ("*",)),
])
def test_default_allowed_hosts_on_loopback_and_sockets(listen, names):
    assert default_allowed_hosts(listen) == names


@pytest.mark.parametrize("listen", ["0.0.0.0", "::", "192.168.1.20"])
def test_on_other_interfaces_the_machines_own_names_are_served(listen):
    names = default_allowed_hosts(listen)
    assert names == tuple(machine_names()) and names
    assert socket.gethostname().lower() in names and all(not name.startswith("0.0") for name in names)


def test_listening_on_a_name_serves_that_name():
    assert default_allowed_hosts("box.lan")[0] == "box.lan"


def test_allowed_hosts_flags_add_to_the_defaults():
    args = build_parser().parse_args(["serve", "--allowed-hosts", "a.example, B.example", "--allowed-hosts", "c:81"])
    assert state_settings(args)["allowed_hosts"] == ("a.example", "b.example", "c:81")
    assert state_settings(build_parser().parse_args(["serve"]))["allowed_hosts"] == ()
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--allowed-hosts", "x"])
    assert state_settings(args)["allowed_hosts"] == (*machine_names(), "x")
    args = build_parser().parse_args(["serve", "--allowed-hosts", "x,*"])
    assert state_settings(args)["allowed_hosts"] == ("*",)


# ---------------------------------------------------------------- body size


LIMIT = 2000


@pytest.fixture
def capped():
    return make_client(max_request_body=LIMIT)


def big_body() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x" * 3 * LIMIT}]}).encode()


def assert_413(response):
    assert response.status_code == 413
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert str(LIMIT) in error["message"]


def test_content_length_over_the_cap_is_413(capped):
    assert_413(capped.post("/v1/chat/completions", content=big_body(), headers={"content-type": "application/json"}))
    assert chat(capped).status_code == 200


def test_chunked_body_over_the_cap_is_413(capped):
    def chunks():
        body = big_body()
        for start in range(0, len(body), 500):
            yield body[start:start + 500]

    assert_413(capped.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}))
    assert chat(capped).status_code == 200


def test_a_body_at_the_cap_is_served(capped):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    body += b" " * (LIMIT - len(body))
    response = capped.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200


def test_unauthenticated_big_body_is_401_not_413():
    client = make_client(api_keys=(KEY,), max_request_body=LIMIT)
    assert client.post("/v1/chat/completions", content=big_body()).status_code == 401


def test_chunked_body_stops_being_read_at_the_cap():
    """ASGI level: the middleware pulls no more chunks once the cap is crossed."""
    chunks_read = []

    async def receive():
        chunks_read.append(1)
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}  # an endless body

    async def app(scope, receive, send):
        while (await receive())["more_body"]:
            pass

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1000)(scope, receive, send))
    assert len(chunks_read) == 11  # 1100 bytes: one chunk past the cap, then no more
    assert sent[0]["status"] == 413


# ---------------------------------------------------------------- body read deadline


def run_guarded(receive, timeout: float, read_after_body: bool = False) -> list[dict]:
    """The messages BodyLimitMiddleware sends for an app that reads the whole body (and then,
    if asked, waits for the disconnect, as a non-streaming route does)."""
    async def app(scope, receive, send):
        while (await receive())["more_body"]:
            pass
        if read_after_body:
            await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=10**6, timeout=timeout)(scope, receive, send))
    return sent


def chunks_then(chunks: list[tuple[float, bytes]], last: dict | None = None):
    """A receive giving each (delay, bytes) chunk, then `last` (or waiting forever)."""
    queue = list(chunks)

    async def receive():
        if queue:
            delay, body = queue.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": body, "more_body": True}
        if last is None:
            await asyncio.Event().wait()
        return last

    return receive


def test_a_body_that_stops_coming_is_408():
    started = time.monotonic()
    sent = run_guarded(chunks_then([(0, b"x" * 100)]), timeout=0.2)
    assert sent[0]["status"] == 408 and time.monotonic() - started < 2
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == "request_timeout" and dict(sent[0]["headers"])[b"connection"] == b"close"


def test_a_trickling_body_is_408_even_though_each_piece_is_on_time():
    sent = run_guarded(chunks_then([(0.05, b"x")] * 100), timeout=0.3)
    assert sent[0]["status"] == 408


def test_a_body_sent_steadily_is_read_whole_however_long_it_takes():
    # 10 pieces of 4 KiB a tenth of a second apart: 1 s in all against a 0.3 s base, but each
    # piece earns a quarter of a second at 16 KiB/s
    end = {"type": "http.request", "body": b"", "more_body": False}
    sent = run_guarded(chunks_then([(0.1, b"x" * 4096)] * 10, last=end), timeout=0.3)
    assert sent[0]["status"] == 200


def test_waiting_for_a_disconnect_after_the_body_has_no_deadline():
    end = {"type": "http.request", "body": b"x", "more_body": False}
    queue = [end]

    async def receive():
        if queue:
            return queue.pop()
        await asyncio.sleep(0.5)  # the response takes longer than the read timeout
        return {"type": "http.disconnect"}

    assert run_guarded(receive, timeout=0.1, read_after_body=True)[0]["status"] == 200
