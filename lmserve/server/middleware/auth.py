"""API-key check: `Authorization: Bearer <key>` or `X-Api-Key: <key>` when keys are configured.

An ASGI middleware rather than a route dependency, so a request without a valid key is
refused before its body is read or validated.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lmserve.server.errors import error_body
from lmserve.server.state import ServerState
from lmserve.server.web import UI_PREFIX, wants_page

# Liveness, the metrics scrape (aggregate numbers only; scrapers often hold no key, as with
# vLLM) and the API description stay reachable without a key; so does the web page (server/web/:
# it holds no data and asks for the key its calls need).
PUBLIC_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = error_body("Invalid or missing API key.", "authentication_error", code="invalid_api_key")
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        if scope["type"] != "http" or not self.state.api_keys:
            return True
        path, headers = scope["path"], Headers(scope=scope)
        if path in PUBLIC_PATHS or scope["method"] == "OPTIONS" or path.startswith(UI_PREFIX + "/"):
            return True
        if path == "/" and wants_page(headers):
            return True
        return key_matches(presented_key(headers), self.state.api_keys)


def owner_of(request: Request, state: ServerState) -> str:
    """Whose stored responses and conversations a request sees: a hash of its API key when the
    server checks keys, else "" (everyone's)."""
    key = presented_key(request.headers) if state.api_keys else None
    return "" if key is None else hashlib.sha256(key.encode()).hexdigest()


def presented_key(headers: Headers) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


def key_matches(key: str | None, api_keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key."""
    if key is None:
        return False
    presented = key.encode()
    matched = False
    for api_key in api_keys:
        matched |= hmac.compare_digest(presented, api_key.encode())
    return matched
