"""ServerMetrics as an engine observer, and AsyncEngine's observer hook, without a model."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from lmserve.engine.async_engine import AsyncEngine
from lmserve.engine.step_types import StepStats
from lmserve.request import FinishReason, RequestOutput, SamplingParams
from lmserve.server.metrics import ServerMetrics
from tests.helpers.fake_engine import CountingEngine, Recorder
from tests.helpers.prometheus import metric_samples


def value(metrics: ServerMetrics, name: str, model: str | None = "m", **labels) -> float:
    """One sample; engine series carry the model's label (model=None for those that do not)."""
    # KeyError when the sample is missing: a renamed or unregistered metric must not read as 0
    labels = labels if model is None else {**labels, "model": model}
    return metric_samples(metrics.render({}).decode())[(name, tuple(sorted(labels.items())))]


def out(rid, token_ids, finish=None, num_prompt_tokens=5):
    return RequestOutput(rid, token_ids, finish_reason=finish, num_prompt_tokens=num_prompt_tokens)


# ---------------------------------------------------------------- ServerMetrics


def test_token_counts_and_latencies_from_one_request():
    metrics = ServerMetrics()
    observer = metrics.observer("m")
    observer.request_added("a", now=10.0)
    observer.step_done(StepStats(num_scheduled_tokens=5), [out("a", [7])], now=10.5)
    observer.step_done(StepStats(num_scheduled_tokens=1), [out("a", [8])], now=10.75)
    observer.step_done(StepStats(num_scheduled_tokens=1), [out("a", [9], FinishReason.LENGTH)], now=11.0)
    assert value(metrics, "lmserve:prompt_tokens_total") == 5  # once, not per output
    assert value(metrics, "lmserve:generation_tokens_total") == 3
    assert value(metrics, "lmserve:time_to_first_token_seconds_count") == 1
    assert value(metrics, "lmserve:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value(metrics, "lmserve:inter_token_latency_seconds_count") == 2
    assert value(metrics, "lmserve:inter_token_latency_seconds_sum") == pytest.approx(0.5)
    assert value(metrics, "lmserve:e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    assert value(metrics, "lmserve:request_success_total", finished_reason="length") == 1
    assert value(metrics, "lmserve:tokens_per_step_count") == 3
    assert value(metrics, "lmserve:tokens_per_step_sum") == 7
    assert value(metrics, "lmserve:tokens_per_step_bucket", le="4.0") == 2


def test_steps_the_time_bound_held_prompts_back_are_counted():
    metrics = ServerMetrics()
    observer = metrics.observer("m")
    assert value(metrics, "lmserve:prompt_bounded_steps_total") == 0  # exported before any step
    observer.step_done(StepStats(num_scheduled_tokens=40, prompt_bounded=True), [], now=1.0)
    observer.step_done(StepStats(num_scheduled_tokens=300), [], now=2.0)
    observer.step_done(StepStats(num_scheduled_tokens=40, prompt_bounded=True), [], now=3.0)
    assert value(metrics, "lmserve:prompt_bounded_steps_total") == 2


def test_aborted_requests_leave_no_latency_and_unknown_ids_are_ignored():
    metrics = ServerMetrics()
    observer = metrics.observer("m")
    observer.request_added("a", now=0.0)
    observer.step_done(StepStats(num_scheduled_tokens=5), [out("a", [7]), out("ghost", [1])], now=1.0)
    observer.request_aborted("a")
    observer.step_done(None, [out("a", [8], FinishReason.STOP)], now=2.0)  # too late: forgotten
    assert value(metrics, "lmserve:generation_tokens_total") == 1
    assert value(metrics, "lmserve:e2e_request_latency_seconds_count") == 0
    assert value(metrics, "lmserve:tokens_per_step_count") == 1  # None stats are not a step
    assert value(metrics, "lmserve:request_success_total", finished_reason="abort") == 1  # counted once
    observer.request_aborted("a")
    assert value(metrics, "lmserve:request_success_total", finished_reason="abort") == 1


def test_errors_finish_without_a_latency_sample():
    metrics = ServerMetrics()
    observer = metrics.observer("m")
    observer.request_added("a", now=0.0)
    observer.step_done(None, [out("a", [], FinishReason.ERROR)], now=1.0)
    assert value(metrics, "lmserve:time_to_first_token_seconds_count") == 0
    assert value(metrics, "lmserve:request_success_total", finished_reason="error") == 1


def test_prefix_cache_counters_follow_the_cumulative_stats():
    metrics = ServerMetrics()
    observer = metrics.observer("m")
    observer.step_done(StepStats(num_prefix_cache_queries=4, num_prefix_cache_hits=1, num_preempted=1), [], now=0)
    observer.step_done(StepStats(num_prefix_cache_queries=10, num_prefix_cache_hits=5), [], now=1)
    assert value(metrics, "lmserve:prefix_cache_queries_total") == 10
    assert value(metrics, "lmserve:prefix_cache_hits_total") == 5
    assert value(metrics, "lmserve:prefix_cache_hit_rate") == 0.5
    assert value(metrics, "lmserve:num_preemptions_total") == 1


def test_speculative_draft_counters_follow_the_cumulative_stats():
    metrics = ServerMetrics()
    observer = metrics.observer("m")
    observer.step_done(StepStats(num_draft_tokens=4, num_accepted_tokens=3), [], now=0)
    observer.step_done(StepStats(num_draft_tokens=9, num_accepted_tokens=3), [], now=1)
    assert value(metrics, "lmserve:spec_decode_num_draft_tokens_total") == 9
    assert value(metrics, "lmserve:spec_decode_num_accepted_tokens_total") == 3


def test_load_gauges_are_read_from_the_snapshots_per_model():
    metrics = ServerMetrics()
    text = metrics.render({"a": {"num_running": 3, "num_waiting": 2, "num_kv_blocks": 8, "num_free_kv_blocks": 2},
                           "b": {"num_running": 1, "num_waiting": 0, "num_kv_blocks": 8, "num_free_kv_blocks": 8}})
    samples = metric_samples(text.decode())
    assert samples[("lmserve:num_requests_running", (("model", "a"),))] == 3
    assert samples[("lmserve:num_requests_waiting", (("model", "a"),))] == 2
    assert samples[("lmserve:kv_cache_usage_perc", (("model", "a"),))] == 0.75
    assert samples[("lmserve:num_requests_running", (("model", "b"),))] == 1
    metrics.model_unloaded("b", "idle")  # an unloaded model's gauges go with it
    samples = metric_samples(metrics.render({}).decode())
    assert ("lmserve:num_requests_running", (("model", "b"),)) not in samples
    assert samples[("lmserve:model_unloads_total", (("model", "b"), ("reason", "idle")))] == 1


def test_the_admission_queue_and_its_refusals_per_model():
    metrics = ServerMetrics()
    metrics.observer("m")  # its refusal counts are exported at zero from the start
    assert value(metrics, "lmserve:requests_rejected_total", reason="queue_timeout") == 0
    metrics.request_rejected("m", "queue_full")
    metrics.request_rejected("m", "queue_full")
    samples = metric_samples(metrics.render({}, {"m": 3}).decode())
    assert samples[("lmserve:num_requests_queued", (("model", "m"),))] == 3
    assert samples[("lmserve:requests_rejected_total", (("model", "m"), ("reason", "queue_full")))] == 2
    metrics.model_unloaded("m", "idle")
    assert ("lmserve:num_requests_queued", (("model", "m"),)) not in metric_samples(metrics.render({}).decode())


def test_two_models_series_stay_apart():
    metrics = ServerMetrics()
    a, b = metrics.observer("a"), metrics.observer("b")
    a.step_done(StepStats(num_prefix_cache_queries=10, num_prefix_cache_hits=5), [], now=0)
    b.step_done(StepStats(num_prefix_cache_queries=4, num_prefix_cache_hits=4), [], now=0)
    a.step_done(StepStats(num_prefix_cache_queries=12, num_prefix_cache_hits=5), [], now=1)
    assert value(metrics, "lmserve:prefix_cache_queries_total", model="a") == 12  # each engine's own running totals
    assert value(metrics, "lmserve:prefix_cache_queries_total", model="b") == 4
    assert value(metrics, "lmserve:prefix_cache_hit_rate", model="b") == 1.0
    metrics.model_loaded("a", 2.5)
    metrics.model_failed("c")
    assert value(metrics, "lmserve:model_load_seconds_sum", model="a") == 2.5
    assert value(metrics, "lmserve:model_loads_total", model="c", outcome="failed") == 1


# ---------------------------------------------------------------- AsyncEngine's hook



class Broken:
    def __getattr__(self, name):
        def fail(*args):
            raise RuntimeError("observer bug")
        return fail


def run(engine: AsyncEngine, consume):
    async def main():
        return await consume(engine)

    try:
        return asyncio.run(main())
    finally:
        engine.close()


async def collect(engine, request_id="r", prompt=(1, 2)):
    return [o.new_token_ids async for o in engine.generate(request_id, list(prompt), SamplingParams())]


def test_observers_see_adds_steps_and_outputs_and_a_broken_one_does_no_harm():
    recorder, metrics = Recorder(), ServerMetrics()
    engine = AsyncEngine(CountingEngine(), observers=[Broken(), recorder, metrics.observer("m")])
    assert run(engine, collect) == [[1], [2], [3]]
    assert recorder.events == [("added", "r"), ("step", 1, [("r", [1])]), ("step", 1, [("r", [2])]),
                               ("step", 1, [("r", [3])])]
    assert value(metrics, "lmserve:generation_tokens_total") == 3
    assert value(metrics, "lmserve:e2e_request_latency_seconds_count") == 1


def test_a_step_without_new_stats_reports_none():
    stub = CountingEngine()
    stub.idle_steps = 1
    recorder = Recorder()
    assert run(AsyncEngine(stub, observers=[recorder]), collect) == [[1], [2], [3]]
    assert recorder.events[1] == ("step", None, [])


def test_a_request_left_early_is_reported_aborted():
    recorder = Recorder()

    async def first_only(engine):
        async with aclosing(engine.generate("r", [1], SamplingParams())) as outputs:
            first = (await anext(outputs)).new_token_ids
        deadline = time.monotonic() + 5
        while ("aborted", "r") not in recorder.events and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return first

    assert run(AsyncEngine(CountingEngine(), observers=[recorder]), first_only) == [1]
    assert ("aborted", "r") in recorder.events


def test_a_refused_request_is_not_reported_added():
    recorder = Recorder()

    async def empty_prompt(engine):
        return [o.finish_reason async for o in engine.generate("r", [], SamplingParams())]

    assert run(AsyncEngine(CountingEngine(), observers=[recorder]), empty_prompt) == [FinishReason.ERROR]
    assert ("added", "r") not in recorder.events
