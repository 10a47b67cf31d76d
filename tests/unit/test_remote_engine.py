"""RemoteEngine, the ingress's view of a model served by Ray Serve replicas, over a stand-in
deployment handle whose calls deliver through the mailbox: outputs and loads arrive, a replica
lost before the first output is retried elsewhere, one lost after it ends that request alone,
and leaving early cancels."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import RequestCancelledError

from lmserve.config import EngineConfig, SchedulerConfig
from lmserve.engine.step_types import StepStats
from lmserve.request import FinishReason, RequestOutput, SamplingParams
from lmserve.scale import remote_engine
from lmserve.scale.mailbox import Mailbox
from lmserve.scale.remote_engine import RemoteEngine
from lmserve.scale.replica import EngineDescription, ReplicaLoad
from tests.helpers.fake_engine import Recorder

PROMPT = [1, 2, 3]


class Call:
    """One generate call, answered when awaited: its replica delivers `items` through the
    mailbox, then the call returns, or raises `error` (as a replica's death does)."""

    def __init__(self, mailbox: Mailbox, request_id: str, items, error: BaseException | None = None,
                 hold: asyncio.Event | None = None):
        self.mailbox, self.request_id = mailbox, request_id
        self.items, self.error, self.hold, self.cancelled = items, error, hold, False

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        for outputs, replica_load in self.items:
            self.mailbox.deliver([(self.request_id, outputs), ("someone-else", outputs)], replica_load)
            await asyncio.sleep(0)
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        return "replica"

    def cancel(self) -> None:
        self.cancelled = True
        if self.hold is not None:
            self.error = RequestCancelledError("r")
            self.hold.set()


class Handle:
    """A deployment handle whose generate calls answer the `scripts` in turn: (items, error, hold)."""

    def __init__(self, mailbox: Mailbox, *scripts):
        self.mailbox, self.scripts, self.calls, self.made = mailbox, list(scripts), [], []

    @property
    def generate(self) -> Handle:
        return self

    def remote(self, request_id, *args) -> Call:
        self.calls.append((request_id, *args))
        items, error, hold = (list(self.scripts.pop(0)) + [None, None])[:3]
        self.made.append(Call(self.mailbox, request_id, items, error, hold))
        return self.made[-1]



def description(num_kv_blocks: int = 100) -> EngineDescription:
    config = EngineConfig("model.gguf", "m", scheduler=SchedulerConfig(max_num_seqs=8))
    return EngineDescription(config=config, tokenizer=object(), vocab_size=10, max_model_len=64, kv_block_bytes=16,
                             num_kv_blocks=num_kv_blocks, weights_bytes=1000)


def load(replica: str, running: int = 1, free: int = 90) -> ReplicaLoad:
    return ReplicaLoad(model="m", replica=replica, num_running=running, num_waiting=0, num_kv_blocks=100, num_free_kv_blocks=free)


def token(index: int) -> RequestOutput:
    return RequestOutput("r", [index], text_delta=str(index))


def last(reason: FinishReason = FinishReason.LENGTH) -> RequestOutput:
    return RequestOutput("r", [9], text_delta="9", finish_reason=reason)


def collect(engine: RemoteEngine, limit: int | None = None) -> list[RequestOutput]:
    async def run():
        outputs = []
        stream = engine.generate("r", PROMPT, SamplingParams(max_tokens=4))
        async for output in stream:
            outputs.append(output)
            if limit is not None and len(outputs) == limit:
                await stream.aclose()
                break
        return outputs

    return asyncio.run(run())


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(remote_engine, "RETRY_BACKOFF_SECONDS", 0.0)


def engine_with(*scripts, **options) -> tuple[RemoteEngine, Handle]:
    mailbox = Mailbox()
    handle = Handle(mailbox, *scripts)
    return RemoteEngine(handle, description(options.pop("num_kv_blocks", 100)), mailbox, **options), handle


def test_outputs_arrive_through_the_mailbox_with_their_replicas_load():
    routed, observer = [], Recorder()
    engine, handle = engine_with(([([token(1), token(2)], load("a")), ([last()], load("a", running=0, free=99))],),
                                 num_replicas=3, observers=[observer], routed=routed.append)
    assert engine.config.scheduler.max_num_seqs == 24  # the ingress's queues are sized for every replica
    assert engine.snapshot()["num_kv_blocks"] == 300  # before any replica has answered
    outputs = collect(engine)
    assert [o.new_token_ids for o in outputs] == [[1], [2], [9]] and outputs[-1].finish_reason is FinishReason.LENGTH
    assert handle.calls == [("r", PROMPT, SamplingParams(max_tokens=4))]
    assert routed == ["a"]
    assert observer.events == [("added", "r"), ("step", None, [("r", [1])]), ("step", None, [("r", [2])]),
                               ("step", None, [("r", [9])])]
    assert engine.snapshot() == {"num_running": 0, "num_waiting": 0, "num_kv_blocks": 100, "num_free_kv_blocks": 99}


def test_the_load_sums_over_replicas():
    engine, _ = engine_with(([([last()], load("a", free=40))],), ([([last()], load("b", free=70))],))
    collect(engine)
    collect(engine)
    snapshot = engine.snapshot()
    assert (snapshot["num_kv_blocks"], snapshot["num_free_kv_blocks"]) == (200, 110)
    assert set(engine.replica_loads()) == {"a", "b"}


def test_a_replica_lost_before_the_first_output_is_retried():
    routed = []
    engine, handle = engine_with(([], ActorDiedError()), ([([last()], load("b"))],), routed=routed.append)
    outputs = collect(engine)
    assert len(handle.calls) == 2 and [o.finish_reason for o in outputs] == [FinishReason.LENGTH]
    assert routed == ["b"]


def test_a_replica_lost_after_output_ends_the_request_with_a_reason():
    engine, handle = engine_with(([([token(1)], load("a"))], ActorDiedError()), ([([last()], load("b"))],))
    outputs = collect(engine)
    assert len(handle.calls) == 1  # not sent again: its first tokens have reached the client
    assert outputs[-1].finish_reason is FinishReason.ABORT and "replica" in outputs[-1].error


def test_retries_stop_after_max_retries():
    engine, handle = engine_with(*[([], ActorDiedError())] * 3, max_retries=2)
    outputs = collect(engine)
    assert len(handle.calls) == 3 and outputs[-1].finish_reason is FinishReason.ABORT


def test_another_failure_of_the_replica_is_not_retried():
    engine, handle = engine_with(([], RuntimeError("the ingress is gone")), ([([last()], load("b"))],))
    outputs = collect(engine)
    assert len(handle.calls) == 1 and "the ingress is gone" in outputs[-1].error


def test_a_call_that_returns_without_the_last_output_is_a_failure():
    engine, _ = engine_with(([([token(1)], load("a"))],))
    outputs = collect(engine)
    assert outputs[-1].finish_reason is FinishReason.ABORT and "without its last output" in outputs[-1].error


def test_leaving_early_cancels_the_call_on_its_replica():
    observer = Recorder()
    engine, handle = engine_with(([([token(1)], load("a")), ([token(2)], load("a"))], None, asyncio.Event()),
                                 observers=[observer])
    assert len(collect(engine, limit=1)) == 1
    assert handle.made[0].cancelled and observer.events[-1] == ("aborted", "r")
    assert engine.num_requests == 0


def test_abort_cancels_and_the_request_ends_as_aborted():
    engine, handle = engine_with(([([token(1)], load("a"))], None, asyncio.Event()))

    async def run():
        outputs = []
        async for output in engine.generate("r", PROMPT, SamplingParams()):
            outputs.append(output)
            if len(outputs) == 1:
                engine.abort("r")
        return outputs

    outputs = asyncio.run(run())
    assert handle.made[0].cancelled and outputs[-1].finish_reason is FinishReason.ABORT
    assert outputs[-1].error == "the request was cancelled"


def test_once_closed_requests_end_at_once_with_the_reason():
    engine, handle = engine_with()
    engine.close("the server is shutting down")
    outputs = collect(engine)
    assert handle.calls == [] and outputs[0].finish_reason is FinishReason.ABORT
    assert outputs[0].error == "the server is shutting down"
    assert asyncio.run(engine.drain(0.1)) is True


def test_the_mailbox_refuses_a_request_id_twice():
    async def run():
        mailbox = Mailbox()
        mailbox.open("r")
        with pytest.raises(ValueError, match="already running"):
            mailbox.open("r")

    asyncio.run(run())


def test_step_stats_reach_each_replicas_observer():
    observers = {"a": Recorder(), "b": Recorder()}
    asked = []

    def stats_observer(replica):
        asked.append(replica)
        return observers[replica]

    async def run():
        mailbox = Mailbox()
        RemoteEngine(Handle(mailbox), description(), mailbox, stats_observer=stats_observer)
        mailbox.deliver([], load("a"), [StepStats(num_scheduled_tokens=3), StepStats(num_scheduled_tokens=1)])
        mailbox.deliver([], load("b"), [StepStats(num_scheduled_tokens=5)])
        # the model connected again (unloaded, then loaded): its replicas' stats go on to the same observers
        RemoteEngine(Handle(mailbox), description(), mailbox, stats_observer=stats_observer)
        mailbox.deliver([], load("a"), [StepStats(num_scheduled_tokens=2)])
        mailbox.deliver([], ReplicaLoad(model="another", replica="c", num_running=0, num_waiting=0,
                                        num_kv_blocks=1, num_free_kv_blocks=1), [StepStats(num_scheduled_tokens=9)])

    asyncio.run(run())
    assert [event[1] for event in observers["a"].events] == [3, 1, 2]
    assert [event[1] for event in observers["b"].events] == [5]
    assert "c" not in asked  # another model's replica: not this model's observers


def test_leaving_early_closes_the_requests_inbox_at_once():
    engine, handle = engine_with(([([token(1)], load("a")), ([token(2)], load("a"))], None, asyncio.Event()))

    async def run():
        stream = engine.generate("r", PROMPT, SamplingParams())
        await anext(stream)
        await stream.aclose()
        handle.mailbox.deliver([("r", [token(3)])], load("a"))  # a late batch for it: dropped, no error
        handle.mailbox.open("r")  # its id is free at once (raises while the inbox is still open)

    asyncio.run(run())
