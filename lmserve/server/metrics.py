"""Prometheus metrics for one server, fed from the outside of the core.

`ServerMetrics` is an engine observer (see async_engine.EngineObserver): it hears each added and
aborted request and each step's stats and outputs on the engine thread, and derives token
counts and per-request latencies from them. HTTP request counts come from the access
middleware's finished records. Every app owns its own CollectorRegistry: nothing global.
"""

from __future__ import annotations

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
    from lmserve.engine.engine import StepStats
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
        self._timings: dict[str, _Timing] = {}  # engine request id -> clock; engine thread only
        self._last_prefix_counts = (0, 0)  # (queries, hits) at the previous step
        self._define_http_and_tokens()
        self._define_latencies()
        self._define_engine_state()

    def _define_http_and_tokens(self) -> None:
        r = self.registry
        self.http_requests = Counter("lmserve:http_requests", "HTTP requests by method, route and status code.",
                                     ["method", "route", "status"], registry=r)
        self.prompt_tokens = Counter("lmserve:prompt_tokens", "Prompt tokens of engine requests that ran.",
                                     registry=r)
        self.generation_tokens = Counter("lmserve:generation_tokens", "Tokens generated.", registry=r)
        self.requests_finished = Counter("lmserve:request_success", "Engine requests finished, by reason.",
                                         ["finished_reason"], registry=r)

    def _define_latencies(self) -> None:
        r = self.registry
        self.ttft = Histogram("lmserve:time_to_first_token_seconds", "From arrival at the engine to the first "
                              "token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("lmserve:inter_token_latency_seconds", "Between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lmserve:e2e_request_latency_seconds", "From arrival at the engine to the last "
                             "output.", buckets=E2E_BUCKETS, registry=r)
        self.tokens_per_step = Histogram("lmserve:tokens_per_step", "Tokens run through the model per engine "
                                         "step.", buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.step_seconds = Histogram("lmserve:step_duration_seconds", "Wall time of one engine step.",
                                      buckets=STEP_SECONDS_BUCKETS, registry=r)

    def _define_engine_state(self) -> None:
        r = self.registry
        self.running = Gauge("lmserve:num_requests_running", "Sequences being decoded.", registry=r)
        self.waiting = Gauge("lmserve:num_requests_waiting", "Sequences waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("lmserve:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).",
                              registry=r)
        self.preemptions = Counter("lmserve:num_preemptions", "Sequences preempted for lack of KV blocks.",
                                   registry=r)
        self.prefix_queries = Counter("lmserve:prefix_cache_queries", "KV blocks looked up in the prefix cache.",
                                      registry=r)
        self.prefix_hits = Counter("lmserve:prefix_cache_hits", "KV blocks found in the prefix cache.",
                                   registry=r)
        self.prefix_hit_rate = Gauge("lmserve:prefix_cache_hit_rate", "Prefix cache hits / queries since start.",
                                     registry=r)

    # --- engine observer (engine thread) ----------------------------------------------------

    def request_added(self, request_id: str, now: float) -> None:
        self._timings[request_id] = _Timing(now)

    def request_aborted(self, request_id: str) -> None:
        self._timings.pop(request_id, None)

    def step_done(self, stats: StepStats | None, outputs: list[RequestOutput], now: float) -> None:
        if stats is not None:
            self._observe_stats(stats)
        for output in outputs:
            self._observe_output(output, now)

    def _observe_stats(self, stats: StepStats) -> None:
        self.tokens_per_step.observe(stats.num_scheduled_tokens)
        self.step_seconds.observe(stats.step_seconds)
        self.preemptions.inc(stats.num_preempted)
        queries, hits = stats.num_prefix_cache_queries, stats.num_prefix_cache_hits
        last_queries, last_hits = self._last_prefix_counts
        self.prefix_queries.inc(max(queries - last_queries, 0))
        self.prefix_hits.inc(max(hits - last_hits, 0))
        self._last_prefix_counts = (queries, hits)
        if queries:
            self.prefix_hit_rate.set(hits / queries)

    def _observe_output(self, output: RequestOutput, now: float) -> None:
        timing = self._timings.get(output.request_id)
        if timing is None:  # not added through the observed engine
            return
        if timing.last_output is None:
            self.prompt_tokens.inc(output.num_prompt_tokens)
        if output.finish_reason != FinishReason.ERROR:
            latency = self.ttft if timing.last_output is None else self.itl
            latency.observe(now - (timing.last_output if timing.last_output is not None else timing.arrival))
        timing.last_output = now
        self.generation_tokens.inc(len(output.new_token_ids))
        if output.finished:
            del self._timings[output.request_id]
            self.e2e.observe(now - timing.arrival)
            self.requests_finished.labels(output.finish_reason.value).inc()

    # --- HTTP side (event loop) -------------------------------------------------------------

    def request_done(self, record: AccessRecord) -> None:
        """Count one finished HTTP request (an access-middleware sink)."""
        method = record.method if record.method in HTTP_METHODS else "other"
        self.http_requests.labels(method, record.route, str(record.status)).inc()

    def render(self, snapshot: dict[str, int] | None) -> bytes:
        """The Prometheus text exposition; gauges of engine load are read now from `snapshot`."""
        if snapshot is not None:
            self.running.set(snapshot["num_running"])
            self.waiting.set(snapshot["num_waiting"])
            self.kv_usage.set(1.0 - snapshot["num_free_kv_blocks"] / max(snapshot["num_kv_blocks"], 1))
        return generate_latest(self.registry)
