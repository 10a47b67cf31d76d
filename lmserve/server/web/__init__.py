"""The web chat page, shipped with the package: index.html, and its scripts and style in static/.

GET / answers the page to a browser (a request that accepts HTML; programs keep the server's
status there, routes/ops.py), and UI_PREFIX serves its files. Neither needs a key: the page holds
no data, and the calls it makes to the API carry the key it asks for. Nothing is fetched from
elsewhere, so the page works on a machine with no internet.
"""

from __future__ import annotations

from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent
UI_PREFIX = "/ui"

# The page runs model output through its own renderer (markdown.js); the policy makes sure
# nothing in a reply can load or run anything even if that renderer let markup through.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    "Vary": "Accept",  # the same address answers programs with JSON (routes/ops.py)
}


def wants_page(headers: Headers) -> bool:
    return "text/html" in headers.get("accept", "")


def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)


def static_files() -> StaticFiles:
    """The page's scripts and style, mounted at UI_PREFIX (the page itself is served only at /,
    with its headers)."""
    return StaticFiles(directory=WEB_DIR / "static")
