"""JSON request bodies: every string must be Unicode text, and nesting is bounded; a 400 naming
the field otherwise, before any route sees the body.

JSON can spell a lone surrogate ("\\ud800"), and Python's JSON reader also lets through the
UTF-8-style bytes of one (ED A0 80). Either makes a Python str that cannot be encoded as UTF-8,
so it fails wherever it is used: a tokenizer, a log line, an error message that quotes it (a 500
before this check).

Python's JSON reader takes nesting up to its recursion limit (about 1000 levels), but what
handles a request afterwards recurses too (the chat template, the special-text mask), from deeper
in the stack. MAX_BODY_DEPTH is deeper than any JSON schema the grammar compiler takes (128
levels) with room for its place in the body, and shallow enough for those steps.

Checking the parsed body once covers every field, the peers' extensions and unknown fields
alike; it is walked only when the raw bytes say it may hold a surrogate or be that deep.
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
MAX_BODY_DEPTH = 200  # objects and arrays, the body itself being the first


async def check_json_body(request: Request) -> None:
    """A FastAPI dependency of every route: the body has been read and parsed by then (FastAPI
    caches both on the request), so this costs one scan of the raw bytes."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    body = await request.body()
    if not _MAYBE_SURROGATE.search(body) and body.count(b"[") + body.count(b"{") <= MAX_BODY_DEPTH:
        return
    try:
        value = await request.json()
    except ValueError:
        return  # not JSON: the route's own body parsing answers it
    problem = body_problem(value)
    if problem is not None:
        loc, what = problem
        param = _param(loc)
        field = f"'{param}'" if param else "the request body"
        code = "invalid_unicode" if what.startswith("not valid") else "nested_too_deeply"
        raise bad_request(f"Invalid value for {field}: {what}", param=param, code=code)


def body_problem(value: Any) -> tuple[tuple, str] | None:
    """(location, what is wrong) of the first string in `value` (or key of an object in it)
    holding a lone surrogate, or of the first object or array nested deeper than
    MAX_BODY_DEPTH; None if there is neither. A location is a tuple of keys and indexes; a bad
    key is located at its object."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 1)]
    while stack:
        item, loc, depth = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return loc, f"not valid Unicode text (it holds a lone surrogate, U+{ord(found.group()):04X})"
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > MAX_BODY_DEPTH:
            return loc, f"it nests objects and arrays deeper than {MAX_BODY_DEPTH} levels"
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in reversed(list(children)):  # reversed: the stack pops them in order
            found = _SURROGATE.search(key) if isinstance(key, str) else None
            if found:
                return loc, f"not valid Unicode text (a key holds a lone surrogate, U+{ord(found.group()):04X})"
            stack.append((child, (*loc, key), depth + 1))
    return None


def _param(loc: tuple) -> str | None:
    """("messages", 0, "content") -> "messages[0].content"; None for the body itself."""
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else part
    return param or None
