"""How outputs travel from the replicas to the ingress: a few messages a step, not one a token.

A request is a deployment-handle call to its replica (routed, counted, cancelled and failed by
Ray Serve as any call), but its tokens do not stream back through that call: each message
through Ray costs the replica and the ingress about a millisecond of CPU, which at 32 streams is
most of a core (bench/RESULTS.md, 2026-12-03, seventh sitting). Instead a replica's Outbox
gathers what every request produced in a step and sends it to the ingress's `deliver` in one
call, and the next batch only once that call has returned, so batches stay in order and grow
when the ingress falls behind. The ingress's Mailbox hands each request its outputs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from lmserve.request import RequestOutput

log = logging.getLogger("lmserve.scale")

Batch = list[tuple[str, list[RequestOutput]]]  # (request id, its new outputs), in order


class Mailbox:
    """The ingress's side: one inbox per request in flight. Items are (outputs, load)."""

    def __init__(self) -> None:
        self._inboxes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats_sinks: dict[str, Callable[[str, list], None]] = {}

    def on_stats(self, model: str, sink: Callable[[str, list], None]) -> None:
        """`sink(replica, step stats)` hears the step stats of `model`'s replicas."""
        self._stats_sinks[model] = sink

    def open(self, request_id: str) -> asyncio.Queue:
        if request_id in self._inboxes:
            raise ValueError(f"request id {request_id!r} is already running")
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[request_id] = (asyncio.get_running_loop(), inbox)
        return inbox

    def close(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)

    def deliver(self, batch: Batch, load: Any, stats: list | None = None) -> None:
        """A replica's batch (any thread): outputs of requests no longer waiting are dropped;
        `load` (replica.ReplicaLoad) says whose it is, `stats` are its steps' since its last."""
        sink = self._stats_sinks.get(load.model)
        if stats and sink is not None:
            sink(load.replica, stats)
        for request_id, outputs in batch:
            target = self._inboxes.get(request_id)
            if target is not None:
                loop, inbox = target
                loop.call_soon_threadsafe(inbox.put_nowait, (outputs, load))


class Outbox:
    """The replica's side: outputs posted by its requests, sent as one batch per send."""

    def __init__(self, send: Callable[[Batch], Awaitable[None]]):
        self._send = send
        self._pending: Batch = []
        self._sending: asyncio.Task | None = None

    def post(self, request_id: str, outputs: list[RequestOutput]) -> None:
        self._pending.append((request_id, outputs))
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._send_all())

    async def flushed(self) -> None:
        """Returns once everything posted so far has been sent (raises what sending raised)."""
        while self._sending is not None and not self._sending.done():
            await asyncio.shield(self._sending)
        if self._sending is not None and self._sending.done() and not self._sending.cancelled():
            self._sending.result()

    async def _send_all(self) -> None:
        await asyncio.sleep(0)  # the step's other requests, woken with this one, post theirs first
        while self._pending:
            batch, self._pending = self._pending, []
            await self._send(batch)
