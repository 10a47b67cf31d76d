"""Admission through the app: a full queue answers 429, a long wait 503, both with Retry-After;
clients take turns; /metrics shows the queue and the refusals."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.helpers.fake_engine import FakeEngine
from tests.helpers.prometheus import metric_samples
from tests.helpers.server import MODEL, make_app

KEYS = ("key-a", "key-b")


def prompt_of(call) -> str:
    """The user message of an engine call, as ByteTokenizer rendered it."""
    text = bytes(i - 2 for i in call[1] if i >= 2).decode()
    return text.removeprefix("user: ").split("\n")[0]


class Server:
    """The app over a FakeEngine whose requests wait for `hold`, and async clients of it."""

    def __init__(self, max_num_seqs=1, **state_fields):
        self.hold = asyncio.Event()
        self.engine = FakeEngine(max_num_seqs=max_num_seqs, hold=self.hold)
        self.app = make_app(self.engine, **state_fields)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")

    def chat(self, content: str, key: str | None = None, **fields) -> asyncio.Task:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **fields}
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return asyncio.ensure_future(self.http.post("/v1/chat/completions", json=body, headers=headers))

    async def metrics(self) -> dict:
        return metric_samples((await self.http.get("/metrics")).text)

    async def queued(self) -> float:
        return (await self.metrics())[("lmserve:num_requests_queued", (("model", MODEL),))]

    async def until_running(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.engine.calls) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        assert len(self.engine.calls) == count, f"{len(self.engine.calls)} requests running, not {count}"

    async def until_queued(self, count: int, timeout: float = 10.0) -> None:
        """Wait (up to `timeout` s: planning runs in worker threads, slow on a busy machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.queued() == count:
                return
            await asyncio.sleep(0.002)
        raise AssertionError(f"never {count} sequences queued")


def rejected(samples: dict, reason: str) -> float:
    return samples.get(("lmserve:requests_rejected_total", (("model", MODEL), ("reason", reason))), 0.0)


def test_a_full_queue_answers_429_with_retry_after_and_counts_n_choices():
    async def main():
        server = Server(max_num_seqs=1, max_queued_requests=3)
        running = server.chat("r")
        await server.until_running(1)  # planning runs in worker threads: make "r" the one that runs
        queued = [server.chat("q", n=2), server.chat("q")]
        await server.until_queued(3)
        refused = await server.chat("late")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["code"] == "queue_full"
        assert "3 sequences are already waiting (at most 3)" in refused.json()["error"]["message"]
        samples = await server.metrics()
        assert rejected(samples, "queue_full") == 1 and rejected(samples, "queue_timeout") == 0
        server.hold.set()
        assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200, 200, 200]
        assert await server.queued() == 0
    asyncio.run(main())


def test_a_request_that_waits_too_long_answers_503_with_retry_after():
    async def main():
        server = Server(max_num_seqs=1, queue_timeout=0.05)
        running = server.chat("r")
        await server.until_running(1)  # planning runs in worker threads: make "r" the one that runs
        late = await server.chat("late", stream=True)
        assert late.status_code == 503 and late.headers["Retry-After"] == "5"
        assert late.json()["error"]["code"] == "queue_timeout"
        assert rejected(await server.metrics(), "queue_timeout") == 1
        server.hold.set()
        assert (await running).status_code == 200
        assert [prompt_of(call) for call in server.engine.calls] == ["r"]  # the refused one never ran
    asyncio.run(main())


def test_a_burst_from_one_key_does_not_keep_another_key_waiting():
    """A's five requests are in (one running, four queued) before B's one: B's runs third, not sixth."""
    async def main():
        server = Server(max_num_seqs=1, api_keys=KEYS, max_queued_requests=16)
        burst = [server.chat(f"a{i}", "key-a") for i in range(5)]
        await server.until_queued(4)
        single = server.chat("b0", "key-b")
        await server.until_queued(5)
        server.hold.set()
        answers = await asyncio.gather(*burst, single)
        assert all(answer.status_code == 200 for answer in answers)
        return [prompt_of(call) for call in server.engine.calls]
    order = asyncio.run(main())  # A's five arrive in any order: they are planned concurrently
    assert order.index("b0") == 2  # after A's running request and one turn of A's
    assert sorted(order) == ["a0", "a1", "a2", "a3", "a4", "b0"]


def test_each_kind_of_answer_gives_its_turn_back():
    """One sequence at a time and a short queue timeout: a turn kept by a finished stream, a
    refused or a failed request would make the next request time out."""
    async def main():
        server = Server(max_num_seqs=1, queue_timeout=0.5)
        server.hold.set()
        stream = await server.chat("s", stream=True)
        assert stream.status_code == 200 and "[DONE]" in stream.text
        assert (await server.chat("x", stop=[""])).status_code == 400  # refused while planning
        server.engine.fail_after = 0
        assert (await server.chat("f")).status_code == 500
        server.engine.fail_after = None
        assert (await server.chat("t")).status_code == 200
    asyncio.run(main())


def test_a_request_of_many_choices_shares_the_engine_seat_by_seat():
    """A's n=4 on an engine of two seats runs two choices at a time, and B's request, sent while
    A's first two run, runs before A's last choice rather than after all of them."""
    async def main():
        server = Server(max_num_seqs=2, api_keys=KEYS, max_queued_requests=16)
        server.engine.reply = "a reply long enough to outlast the path from a seat to the engine " * 2
        live = peak = 0
        generate = server.engine.generate

        async def counted(*args):
            nonlocal live, peak
            live += 1
            peak = max(peak, live)
            try:
                async for output in generate(*args):
                    yield output
            finally:
                live -= 1

        server.engine.generate = counted
        many = server.chat("a", "key-a", n=4)
        await server.until_running(2)
        single = server.chat("b", "key-b")
        await server.until_queued(1)
        server.hold.set()
        answers = await asyncio.gather(many, single)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert [choice["index"] for choice in answers[0].json()["choices"]] == [0, 1, 2, 3]
        return [prompt_of(call) for call in server.engine.calls], peak
    order, peak = asyncio.run(main())
    assert peak == 2
    assert sorted(order) == ["a", "a", "a", "a", "b"] and order.index("b") < 4
