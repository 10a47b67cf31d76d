"""AdmissionGate on its own: the running budget, the bounded queue, the queue timeout and the
clients' turns."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.server.admission import AdmissionGate, AdmissionLimits, QueueFull, QueueTimeout


def gate(max_running=2, max_queued=4, queue_timeout=None) -> AdmissionGate:
    return AdmissionGate(AdmissionLimits(max_running=max_running, max_queued=max_queued, queue_timeout=queue_timeout))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_default_limits_follow_the_engine_and_its_kv_blocks():
    assert AdmissionLimits.sized_for(max_num_seqs=64, num_kv_blocks=4096, max_queued=None, queue_timeout=None) == \
        AdmissionLimits(max_running=64, max_queued=256, queue_timeout=None)
    assert AdmissionLimits.sized_for(max_num_seqs=64, num_kv_blocks=10, max_queued=None, queue_timeout=5.0) == \
        AdmissionLimits(max_running=10, max_queued=40, queue_timeout=5.0)
    assert AdmissionLimits.sized_for(max_num_seqs=4, num_kv_blocks=8, max_queued=3, queue_timeout=None).max_queued == 3


def test_a_request_starts_with_its_first_seat_and_its_others_follow_as_seats_free_up():
    async def main():
        g = gate(max_running=3)
        first = await g.admit("a", 2)
        assert (first.num_free, first.num_unseated, g.num_running) == (2, 0, 2)
        second = await g.admit("b", 2)  # one seat is free: it starts with it
        assert (second.num_free, second.num_unseated, g.num_running, g.num_queued) == (1, 1, 3, 0)
        await second.seat()
        waiting = asyncio.ensure_future(second.seat())
        await settle()
        assert not waiting.done()
        await first.seat()
        first.stand()  # a's sequence ends: its seat is b's
        await waiting
        assert g.num_running == 3 and second.num_unseated == 0
        second.release()
        second.release()  # once only
        assert g.num_running == 1
        first.release()
        assert g.num_running == 0
    asyncio.run(main())


def test_a_request_larger_than_the_engine_runs_its_sequences_in_turn_with_the_others():
    """B's eight sequences on an engine of two seats start beside A's one; C's single sequence,
    arriving later, gets the second seat that comes free, not the seventh."""
    async def main():
        g = gate(max_running=2, max_queued=4)
        small = await g.admit("a", 1)
        large = await g.admit("b", 8)  # larger than the whole queue, and it starts at once
        assert (large.num_free, large.num_unseated, g.num_running) == (1, 7, 2)
        late = asyncio.ensure_future(g.admit("c", 1))
        await settle()
        assert not late.done() and g.num_queued == 1
        small.release()  # b's turn
        await large.seat()
        await large.seat()
        await settle()
        assert not late.done()
        large.stand()  # c's turn
        await settle()
        assert late.done() and g.num_running == 2 and large.num_unseated == 6
        large.release()
        late.result().release()
        assert g.num_running == 0 and g.num_queued == 0
    asyncio.run(main())


def test_seats_never_exceed_the_engine_whatever_the_requests():
    async def main():
        g = gate(max_running=3, max_queued=64)
        peak = 0

        async def sequence(ticket):
            nonlocal peak
            await ticket.seat()
            peak = max(peak, g.num_running)
            await asyncio.sleep(0)
            ticket.stand()

        async def request(client, n):
            ticket = await g.admit(client, n)
            await asyncio.gather(*(sequence(ticket) for _ in range(n)))
            ticket.release()

        await asyncio.gather(*(request(f"c{i % 3}", 1 + i % 5) for i in range(12)))
        assert peak == 3 and g.num_running == 0 and g.num_queued == 0
    asyncio.run(main())


def test_a_full_queue_refuses_at_once():
    async def main():
        g = gate(max_running=1, max_queued=3)
        await g.admit("a", 1)
        queued = [asyncio.ensure_future(g.admit("a", 1)) for _ in range(3)]
        await settle()
        assert g.refuses("a") and not g.refuses("b")  # B would push one of A's out
        with pytest.raises(QueueFull, match="3 sequences are already waiting"):
            await g.admit("a", 1)
        assert g.num_queued == 3
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        assert g.num_queued == 0 and g.num_running == 1
    asyncio.run(main())


def test_a_client_filling_the_queue_is_pushed_out_of_it_by_the_others():
    """A holds the whole queue; B and C each take a place from A's newest requests; D finds every
    client holding no more than it would, and is refused."""
    async def main():
        g = gate(max_running=1, max_queued=3)
        await g.admit("a", 1)
        a = [asyncio.ensure_future(g.admit("a", 1)) for _ in range(3)]
        await settle()
        b = asyncio.ensure_future(g.admit("b", 1))
        c = asyncio.ensure_future(g.admit("c", 1))
        await settle()
        assert [task.done() for task in a] == [False, True, True]
        for task in a[1:]:
            with pytest.raises(QueueFull, match="pushed out .* this client had the most waiting"):
                task.result()
        assert g.refuses("d")
        with pytest.raises(QueueFull, match="3 sequences are already waiting"):
            await g.admit("d", 1)
        assert g.num_queued == 3 and not b.done() and not c.done()
        for task in (a[0], b, c):
            task.cancel()
        await asyncio.gather(a[0], b, c, return_exceptions=True)
    asyncio.run(main())


def test_n_choices_count_as_n_sequences_in_the_queue():
    async def main():
        g = gate(max_running=1, max_queued=4)
        await g.admit("a", 1)
        queued = asyncio.ensure_future(g.admit("a", 3))
        await settle()
        with pytest.raises(QueueFull):
            await g.admit("a", 2)  # 3 + 2 > 4
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
    asyncio.run(main())


def test_a_request_waiting_too_long_is_refused_and_leaves_the_queue():
    async def main():
        g = gate(max_running=1, queue_timeout=0.05)
        held = await g.admit("a", 1)
        with pytest.raises(QueueTimeout, match="at most 0.05 s"):
            await g.admit("b", 1)
        assert g.num_queued == 0
        held.release()
        assert g.num_running == 0
    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_place_back():
    async def main():
        g = gate(max_running=1, max_queued=8)
        held = await g.admit("a", 1)
        big = asyncio.ensure_future(g.admit("a", 2))
        small = asyncio.ensure_future(g.admit("b", 1))
        await settle()
        assert g.num_queued == 3
        big.cancel()
        await asyncio.gather(big, return_exceptions=True)
        assert g.num_queued == 1 and not small.done()
        held.release()
        await settle()
        assert small.done() and g.num_running == 1 and g.num_queued == 0
    asyncio.run(main())


def test_a_ticket_handed_to_a_cancelled_waiter_is_released():
    async def main():
        g = gate(max_running=1)
        held = await g.admit("a", 1)
        waiting = asyncio.ensure_future(g.admit("b", 1))
        await settle()
        held.release()  # hands `waiting` its ticket ...
        waiting.cancel()  # ... which is cancelled before it runs again
        await asyncio.gather(waiting, return_exceptions=True)
        assert g.num_running == 0 and g.num_queued == 0
    asyncio.run(main())


def test_clients_take_turns_rather_than_first_come_first_served():
    """A's burst of six queued before B's one request and C's two; one at a time, B goes second."""
    async def main():
        g = gate(max_running=1, max_queued=16)
        order: list[str] = []

        async def run(client: str, tag: str) -> None:
            ticket = await g.admit(client, 1)
            order.append(tag)
            await asyncio.sleep(0)
            ticket.release()

        held = await g.admit("a", 1)
        tasks = [asyncio.ensure_future(run("a", f"a{i}")) for i in range(6)]
        await settle()
        tasks += [asyncio.ensure_future(run("b", "b0")), asyncio.ensure_future(run("c", "c0")),
                  asyncio.ensure_future(run("c", "c1"))]
        await settle()
        held.release()
        await asyncio.gather(*tasks)
        return order
    assert asyncio.run(main()) == ["a0", "b0", "c0", "a1", "c1", "a2", "a3", "a4", "a5"]
