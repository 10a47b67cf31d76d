"""CORS for browser clients on `--allowed-origins`, on Starlette's CORSMiddleware.

One change to Starlette's answers: a refused preflight gets an OpenAI-shaped error body, and
a preflight from an origin that is not allowed is 403 (the request is well formed; the origin
is forbidden), where Starlette says 400. A preflight asking for a method we do not serve stays
400. Actual requests from other origins are served without CORS headers, so browsers keep
their responses from the page, as the CORS protocol intends.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from lmserve.server.middleware.access import REQUEST_ID_HEADER
from lmserve.server.errors import error_body

ALLOWED_METHODS = ("GET", "POST", "OPTIONS")


def parse_origins(values: Iterable[str]) -> tuple[str, ...]:
    """`--allowed-origins` values, each maybe comma-separated, as one tuple (order kept)."""
    origins: list[str] = []
    for value in values:
        for origin in value.split(","):
            origin = origin.strip().rstrip("/")
            if origin and origin not in origins:
                origins.append(origin)
    return tuple(origins)


class LmserveCORSMiddleware(CORSMiddleware):
    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...]) -> None:
        super().__init__(app, allow_origins=allowed_origins, allow_methods=ALLOWED_METHODS, allow_headers=["*"],
                         expose_headers=[REQUEST_ID_HEADER])

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        if self.is_allowed_origin(origin=request_headers["origin"]):
            status, kind, code = 400, "invalid_request_error", "cors_preflight_refused"
        else:
            status, kind, code = 403, "permission_error", "origin_not_allowed"
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")}
        message = f"{bytes(response.body).decode()} (origin {request_headers['origin']!r})"
        return JSONResponse(error_body(message, kind, code=code), status_code=status, headers=headers)
