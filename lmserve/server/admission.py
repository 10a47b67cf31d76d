"""Admission: how many sequences a model's engine is given at once, whose request goes next, and
when a request is told to come back later instead of waiting without end.

A request costs as many sequences as it has choices (n per prompt). A model's gate lets requests
into its engine while their sequences fit under `max_running`; the others wait. Waiting requests
queue per client (its API key, else its address), and the clients' lines take turns: each
admission hands the turn to the next line, so a burst from one client costs a newcomer one turn,
not the whole burst. A request that would push the waiting sequences past `max_queued` is refused
at once (QueueFull), unless another client holds more of the queue than it would: then that
client's newest waiting request is refused instead (pushed out), so one client's burst cannot
fill the queue against the others either. A request still waiting after `queue_timeout` seconds
is refused then (QueueTimeout).

Invariants, on the event loop (no locks: nothing here awaits between reading and writing):
- num_running is the sum of the sequences of the tickets handed out and not yet released;
- num_queued is the sum of the waiting requests' sequences, at most max_queued, except that one
  request larger than the whole queue may still wait alone;
- the line whose turn it is blocks the others while its first request does not fit (nobody skips
  ahead), so a request of many sequences is never starved by a stream of small ones. A request
  larger than max_running is let in alone, once the engine is empty.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

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


@dataclass(eq=False)
class Ticket:
    """A request's place in the engine: `num_seqs` of the gate's running sequences, until released."""

    gate: AdmissionGate
    num_seqs: int
    released: bool = False

    def release(self) -> None:
        """Give the sequences back and let the next waiting request in; once only."""
        if not self.released:
            self.released = True
            self.gate.num_running -= self.num_seqs
            self.gate.wake()


@dataclass(eq=False)
class _Waiter:
    client: str
    num_seqs: int
    admitted: asyncio.Future = field(repr=False)  # its Ticket, once let in


class AdmissionGate:
    """One model engine's admission, shared by every request for that engine."""

    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self.num_running = 0  # sequences of the tickets out
        self.num_queued = 0  # sequences of the waiting requests
        self._lines: dict[str, deque[_Waiter]] = {}  # by client; dict order is the turn order

    async def admit(self, client: str, num_seqs: int) -> Ticket:
        """A ticket for `num_seqs` sequences once it is `client`'s turn and they fit; release it
        when the request is done. QueueFull or QueueTimeout when the request is refused."""
        if not self._lines and self._fits(num_seqs):
            return self._start(num_seqs)
        if not self._make_room(client, num_seqs):
            raise QueueFull(f"{self.num_queued} sequences are already waiting (at most {self.limits.max_queued})")
        waiter = _Waiter(client, num_seqs, asyncio.get_running_loop().create_future())
        self._lines.setdefault(client, deque()).append(waiter)
        self.num_queued += num_seqs
        return await self._wait(waiter)

    def refuses(self, client: str, num_seqs: int = 1) -> bool:
        """Whether `admit` would refuse `num_seqs` sequences of `client`'s now: asked before a request
        is planned, so that a full queue costs a refused request no work."""
        if not self.num_queued or self.num_queued + num_seqs <= self.limits.max_queued:
            return False
        return max(map(self._num_waiting, self._lines)) <= self._num_waiting(client) + num_seqs

    async def _wait(self, waiter: _Waiter) -> Ticket:
        started = time.monotonic()
        try:
            # Shielded: a timeout or a cancellation must not cancel a ticket being handed over.
            return await asyncio.wait_for(asyncio.shield(waiter.admitted), self.limits.queue_timeout)
        except QueueFull:  # pushed out by another client's request
            raise
        except TimeoutError:
            if waiter.admitted.done():  # let in, or pushed out, as the time ran out
                return waiter.admitted.result()
            self._leave(waiter)
            raise QueueTimeout(f"waited {time.monotonic() - started:.0f} s without starting "
                               f"(at most {self.limits.queue_timeout:g} s)") from None
        except BaseException:  # cancelled: its client went away
            if not waiter.admitted.done():
                self._leave(waiter)
            elif waiter.admitted.exception() is None:
                waiter.admitted.result().release()
            raise

    def wake(self) -> None:
        """Let in waiting requests, a line at a time, while the first of the line whose turn it is fits."""
        while self._lines:
            client, line = next(iter(self._lines.items()))
            if not self._fits(line[0].num_seqs):
                return
            waiter = line.popleft()
            del self._lines[client]
            if line:  # to the back: the next client's turn
                self._lines[client] = line
            self.num_queued -= waiter.num_seqs
            waiter.admitted.set_result(self._start(waiter.num_seqs))

    def _make_room(self, client: str, num_seqs: int) -> bool:
        """Whether `num_seqs` more sequences of `client`'s may wait, pushing out the newest requests
        of a client holding more of the queue than `client` then would."""
        if not self.num_queued:
            return True  # a request larger than the whole queue may still wait alone
        own = self._num_waiting(client) + num_seqs
        while self.num_queued + num_seqs > self.limits.max_queued:
            heaviest = max(self._lines, key=self._num_waiting)
            if self._num_waiting(heaviest) <= own:
                return False
            victim = self._lines[heaviest][-1]
            self._leave(victim)
            victim.admitted.set_exception(QueueFull(
                f"pushed out of a full queue ({self.limits.max_queued} sequences) by another client's request: "
                "this client had the most waiting"))
        return True

    def _num_waiting(self, client: str) -> int:
        return sum(waiter.num_seqs for waiter in self._lines.get(client, ()))

    def _fits(self, num_seqs: int) -> bool:
        return self.num_running == 0 or self.num_running + num_seqs <= self.limits.max_running

    def _start(self, num_seqs: int) -> Ticket:
        self.num_running += num_seqs
        return Ticket(self, num_seqs)

    def _leave(self, waiter: _Waiter) -> None:
        line = self._lines[waiter.client]
        line.remove(waiter)
        if not line:
            del self._lines[waiter.client]
        self.num_queued -= waiter.num_seqs
        self.wake()  # it may have been the request that blocked the others
