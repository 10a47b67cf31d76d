"""Prometheus metrics for one server, fed from the outside of the core.

Each model's engine gets an observer (`ServerMetrics.observer(model)`, see
async_engine.EngineObserver): it hears each added and aborted request and each step's stats and
outputs on the engine thread, and derives token counts and per-request latencies from them, in
series labelled with the model. The fleet reports loads and unloads. HTTP request counts come from the access
middleware's finished records. Every app owns its own CollectorRegistry: nothing global.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lmserve.request import FinishReason, RequestOutput

if TYPE_CHECKING:
    from lmserve.engine.step_types import StepStats
    from lmserve.server.middleware.access import AccessRecord

# Buckets as vLLM uses them, in seconds; tokens per step in powers of two.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
STEP_TOKEN_BUCKETS = tuple(float(2**k) for k in range(14))  # 1 .. 8192
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOAD_SECONDS_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The method label takes these; any other method a client invents is "other", so clients cannot
# grow the registry (and every scrape) without end.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class _Timing:
    """One engine request's clock, kept from its arrival to its last output."""

    arrival: float
    last_output: float | None = None


class ServerMetrics:
    """The server's metrics and the registry that exposes them (`render()` for /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._define_http_and_tokens()
        self._define_latencies()
        self._define_engine_state()

    def _define_http_and_tokens(self) -> None:
        r = self.registry
        self.http_requests = Counter("lmserve:http_requests", "HTTP requests by method, route and status code.",
                                     ["method", "route", "status"], registry=r)
        self.prompt_tokens = Counter("lmserve:prompt_tokens", "Prompt tokens of engine requests that ran.",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("lmserve:generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.requests_finished = Counter("lmserve:request_success", "Engine requests finished, by reason.",
                                         ["model", "finished_reason"], registry=r)

    def _define_latencies(self) -> None:
        r = self.registry
        self.ttft = Histogram("lmserve:time_to_first_token_seconds", "From arrival at the engine to the first "
                              "token.", ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmserve:inter_token_latency_seconds", "Between consecutive tokens of a request.",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve:e2e_request_latency_seconds", "From arrival at the engine to the last "
                             "output.", ["model"], buckets=E2E_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("lmserve:tokens_per_step", "Tokens run through the model per engine "
                                         "step.", ["model"], buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("lmserve:step_duration_seconds", "Wall time of one engine step.",
                                      ["model"], buckets=STEP_SECONDS_BUCKETS, registry=r)
        self.bounded_steps = Counter("lmserve:prompt_bounded_steps", "Engine steps that decoded and held prompt "
                                     "tokens back to stay within --max-step-ms.", ["model"], registry=r)

    def _define_engine_state(self) -> None:
        r = self.registry
        self.running = Gauge("lmserve:num_requests_running", "Sequences being decoded.", ["model"], registry=r)
        self.waiting = Gauge("lmserve:num_requests_waiting", "Sequences waiting to be scheduled.", ["model"],
                             registry=r)
        self.queued = Gauge("lmserve:num_requests_queued", "Sequences waiting at the admission gate for a turn on "
                            "the engine (a request with n choices counts n).", ["model"], registry=r)
        self.rejected = Counter("lmserve:requests_rejected", "Generation requests refused for load, by reason "
                                "(queue_full: 429, queue_timeout: 503).", ["model", "reason"], registry=r)
        self.kv_usage = Gauge("lmserve:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", ["model"],
                              registry=r)
        self.preemptions = Counter("lmserve:num_preemptions", "Sequences preempted for lack of KV blocks.",
                                   ["model"], registry=r)
        self.prefix_queries = Counter("lmserve:prefix_cache_queries", "KV blocks looked up in the prefix cache.",
                                      ["model"], registry=r)
        self.prefix_hits = Counter("lmserve:prefix_cache_hits", "KV blocks found in the prefix cache.", ["model"],
                                   registry=r)
        self.prefix_hit_rate = Gauge("lmserve:prefix_cache_hit_rate", "Prefix cache hits / queries since the "
                                     "model loaded.", ["model"], registry=r)
        self.spec_drafts = Counter("lmserve:spec_decode_num_draft_tokens", "Speculative draft tokens verified "
                                   "(prompt lookup, or --draft-model's).", ["model"], registry=r)
        self.spec_accepted = Counter("lmserve:spec_decode_num_accepted_tokens", "Of those, drafts kept.", ["model"],
                                     registry=r)
        self.loads = Counter("lmserve:model_loads", "Model loads, by outcome (loaded or failed).",
                             ["model", "outcome"], registry=r)
        self.unloads = Counter("lmserve:model_unloads", "Model unloads, by reason (idle, room, requested, "
                               "shutdown).", ["model", "reason"], registry=r)
        self.load_seconds = Histogram("lmserve:model_load_seconds", "Time to load a model.", ["model"],
                                      buckets=LOAD_SECONDS_BUCKETS, registry=r)

    def observer(self, model: str) -> ModelMetrics:
        """The engine observer for one model's engine: its series carry `model`."""
        return ModelMetrics(self, model)

    # --- the fleet's events (event loop) ----------------------------------------------------

    def model_loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model, "loaded").inc()
        self.load_seconds.labels(model).observe(seconds)

    def model_failed(self, model: str) -> None:
        self.loads.labels(model, "failed").inc()

    def model_unloaded(self, model: str, reason: str) -> None:
        self.unloads.labels(model, reason).inc()
        # gone with the model
        for gauge in (self.running, self.waiting, self.queued, self.kv_usage, self.prefix_hit_rate):
            with contextlib.suppress(KeyError):
                gauge.remove(model)

    # --- HTTP side (event loop) -------------------------------------------------------------

    def request_done(self, record: AccessRecord) -> None:
        """Count one finished HTTP request (an access-middleware sink)."""
        method = record.method if record.method in HTTP_METHODS else "other"
        self.http_requests.labels(method, record.route, str(record.status)).inc()

    def request_rejected(self, model: str, reason: str) -> None:
        """Count one generation request the admission gate refused."""
        self.rejected.labels(model, reason).inc()

    def render(self, loads: dict[str, dict[str, int]], queued: dict[str, int] | None = None) -> bytes:
        """The Prometheus text exposition; gauges of engine load are read now from `loads` (model id
        -> its engine's snapshot, for the loaded chat models) and `queued` (model id -> sequences
        waiting at its admission gate)."""
        for model, num_queued in (queued or {}).items():
            self.queued.labels(model).set(num_queued)
        for model, snapshot in loads.items():
            self.running.labels(model).set(snapshot["num_running"])
            self.waiting.labels(model).set(snapshot["num_waiting"])
            self.kv_usage.labels(model).set(1.0 - snapshot["num_free_kv_blocks"] / max(snapshot["num_kv_blocks"], 1))
        return generate_latest(self.registry)


class ModelMetrics:
    """An engine observer (see async_engine.EngineObserver) feeding one model's series of
    ServerMetrics; called on that engine's thread."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self.model = model
        self._m = metrics
        self._timings: dict[str, _Timing] = {}  # engine request id -> clock
        self._last_prefix_counts = (0, 0)  # (queries, hits) at the previous step: this engine's since it loaded
        self._last_draft_counts = (0, 0)  # (drafted, accepted) likewise
        for series in (metrics.prompt_tokens, metrics.generation_tokens, metrics.ttft, metrics.itl, metrics.e2e,
                       metrics.tokens_per_step, metrics.step_seconds, metrics.bounded_steps, metrics.preemptions,
                       metrics.prefix_queries, metrics.prefix_hits, metrics.spec_drafts, metrics.spec_accepted):
            series.labels(model)  # exported from the start, at zero, rather than from the first event
        for reason in ("queue_full", "queue_timeout"):
            metrics.rejected.labels(model, reason)

    def request_added(self, request_id: str, now: float) -> None:
        self._timings[request_id] = _Timing(now)

    def request_aborted(self, request_id: str) -> None:
        # counted as finished by abort (its client left), with no latency sample
        if self._timings.pop(request_id, None) is not None:
            self._m.requests_finished.labels(self.model, FinishReason.ABORT.value).inc()

    def step_done(self, stats: StepStats | None, outputs: list[RequestOutput], now: float) -> None:
        if stats is not None:
            self._observe_stats(stats)
        for output in outputs:
            self._observe_output(output, now)

    def _observe_stats(self, stats: StepStats) -> None:
        m, model = self._m, self.model
        m.tokens_per_step.labels(model).observe(stats.num_scheduled_tokens)
        m.step_seconds.labels(model).observe(stats.step_seconds)
        m.bounded_steps.labels(model).inc(stats.prompt_bounded)
        m.preemptions.labels(model).inc(stats.num_preempted)
        queries, hits = stats.num_prefix_cache_queries, stats.num_prefix_cache_hits
        last_queries, last_hits = self._last_prefix_counts
        m.prefix_queries.labels(model).inc(max(queries - last_queries, 0))
        m.prefix_hits.labels(model).inc(max(hits - last_hits, 0))
        self._last_prefix_counts = (queries, hits)
        if queries:
            m.prefix_hit_rate.labels(model).set(hits / queries)
        drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
        m.spec_drafts.labels(model).inc(max(drafted - self._last_draft_counts[0], 0))
        m.spec_accepted.labels(model).inc(max(accepted - self._last_draft_counts[1], 0))
        self._last_draft_counts = (drafted, accepted)

    def _observe_output(self, output: RequestOutput, now: float) -> None:
        m, model = self._m, self.model
        timing = self._timings.get(output.request_id)
        if timing is None:  # not added through the observed engine
            return
        if timing.last_output is None:
            m.prompt_tokens.labels(model).inc(output.num_prompt_tokens)
        if output.finish_reason not in (FinishReason.ERROR, FinishReason.UNSATISFIABLE):
            latency = m.ttft if timing.last_output is None else m.itl
            latency.labels(model).observe(now - (timing.last_output if timing.last_output is not None
                                                 else timing.arrival))
        timing.last_output = now
        m.generation_tokens.labels(model).inc(len(output.new_token_ids))
        if output.finished:
            del self._timings[output.request_id]
            m.e2e.labels(model).observe(now - timing.arrival)
            m.requests_finished.labels(model, output.finish_reason.value).inc()
