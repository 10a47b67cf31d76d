"""Non-streaming routes: stop the work when the HTTP client disconnects before the answer.

(A stream notices on its own: closing an EventStreamResponse closes its engine generators.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from lmserve.server.responses.fanout import stop_tasks

T = TypeVar("T")


async def until_disconnected(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> T | None:
    """Await `work`, or cancel it and return None if the HTTP client disconnects first.

    For non-streaming responses, whose request body has already been read: the next ASGI
    message is the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        await stop_tasks([task] if not task.done() else [])
    return None if task.cancelled() else task.result()


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
