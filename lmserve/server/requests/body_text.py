"""Every string in a JSON request body must be Unicode text: a 400 naming the field otherwise.

JSON can spell a lone surrogate ("\\ud800"), and Python's JSON reader also lets through the
UTF-8-style bytes of one (ED A0 80). Either makes a Python str that cannot be encoded as UTF-8,
so it fails wherever it is used: a tokenizer, a log line, an error message that quotes it (a 500
before this check). Checking the parsed body once, before any route sees it, covers every field,
the peers' extensions and unknown fields alike.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from lmserve.server.errors import bad_request

# What a body holding a lone surrogate must contain: its JSON escape, or its raw bytes. A pair
# (an emoji spelled "\ud83d\ude00") matches too; the walk below tells the two apart.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


async def check_body_text(request: Request) -> None:
    """A FastAPI dependency of every route: the body has been read and parsed by then (FastAPI
    caches both on the request), so this costs one scan of the raw bytes."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    body = await request.body()
    if not _MAYBE_SURROGATE.search(body):
        return
    try:
        value = await request.json()
    except ValueError:
        return  # not JSON: the route's own body parsing answers it
    where = lone_surrogate_at(value)
    if where is not None:
        loc, char = where
        param = _param(loc)
        field = f"'{param}'" if param else "the request body"
        raise bad_request(f"Invalid value for {field}: not valid Unicode text (it holds a lone surrogate, "
                          f"U+{ord(char):04X})", param=param, code="invalid_unicode")


def lone_surrogate_at(value: Any, loc: tuple = ()) -> tuple[tuple, str] | None:
    """(location, the surrogate) of the first string in `value` (or key of an object in it)
    holding a lone surrogate; None if there is none. A location is a tuple of keys and indexes;
    a bad key is located at its object."""
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        return (loc, found.group()) if found else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _SURROGATE.search(key)
            if found:
                return loc, found.group()
            where = lone_surrogate_at(item, (*loc, key))
            if where is not None:
                return where
    elif isinstance(value, list):
        for index, item in enumerate(value):
            where = lone_surrogate_at(item, (*loc, index))
            if where is not None:
                return where
    return None


def _param(loc: tuple) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"; None for the body itself."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else part
    return param or None
