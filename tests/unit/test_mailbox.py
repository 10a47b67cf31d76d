"""The replica's Outbox: one send for what a step's requests post together, the next only once
the last has returned (in order, larger when the ingress is slow), and flushed() reporting a
failed send."""

from __future__ import annotations

import asyncio

import pytest

from lmserve.request import RequestOutput
from lmserve.scale.mailbox import Mailbox, Outbox
from lmserve.scale.replica import ReplicaLoad

LOAD = ReplicaLoad(model="m", replica="a", num_running=1, num_waiting=0, num_kv_blocks=8, num_free_kv_blocks=8)


def output(request_id: str, token: int) -> list[RequestOutput]:
    return [RequestOutput(request_id, [token])]


def test_a_steps_posts_go_in_one_send_and_later_ones_wait_for_it():
    sent, release = [], asyncio.Event()

    async def send(batch):
        sent.append([(rid, outs[0].new_token_ids[0]) for rid, outs in batch])
        await release.wait()

    async def run():
        outbox = Outbox(send)
        outbox.post("a", output("a", 1))
        outbox.post("b", output("b", 1))  # same step: same send
        await asyncio.sleep(0.01)
        outbox.post("a", output("a", 2))  # while the first send is out: they wait, together
        outbox.post("b", output("b", 2))
        outbox.post("a", output("a", 3))
        await asyncio.sleep(0.01)
        assert len(sent) == 1
        release.set()
        await outbox.flushed()

    asyncio.run(run())
    assert sent == [[("a", 1), ("b", 1)], [("a", 2), ("b", 2), ("a", 3)]]


def test_flushed_raises_what_the_send_raised():
    async def send(batch):
        raise ConnectionError("the ingress is gone")

    async def run():
        outbox = Outbox(send)
        outbox.post("a", output("a", 1))
        with pytest.raises(ConnectionError):
            await outbox.flushed()

    asyncio.run(run())


def test_the_mailbox_hands_each_request_its_outputs_and_drops_the_rest():
    async def run():
        mailbox = Mailbox()
        inbox = mailbox.open("a")
        mailbox.deliver([("a", output("a", 1)), ("gone", output("gone", 1)), ("a", output("a", 2))], LOAD)
        await asyncio.sleep(0)
        got = [inbox.get_nowait(), inbox.get_nowait()]
        mailbox.close("a")
        mailbox.deliver([("a", output("a", 3))], LOAD)
        await asyncio.sleep(0)
        return got, inbox.qsize()

    got, left = asyncio.run(run())
    assert [(outs[0].new_token_ids, load) for outs, load in got] == [([1], LOAD), ([2], LOAD)] and left == 0
