"""RemoteEngine, the ingress's view of a model served by Ray Serve replicas, over a stand-in
deployment handle: outputs and loads stream through, a replica lost before the first output is
retried elsewhere, one lost after it ends that request alone, and leaving early cancels."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import RequestCancelledError

from lmserve.config import EngineConfig, SchedulerConfig
from lmserve.request import FinishReason, RequestOutput, SamplingParams
from lmserve.scale import remote_engine
from lmserve.scale.remote_engine import RemoteEngine
from lmserve.scale.replica import EngineDescription, ReplicaLoad

PROMPT = [1, 2, 3]


class Stream:
    """One call's answer: `items` then, if given, `error` raised (as a replica's death is)."""

    def __init__(self, items, error: BaseException | None = None, hold: asyncio.Event | None = None):
        self.items, self.error, self.hold, self.cancelled = items, error, hold, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for item in self.items:
            yield item
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True
        if self.hold is not None:
            self.error = RequestCancelledError("r")
            self.hold.set()


class Handle:
    """A deployment handle whose generate calls answer `streams` in turn."""

    def __init__(self, *streams: Stream):
        self.streams, self.calls = list(streams), []

    def options(self, stream: bool) -> Handle:
        assert stream
        return self

    @property
    def generate(self) -> Handle:
        return self

    def remote(self, *args) -> Stream:
        self.calls.append(args)
        return self.streams.pop(0)


class Observer:
    def __init__(self):
        self.events = []

    def request_added(self, request_id, now):
        self.events.append(("added", request_id))

    def request_aborted(self, request_id):
        self.events.append(("aborted", request_id))

    def step_done(self, stats, outputs, now):
        self.events.append(("outputs", [output.finish_reason for output in outputs]))


def description(num_kv_blocks: int = 100) -> EngineDescription:
    config = EngineConfig("model.gguf", "m", scheduler=SchedulerConfig(max_num_seqs=8))
    return EngineDescription(config=config, tokenizer=object(), vocab_size=10, max_model_len=64, kv_block_bytes=16,
                             num_kv_blocks=num_kv_blocks, weights_bytes=1000)


def load(replica: str, running: int = 1, free: int = 90) -> ReplicaLoad:
    return ReplicaLoad(replica=replica, num_running=running, num_waiting=0, num_kv_blocks=100, num_free_kv_blocks=free)


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


def test_outputs_stream_with_their_replicas_load():
    routed, observer = [], Observer()
    handle = Handle(Stream([([token(1), token(2)], load("a")), ([last()], load("a", running=0, free=99))]))
    engine = RemoteEngine(handle, description(), num_replicas=3, observers=[observer], routed=routed.append)
    assert engine.config.scheduler.max_num_seqs == 24  # the ingress's queues are sized for every replica
    assert engine.snapshot()["num_kv_blocks"] == 300  # before any replica has answered
    outputs = collect(engine)
    assert [o.new_token_ids for o in outputs] == [[1], [2], [9]] and outputs[-1].finish_reason is FinishReason.LENGTH
    assert handle.calls == [("r", PROMPT, SamplingParams(max_tokens=4))]
    assert routed == ["a"]
    assert observer.events == [("added", "r"), ("outputs", [None]), ("outputs", [None]),
                               ("outputs", [FinishReason.LENGTH])]
    assert engine.snapshot() == {"num_running": 0, "num_waiting": 0, "num_kv_blocks": 100, "num_free_kv_blocks": 99}


def test_the_load_sums_over_replicas():
    engine = RemoteEngine(Handle(Stream([([last()], load("a", free=40))]), Stream([([last()], load("b", free=70))])),
                          description())
    collect(engine)
    collect(engine)
    snapshot = engine.snapshot()
    assert (snapshot["num_kv_blocks"], snapshot["num_free_kv_blocks"]) == (200, 110)
    assert set(engine.replica_loads()) == {"a", "b"}


def test_a_replica_lost_before_the_first_output_is_retried():
    handle = Handle(Stream([], ActorDiedError()), Stream([([last()], load("b"))]))
    routed = []
    outputs = collect(RemoteEngine(handle, description(), routed=routed.append))
    assert len(handle.calls) == 2 and [o.finish_reason for o in outputs] == [FinishReason.LENGTH]
    assert routed == ["b"]


def test_a_replica_lost_after_output_ends_the_request_with_a_reason():
    handle = Handle(Stream([([token(1)], load("a"))], ActorDiedError()), Stream([([last()], load("b"))]))
    outputs = collect(RemoteEngine(handle, description()))
    assert len(handle.calls) == 1  # not sent again: its first tokens have reached the client
    assert outputs[-1].finish_reason is FinishReason.ABORT and "replica" in outputs[-1].error


def test_retries_stop_after_max_retries():
    handle = Handle(*(Stream([], ActorDiedError()) for _ in range(3)))
    outputs = collect(RemoteEngine(handle, description(), max_retries=2))
    assert len(handle.calls) == 3 and outputs[-1].finish_reason is FinishReason.ABORT


def test_a_stream_cut_short_without_its_last_output_is_a_failure():
    handle = Handle(Stream([([token(1)], load("a"))]))
    outputs = collect(RemoteEngine(handle, description()))
    assert outputs[-1].finish_reason is FinishReason.ABORT and "before the last output" in outputs[-1].error


def test_leaving_early_cancels_the_call_on_its_replica():
    stream, observer = Stream([([token(1)], load("a")), ([token(2)], load("a")), ([last()], load("a"))]), Observer()
    engine = RemoteEngine(Handle(stream), description(), observers=[observer])
    assert len(collect(engine, limit=1)) == 1
    assert stream.cancelled and observer.events[-1] == ("aborted", "r")
    assert engine.num_requests == 0


def test_abort_cancels_and_the_request_ends_as_aborted():
    hold = asyncio.Event()
    stream = Stream([([token(1)], load("a"))], hold=hold)
    engine = RemoteEngine(Handle(stream), description())

    async def run():
        outputs = []
        async for output in engine.generate("r", PROMPT, SamplingParams()):
            outputs.append(output)
            if len(outputs) == 1:
                engine.abort("r")
        return outputs

    outputs = asyncio.run(run())
    assert stream.cancelled and outputs[-1].finish_reason is FinishReason.ABORT
    assert outputs[-1].error == "the request was cancelled"


def test_once_closed_requests_end_at_once_with_the_reason():
    handle = Handle()
    engine = RemoteEngine(handle, description())
    engine.close("the server is shutting down")
    outputs = collect(engine)
    assert handle.calls == [] and outputs[0].finish_reason is FinishReason.ABORT
    assert outputs[0].error == "the server is shutting down"
    assert asyncio.run(engine.drain(0.1)) is True
