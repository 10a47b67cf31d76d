"""The ingress's ServerState: the server `lmserve serve` builds, with chat models served by replicas.

Loading a chat model in the ingress's fleet means deploying its replicas (`lmserve serve
--replicas`: an application per model, deleted again when the fleet unloads it) or finding the
deployment the application declared (`serve run`), then connecting to it (waiting for a replica
to describe the model). Embedding models load in
the ingress process, as in one process. /metrics keeps the model-level series (aggregated over
the replicas) and adds per-replica ones: requests routed to each, and each one's load as of its
last output.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lmserve.fleet.catalogue import ModelEntry
from lmserve.scale.mailbox import Mailbox
from lmserve.scale.options import ScaleSettings
from lmserve.scale.remote_engine import RemoteChatModel, RemoteEngine
from lmserve.server.metrics import ServerMetrics
from lmserve.server.state import ServerState


def ingress_state(args: argparse.Namespace, engines: dict[str, Any] | Any, settings: ScaleSettings,
                  mailbox: Mailbox) -> ServerState:
    """`engines`: each chat model's deployment handle by model id, or the ModelDeployments
    (application.py) that deploys a model's replicas as it loads; `mailbox`: where the replicas'
    outputs arrive."""
    from lmserve.serve_settings import server_state

    metrics = ServerMetrics()
    routed = Counter("lmserve:replica_requests", "Engine requests by the replica that served them.",
                     ["model", "replica"], registry=metrics.registry)
    connected: dict[str, RemoteEngine] = {}
    metrics.registry.register(_ReplicaLoads(connected))
    # One observer per replica for the ingress's life: a model unloaded and connected again finds
    # its replicas' counters where it left them.
    replica_observers: dict[tuple[str, str], Any] = {}

    def replica_observer(model: str, replica: str) -> Any:
        if (model, replica) not in replica_observers:
            replica_observers[model, replica] = metrics.observer(model)
        return replica_observers[model, replica]

    def load(entry: ModelEntry, progress: Any) -> RemoteChatModel:
        release = None
        if isinstance(engines, dict):
            handle = engines.get(entry.id)
            if handle is None:
                raise ValueError(f"the model {entry.id!r} has no replicas: it was not in the catalogue when the "
                                 "application started (redeploy it to serve the model)")
        else:
            handle = engines.deploy(entry)
            release = functools.partial(engines.delete, entry.id)
        try:
            engine = connected[entry.id] = RemoteEngine.connect(
                handle, mailbox, num_replicas=settings.most_replicas, observers=[metrics.observer(entry.id)],
                routed=lambda replica: routed.labels(entry.id, replica).inc(),
                stats_observer=lambda replica: replica_observer(entry.id, replica))
        except BaseException:
            if release is not None:
                release()
            raise
        return RemoteChatModel(engine, release)

    state = server_state(args, load, metrics)
    state.slot_save_path = None  # a saved slot would be one replica's cache: slot saving is refused
    state.exit_if_pinned_fails = False  # ending the ingress's process would only have Ray Serve restart it
    return state


class _ReplicaLoads(Collector):
    """Each replica's engine load, read at scrape time from what its last output reported."""

    def __init__(self, engines: dict[str, RemoteEngine]):
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily("lmserve:replica_num_requests_running", "Sequences being decoded on a "
                                    "replica, as of its last output.", labels=["model", "replica"])
        waiting = GaugeMetricFamily("lmserve:replica_num_requests_waiting", "Requests waiting in a replica's queue "
                                    "(not started, or preempted), as of its last output.", labels=["model", "replica"])
        usage = GaugeMetricFamily("lmserve:replica_kv_cache_usage_perc", "Fraction of a replica's KV blocks in "
                                  "use, as of its last output.", labels=["model", "replica"])
        for model, engine in self._engines.items():
            for replica, load in engine.replica_loads().items():
                running.add_metric([model, replica], load.num_running)
                waiting.add_metric([model, replica], load.num_waiting)
                usage.add_metric([model, replica], 1.0 - load.num_free_kv_blocks / max(load.num_kv_blocks, 1))
        yield running
        yield waiting
        yield usage
