"""Admission: how many sequences a model's engine is given at once, whose sequence goes next, and
when a request is told to come back later instead of waiting without end.

A request runs as many sequences as it has choices (n per prompt), and each sequence needs a seat:
a model's gate hands out at most `max_running` seats at once. Requests that wait queue per client
(its API key, else its address), and the clients' lines take turns a seat at a time: each seat
handed out passes the turn to the next line, so a burst from one client costs a newcomer one
sequence's turn, not the whole burst, and a request of many choices (n=16, or n=128 on an engine of
64 seats) runs its sequences as seats come free, side by side with everyone else's, instead of
waiting for the engine to empty and then holding all of it. A request starts with its first seat.

A request not yet started that would push the queue past `max_queued` sequences is refused at once
(QueueFull), unless another client holds more of the queue than it would: then that client's
newest waiting request is refused instead (pushed out), so one client's burst cannot fill the
queue against the others either. A request still not started after `queue_timeout` seconds is
refused then (QueueTimeout). A started request is never refused: its other sequences wait for
their turns.

Invariants, on the event loop (no locks: nothing here awaits between reading and writing):
- num_running is the number of seats handed out and not yet given back;
- num_queued is the sum of the sequences of the requests not yet started, at most max_queued,
  except that one request larger than the whole queue may still wait alone;
- while any request waits in a line, every seat is taken (wake hands out free seats at once).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

# The queue holds this many turns of what the engine can run at once: the last request queued
# starts after about four full batches have finished, within the default queue timeout for
# ordinary chat lengths; past that a client is better told to retry than held.
QUEUE_BATCHES = 4
# Most HTTP proxies give up on a silent upstream after 60 s (nginx's proxy_read_timeout); a request
# that has not started by then is usually already abandoned, so it is told to retry instead.
DEFAULT_QUEUE_TIMEOUT = 60.0


class QueueFull(Exception):
    """The request would make the queue longer than max_queued sequences."""


class QueueTimeout(Exception):
    """The request waited queue_timeout seconds without starting."""


@dataclass(frozen=True, kw_only=True)
class AdmissionLimits:
    max_running: int  # sequences in the engine at once
    max_queued: int  # sequences waiting for a turn
    queue_timeout: float | None  # seconds a request may wait to start; None: no limit

    @classmethod
    def sized_for(cls, *, max_num_seqs: int, num_kv_blocks: int, max_queued: int | None,
                  queue_timeout: float | None) -> AdmissionLimits:
        """What an engine runs at once: at most max_num_seqs sequences, and no more than it has KV
        blocks (each running sequence holds one at least). The queue, unless given: QUEUE_BATCHES
        times that."""
        max_running = max(1, min(max_num_seqs, num_kv_blocks))
        return cls(max_running=max_running, max_queued=max_queued or QUEUE_BATCHES * max_running,
                   queue_timeout=queue_timeout)


class Ticket:
    """A request's seats on the engine, one per sequence while it runs: `seat()` before a sequence
    starts, `stand()` when it ends, `release()` when the request is done (seats and any place
    still held in the queue go back; once only)."""

    def __init__(self, gate: AdmissionGate, client: str, num_seqs: int):
        self.gate = gate
        self.client = client
        self.num_seqs = num_seqs
        self.num_unseated = num_seqs  # sequences still waiting for a seat to be handed over
        self.num_free = 0  # seats handed over that no sequence has taken yet
        self.num_held = 0  # seats handed over and not given back
        self.released = False
        self.started: asyncio.Future = asyncio.get_running_loop().create_future()  # set by the first seat
        self._granted = asyncio.Event()  # a seat was handed over

    async def seat(self) -> None:
        """Take a seat for one more sequence, waiting for the client's turn if none is free."""
        while not self.num_free:
            self._granted.clear()
            await self._granted.wait()
        self.num_free -= 1

    def stand(self) -> None:
        """A sequence ended: its seat goes to the next in turn."""
        if not self.released and self.num_held:
            self.num_held -= 1
            self.gate.num_running -= 1
            self.gate.wake()

    def release(self) -> None:
        """Give every seat back and leave the queue; once only."""
        if self.released:
            return
        self.released = True
        self.gate.num_running -= self.num_held
        self.num_held = self.num_free = 0
        if self.num_unseated:
            self.gate._leave(self)  # wakes the next
        else:
            self.gate.wake()

    def _hand_seat(self) -> None:
        self.num_unseated -= 1
        self.num_free += 1
        self.num_held += 1
        self.gate.num_running += 1
        self._granted.set()


class AdmissionGate:
    """One model engine's admission, shared by every request for that engine."""

    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self.num_running = 0  # seats handed out
        self.num_queued = 0  # sequences of the requests not yet started
        self._lines: dict[str, deque[Ticket]] = {}  # by client; dict order is the turn order

    async def admit(self, client: str, num_seqs: int) -> Ticket:
        """A ticket for a request of `num_seqs` sequences, once its first has a seat (it may hold more
        already); release it when the request is done. QueueFull or QueueTimeout when the request
        is refused."""
        ticket = Ticket(self, client, num_seqs)
        if not self._lines and self._has_room():
            self._start(ticket)
            while ticket.num_unseated and self._has_room():
                ticket._hand_seat()
            if ticket.num_unseated:
                self._lines[client] = deque([ticket])
            return ticket
        if not self._make_room(client, num_seqs):
            raise QueueFull(f"{self.num_queued} sequences are already waiting (at most {self.limits.max_queued})")
        self._lines.setdefault(client, deque()).append(ticket)
        self.num_queued += num_seqs
        return await self._wait(ticket)

    def refuses(self, client: str, num_seqs: int = 1) -> bool:
        """Whether `admit` would refuse `num_seqs` sequences of `client`'s now: asked before a request
        is planned, so that a full queue costs a refused request no work."""
        if not self.num_queued or self.num_queued + num_seqs <= self.limits.max_queued:
            return False
        return max(map(self._num_waiting, self._lines)) <= self._num_waiting(client) + num_seqs

    async def _wait(self, ticket: Ticket) -> Ticket:
        started = time.monotonic()
        try:
            # Shielded: a timeout or a cancellation must not cancel a start being handed over.
            await asyncio.wait_for(asyncio.shield(ticket.started), self.limits.queue_timeout)
            return ticket
        except QueueFull:  # pushed out by another client's request
            raise
        except TimeoutError:
            if ticket.started.done():  # started, or pushed out, as the time ran out
                ticket.started.result()
                return ticket
            self._leave(ticket)
            raise QueueTimeout(f"waited {time.monotonic() - started:.0f} s without starting "
                               f"(at most {self.limits.queue_timeout:g} s)") from None
        except BaseException:  # cancelled: its client went away
            if not ticket.started.done():
                self._leave(ticket)
            elif ticket.started.exception() is None:
                ticket.release()
            raise

    def wake(self) -> None:
        """Hand free seats to the waiting requests, a seat per line in turn."""
        while self._lines and self._has_room():
            client, line = next(iter(self._lines.items()))
            ticket = line[0]
            if not ticket.started.done():
                self._start(ticket)
                self.num_queued -= ticket.num_seqs
            ticket._hand_seat()
            del self._lines[client]
            if not ticket.num_unseated:
                line.popleft()
            if line:  # to the back: the next client's turn
                self._lines[client] = line

    def _make_room(self, client: str, num_seqs: int) -> bool:
        """Whether `num_seqs` more sequences of `client`'s may wait, pushing out the newest requests
        not yet started of a client holding more of the queue than `client` then would."""
        if not self.num_queued:
            return True  # a request larger than the whole queue may still wait alone
        own = self._num_waiting(client) + num_seqs
        while self.num_queued + num_seqs > self.limits.max_queued:
            heaviest = max(self._lines, key=self._num_waiting)
            if self._num_waiting(heaviest) <= own:
                return False
            victim = self._lines[heaviest][-1]  # not started: only a line's first can be
            self._leave(victim)
            victim.started.set_exception(QueueFull(
                f"pushed out of a full queue ({self.limits.max_queued} sequences) by another client's request: "
                "this client had the most waiting"))
        return True

    def _num_waiting(self, client: str) -> int:
        """The sequences of `client`'s requests not yet started."""
        return sum(ticket.num_seqs for ticket in self._lines.get(client, ()) if not ticket.started.done())

    def _has_room(self) -> bool:
        return self.num_running < self.limits.max_running

    @staticmethod
    def _start(ticket: Ticket) -> None:
        ticket.started.set_result(None)

    def _leave(self, ticket: Ticket) -> None:
        line = self._lines.get(ticket.client)
        if line is not None and ticket in line:
            line.remove(ticket)
            if not line:
                del self._lines[ticket.client]
            if not ticket.started.done():
                self.num_queued -= ticket.num_seqs
        ticket.num_unseated = 0
        self.wake()  # seats it had, or its place, may let others in


@dataclass
class SeatedEngine:
    """The engine as one admitted request sees it: each of its sequences takes a seat of the
    request's ticket before it starts and gives it back when it ends. Other attributes are the
    engine's own."""

    engine: Any
    ticket: Ticket

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, request_id: str, prompt_ids: list[int], params: Any) -> AsyncIterator[Any]:
        await self.ticket.seat()
        try:
            async with aclosing(self.engine.generate(request_id, prompt_ids, params)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self.ticket.stand()
