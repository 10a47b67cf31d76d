"""AsyncEngine's drain and close, what a model manager calls to unload a model, without a model."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.step_types import EngineClosed
from lmserve.request import FinishReason, SamplingParams
from tests.helpers.fake_engine import CountingEngine


async def collect(engine, request_id, prompt=(1, 2)):
    return [o async for o in engine.generate(request_id, list(prompt), SamplingParams())]


async def until(condition, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_drain_refuses_new_requests_and_waits_for_the_running_ones():
    gate = threading.Event()
    engine = AsyncEngine(CountingEngine(length=3, gate=gate))

    async def main():
        running = asyncio.create_task(collect(engine, "a"))
        await until(lambda: engine.num_requests == 1)
        draining = asyncio.create_task(engine.drain())
        await asyncio.sleep(0.05)
        assert not draining.done()  # "a" has not finished
        [refused] = await collect(engine, "b")
        assert refused.finish_reason == FinishReason.ABORT and "unloaded" in refused.error
        gate.set()
        assert await asyncio.wait_for(draining, 5) is True
        return await running

    outputs = asyncio.run(main())
    engine.close()
    assert [o.new_token_ids for o in outputs] == [[1], [2], [3]] and outputs[-1].finish_reason == FinishReason.LENGTH


def test_drain_gives_up_after_its_timeout_and_close_aborts_what_still_runs():
    stub = CountingEngine(length=3, gate=threading.Event())  # never opened: "a" cannot finish
    engine = AsyncEngine(stub)

    async def main():
        running = asyncio.create_task(collect(engine, "a"))
        await until(lambda: engine.num_requests == 1)
        assert await engine.drain(timeout=0.1) is False
        engine.close()
        return await asyncio.wait_for(running, 5)

    [aborted] = asyncio.run(main())
    assert aborted.finish_reason == FinishReason.ABORT and "unloaded" in aborted.error
    assert stub.closed and not engine._thread.is_alive() and engine.model is None
    engine.close()  # a second close does nothing


def test_a_closed_engine_answers_new_requests_at_once():
    engine = AsyncEngine(CountingEngine())
    engine.close()
    [refused] = asyncio.run(asyncio.wait_for(collect(engine, "late"), 5))
    assert refused.finish_reason == FinishReason.ABORT and refused.num_prompt_tokens == 2


def test_a_refused_request_holds_no_lock_while_its_caller_is_paused():
    """The refusal is yielded with the engine's lock released: a caller holding the generator paused
    after it (writing the answer out) must not block close or drain, which take that lock."""
    engine = AsyncEngine(CountingEngine())
    engine.close()

    async def main():
        stream = engine.generate("late", [1, 2], SamplingParams())
        refused = await anext(stream)  # paused right after its one output
        closer = threading.Thread(target=engine.close)
        closer.start()
        closer.join(5)
        blocked = closer.is_alive()
        await stream.aclose()
        closer.join(5)
        return refused, blocked

    refused, blocked = asyncio.run(main())
    assert refused.finish_reason == FinishReason.ABORT and not blocked


def test_snapshot_reads_the_engines_load():
    engine = AsyncEngine(CountingEngine())
    try:
        assert engine.snapshot() == {"num_running": 0, "num_waiting": 0, "num_kv_blocks": 8, "num_free_kv_blocks": 8}
    finally:
        engine.close()


def test_engine_calls_answer_while_draining_raise_the_engines_errors_and_are_refused_once_closed():
    engine = AsyncEngine(CountingEngine())

    async def main():
        assert await engine.drain() is True
        assert await engine.forget_prefix([5, 6, 7]) == 3
        with pytest.raises(ValueError, match="nothing to forget"):
            await engine.forget_prefix([])

    asyncio.run(asyncio.wait_for(main(), 5))
    engine.close()
    with pytest.raises(EngineClosed):
        asyncio.run(engine.forget_prefix([1]))


def test_is_running_until_closed():
    engine = AsyncEngine(CountingEngine(length=2))
    outputs = asyncio.run(collect(engine, "a"))
    assert engine.is_running and outputs[-1].finish_reason == FinishReason.LENGTH
    engine.close()
    assert not engine.is_running
