"""The app's side of a stop (middleware/draining.py), on a bare app: requests in flight are waited
for up to the timeout, new ones answer 503, and one stuck in a worker thread past the timeout
answers 503 without waiting for its thread."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from lmserve.server.middleware.draining import DrainingMiddleware, InFlight, stop_serving


class ClosingFleet:
    def __init__(self):
        self.closed_with: list[float] = []

    async def close(self, drain_timeout: float = 0.0) -> None:
        self.closed_with.append(drain_timeout)


def app_with(requests: InFlight, release: threading.Event) -> Starlette:
    async def quick(request):
        await asyncio.sleep(0.2)
        return JSONResponse({"ok": True})

    async def compiling(request):  # a grammar compile that outlasts any timeout
        await anyio.to_thread.run_sync(release.wait, 30, abandon_on_cancel=True)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/quick", quick), Route("/compiling", compiling)])
    app.add_middleware(DrainingMiddleware, requests=requests)
    return app


def test_a_stop_waits_for_requests_in_flight_and_refuses_new_ones():
    requests, fleet = InFlight(), ClosingFleet()

    async def main():
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app_with(requests, threading.Event())),
                                   base_url="http://test")
        in_flight = asyncio.create_task(client.get("/quick"))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(stop_serving(requests, fleet, timeout=5))
        await asyncio.sleep(0.01)
        refused = await client.get("/quick")
        await stopping
        return (await in_flight), refused

    answered, refused = asyncio.run(main())
    assert answered.status_code == 200
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert fleet.closed_with == [0]


def test_past_the_timeout_a_request_stuck_in_a_worker_thread_answers_503_at_once():
    requests, fleet, release = InFlight(), ClosingFleet(), threading.Event()

    async def main():
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app_with(requests, release)), base_url="http://test")
        stuck = asyncio.create_task(client.get("/compiling"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await stop_serving(requests, fleet, timeout=0.3)
        return await stuck, time.monotonic() - started

    try:
        answer, seconds = asyncio.run(main())
    finally:
        release.set()  # lets the abandoned thread end
    assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
    assert seconds < 1.5 and len(requests) == 0
