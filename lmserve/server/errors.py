"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`, and their handlers."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from lmserve.server.protocol import ErrorResponse

logger = logging.getLogger(__name__)

# A client that hung up before any response: nginx's code, as the routes and the access log use it.
CLIENT_CLOSED_REQUEST = 499

# The error answers the OpenAPI schema documents for a route.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 429, 500, 503)
}

# pydantic puts union members and validator kinds into error locations: "str", "list[int]",
# "function-after[...]", "ContentPart". They are not fields, so they stay out of `param`.
_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|[A-Z]\w*)$|[\[\-]")


class APIError(Exception):
    """An error the client gets as an OpenAI error body with this HTTP status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str | None = None) -> APIError:
    """A recognised parameter (or value) that lmserve does not implement yet."""
    detail = what or f"'{param}'"
    return bad_request(f"{detail} is not supported by lmserve", param=param, code="unsupported_parameter")


def server_error(message: str, status_code: int = 500) -> APIError:
    return APIError(status_code, message, type="server_error")


def internal_error(reference: str) -> APIError:
    """A 500 that tells the client nothing of the code (no exception names or messages): the
    server log line tagged with `reference` ("request id ...") has the details."""
    return server_error(f"Internal server error; the server log has the details under {reference}.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error(exc.errors()).body(), status_code=400)


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    body = _unreadable_body(exc.__cause__) or error_body(str(exc.detail), kind, code=str(exc.status_code))
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _unreadable_body(cause: BaseException | None) -> dict | None:
    """What FastAPI's body reader hides behind "There was an error parsing the body" (its 400
    for a body JSON cannot read other than malformed JSON), said plainly."""
    if isinstance(cause, UnicodeDecodeError):
        return error_body(f"The request body is not valid UTF-8: {cause.reason} at byte {cause.start}.",
                          "invalid_request_error", code="invalid_unicode")
    if isinstance(cause, RecursionError):
        return error_body("The request body is not valid JSON here: it is nested too deeply.",
                          "invalid_request_error", code="nested_too_deeply")
    if isinstance(cause, ValueError):  # an integer too long for Python's int ("Exceeds the limit (4300 digits)")
        return error_body(f"The request body is not valid JSON here: {cause}.", "invalid_request_error")
    return None


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ClientDisconnect):  # a stream's client went away (ASGI 2.4 servers)
        logger.info("client disconnected from %s", request.url.path)
        body = error_body("client disconnected", "invalid_request_error")
        return JSONResponse(body, status_code=CLIENT_CLOSED_REQUEST)
    request_id = _request_id(request)
    logger.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, request_id)
    # Answered outside the access middleware (Starlette's outermost error handler): it adds the header here.
    return JSONResponse(internal_error(f"request id {request_id}").body(), status_code=500,
                        headers={"X-Request-Id": request_id})


def _request_id(request: Request) -> str:
    """The id the access log and the X-Request-Id header give this request (a fresh one if
    the access middleware is not installed)."""
    record = getattr(request.state, "access", None)
    return getattr(record, "request_id", None) or uuid.uuid4().hex


def validation_error(errors: list[dict]) -> APIError:
    """Turn pydantic's error list into one 400 naming the first offending field."""
    first = _most_telling(errors) if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"malformed JSON body: {detail}".rstrip(": "))
    param = error_param(first["loc"])
    if param is None and first["type"] == "missing":
        return bad_request("The request body is missing: send a JSON object.")
    if param is None:
        return bad_request(f"invalid request body: {first['msg']}")
    if first["type"] == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param)
    return bad_request(f"Invalid value for '{param}': {first['msg']}", param=param)


def _most_telling(errors: list[dict]) -> dict:
    """The first error, unless it only says a union's member wants another type while another
    member of the same field says what is wrong with the value ("messages": [] is a list that
    is too short, not "should be a valid string")."""
    first = errors[0]
    if first["type"].endswith("_type"):
        for error in errors[1:]:
            if not error["type"].endswith("_type") and error_param(error["loc"]) == error_param(first["loc"]):
                return error
    return first


# Where FastAPI says a failing value came from: not part of the parameter's name.
_LOCATIONS = ("body", "path", "query", "header", "cookie")


def error_param(loc: tuple | list) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"; ("query", "action") -> "action";
    None for the body as a whole."""
    param = ""
    for part in loc[1:] if loc and loc[0] in _LOCATIONS else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _UNION_TAG.search(part):
            param += f".{part}" if param else part
    return param or None
