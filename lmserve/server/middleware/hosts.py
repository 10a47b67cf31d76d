"""The Host header check: a page on another site cannot reach this server by DNS rebinding.

A page at http://evil.example:8080 can make its own name resolve to 127.0.0.1 (or a LAN
address) after it loaded; its requests then reach this server as same-origin ones, so CORS does
not stop them, but they still say `Host: evil.example:8080`. So a request is served only when
its Host is

- an IP address (a rebinding page always has a name: an address in Host means the browser was
  pointed at the address itself),
- `localhost` or a name under it (`app.localhost`: browsers resolve those to loopback themselves),
- a name this server was told to answer to: `--allowed-hosts` (`name` for any port, `name:port`
  for one), and by default, when it listens on every interface (or on a name), this machine's
  own names and that name;

or when `--allowed-hosts '*'` turns the check off. Anything else is a 403, before the API key
is looked at. A request without a Host (HTTP/1.0) cannot come from a browser and is served.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmserve.server.errors import error_body

ANY_HOST = "*"
_ALL_INTERFACES = ("", "0.0.0.0", "::", "[::]")


def parse_allowed_hosts(values: Iterable[str]) -> tuple[str, ...]:
    """`--allowed-hosts` values, each maybe comma-separated, as lowercase names (order kept)."""
    hosts: list[str] = []
    for value in values:
        for host in value.split(","):
            host = host.strip().lower().rstrip(".")
            if host and host not in hosts:
                hosts.append(host)
    return (ANY_HOST,) if ANY_HOST in hosts else tuple(hosts)


def default_allowed_hosts(listen_host: str) -> tuple[str, ...]:
    """The names a server listening on `listen_host` answers to besides IP addresses and
    localhost: none on loopback; this machine's names on every interface (a LAN client may
    use them); a name it listens on. A UNIX socket is no browser's to reach: any."""
    if listen_host.endswith(".sock"):
        return (ANY_HOST,)
    host = listen_host.strip("[]").lower().rstrip(".")
    if _is_local_name(host) or _ip(host) is not None and _ip(host).is_loopback:
        return ()
    names = [] if host in _ALL_INTERFACES or _ip(host) is not None else [host]
    return tuple(dict.fromkeys(names + machine_names()))


def machine_names() -> list[str]:
    """This machine's host name (as it is set, and its first label) and its mDNS name
    (NAME.local). No DNS lookup: a slow resolver would hold up the start."""
    name = socket.gethostname().lower().rstrip(".")
    if not name or _is_local_name(name):
        return []
    short = name.split(".")[0]
    return list(dict.fromkeys([name, short, f"{short}.local"]))


def host_allowed(host_header: str | None, allowed_hosts: tuple[str, ...]) -> bool:
    if host_header is None or ANY_HOST in allowed_hosts:
        return True
    name, port = split_host(host_header)
    if name is None:
        return False
    if _ip(name) is not None or _is_local_name(name):
        return True
    return name in allowed_hosts or (port is not None and f"{name}:{port}" in allowed_hosts)


def split_host(host_header: str) -> tuple[str | None, str | None]:
    """"Example.COM.:8080" -> ("example.com", "8080"); "[::1]:80" -> ("::1", "80"); (None, None)
    for a header that is no host."""
    value = host_header.strip().lower()
    if value.startswith("["):
        name, found, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if not found or (rest and port is None):
            return None, None
    else:
        name, colon, port = value.partition(":")
        port = port if colon else None
    if port is not None and not port.isdigit() or not name:
        return None, None
    return name.rstrip("."), port


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _is_local_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost")


class HostCheckMiddleware:
    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host") if scope["type"] == "http" else None
        if host_allowed(host, self.allowed_hosts):
            await self.app(scope, receive, send)
            return
        message = (f"Host {host!r} is not one this server answers to (it checks Host against DNS rebinding): "
                   f"address it by IP or localhost, or start it with --allowed-hosts naming this host.")
        await JSONResponse(error_body(message, "permission_error", code="host_not_allowed"),
                           status_code=403)(scope, receive, send)
