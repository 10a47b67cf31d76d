"""lmserve as a Ray Serve application: lmserve's own app as the ingress, and one deployment of
engine replicas per chat model, routed by prefix (ray_router.py).

    ingress (one replica: every route, the conversation store, the embedding model, /metrics)
      -> deployment "lmserve-engine-<model>" (N replicas, each an EngineReplica)

`lmserve serve ... --replicas N` builds it from its flags and runs it (launch.py), the ingress
answering HTTP itself on the node it runs on (listener.py). There each chat model's deployment is
an application of its own ("lmserve-model-<model>", ModelDeployments), deployed when the ingress's
fleet loads the model and deleted when it unloads it, so the fleet's rules hold for replicas as
for engines in one process: models load on demand (pinned ones at start), idle ones go after
their ttl, --max-loaded bounds them, and a model added to --models-dir later is served. People
with a Ray cluster of their own run `serve run lmserve.scale:app argv="MODEL --replicas 4 ..."`,
the same flags as one string, behind Ray Serve's proxy: one application whose deployments are
declared up front (a declarative Serve config cannot have applications added beside it), every
chat model of the catalogue at start.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from lmserve.config import EngineConfig
from lmserve.fleet.catalogue import ModelEntry
from lmserve.scale.options import ScaleSettings, check_proxy_listening, replica_settings
from lmserve.scale.replica import EngineReplica

log = logging.getLogger("lmserve.scale")

APP_NAME = "lmserve"
MODEL_APP_PREFIX = "lmserve-model-"  # + the model's deployment-safe id: one application per loaded model
INGRESS_NAME = "lmserve-ingress"  # one replica: engine replicas deliver outputs to it (mailbox.py)
INGRESS_MAX_ONGOING_REQUESTS = 100_000  # every HTTP request passes the one ingress; its limits are lmserve's own
DEFAULT_CAPACITY_BLOCKS = 1024
_LOGGING = {"enable_access_log": False}  # lmserve's own access log has every HTTP request already
# A replica told to stop checks for requests still running every this many seconds, the first time
# after one wait (Ray Serve's default, 2 s, was most of the 6 s a Ctrl-C took with nothing running).
SHUTDOWN_POLL_S = 0.2
# After this process deletes a model's replicas, Ray reports their CPUs free only once the actors
# are gone and the raylet has told the GCS: a load in that time waits up to ROOM_WAIT_S for them
# rather than answering 503 for room the unload has just made (the replicas' processes had exited
# and the next load still found no room, in one suite run).
RELEASE_WINDOW_S = 60.0
ROOM_WAIT_S = 10.0
ROOM_POLL_S = 0.25


def deployment_name(model_id: str) -> str:
    return "lmserve-engine-" + _safe(model_id)


def model_app_name(model_id: str) -> str:
    return MODEL_APP_PREFIX + _safe(model_id)


def _safe(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", model_id)


class ModelDeployments:
    """Each chat model's replicas as a Ray Serve application of its own, deployed when the fleet
    loads the model and deleted when it unloads it (`lmserve serve --replicas`)."""

    def __init__(self, defaults: EngineConfig, replica_config: EngineConfig, settings: ScaleSettings):
        self._defaults, self._replica_config, self._settings = defaults, replica_config, settings
        self._deleted_at: float | None = None  # monotonic time of the last delete(): its CPUs may not show yet

    def deploy(self, entry: ModelEntry) -> Any:
        """Deploy `entry`'s replicas and wait for them to run (blocking: call it off the event
        loop); its deployment handle. RuntimeError if they cannot start (the model does not load),
        FleetBusy if there is no room for them."""
        self._check_room(entry)
        deployment = _engine_deployment(entry, self._defaults, self._settings)
        serve.run(deployment.bind(self._replica_config, entry, INGRESS_NAME, APP_NAME), name=model_app_name(entry.id),
                  route_prefix=None, blocking=False)
        return serve.get_deployment_handle(deployment_name(entry.id), app_name=model_app_name(entry.id))

    def _check_room(self, entry: ModelEntry) -> None:
        """On a local Ray instance, whose CPUs are all there will be: FleetBusy (503, the request
        may be retried, the model stays unloaded) when the model's replicas cannot all be placed
        now, rather than a load that waits for CPUs forever. (A cluster may grow: there Ray Serve
        waits for room.)"""
        if self._settings.ray_address is not None:
            return
        import ray

        from lmserve.fleet.fleet import FleetBusy

        needed = self._settings.num_replicas * self._settings.replica_cpus
        def free_cpus() -> float:
            return ray.available_resources().get("CPU", 0.0)

        free = free_cpus()
        if needed > free and self._releasing():  # a model just unloaded: its CPUs come back shortly
            deadline = time.monotonic() + ROOM_WAIT_S
            while needed > free and time.monotonic() < deadline:
                time.sleep(ROOM_POLL_S)
                free = free_cpus()
        if needed > free:
            raise FleetBusy(f"no room for {entry.id}'s replicas: {self._settings.num_replicas} x --replica-cpus "
                               f"{self._settings.replica_cpus:g} = {needed:g} CPUs, and {free:g} of this machine's are "
                               "not reserved by the replicas already running (unload a model, or lower --replicas or "
                               "--replica-cpus)")

    def clear_leftovers(self, timeout: float = 60.0) -> None:
        """Delete the model applications an earlier ingress deployed, all at once, and wait for
        them to go (up to `timeout`: their replicas may spend Ray Serve's graceful shutdown
        waiting to deliver to the ingress that died). The fleet of an ingress Ray Serve restarted
        starts empty: replicas no fleet holds would keep their CPUs and run requests whose
        outputs nobody awaits. A model asked for again is deployed anew. Failures are logged: an
        ingress that cannot start would only be restarted again."""
        try:
            leftovers = [name for name in serve.status().applications if name.startswith(MODEL_APP_PREFIX)]
            for name in leftovers:
                log.info("deleting %s, deployed by an earlier ingress", name)
                serve.delete(name, _blocking=False)
            deadline = time.monotonic() + timeout
            while leftovers and time.monotonic() < deadline:
                time.sleep(0.5)
                leftovers = [name for name in leftovers if name in serve.status().applications]
            if leftovers:
                log.warning("%s still being deleted after %.0f s", ", ".join(leftovers), timeout)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("could not delete the model applications of an earlier ingress")

    def delete(self, model_id: str) -> None:
        """Stop `model_id`'s replicas (their requests were drained or closed by the ingress)."""
        serve.delete(model_app_name(model_id), _blocking=False)
        self._deleted_at = time.monotonic()

    def _releasing(self) -> bool:
        """Whether replicas this process deleted may still be giving their CPUs back."""
        return self._deleted_at is not None and time.monotonic() - self._deleted_at < RELEASE_WINDOW_S


@serve.ingress()
class Ingress:
    """lmserve's app over the fleet of `args`, its chat models served by `engines` (handles by model id)."""

    def __init__(self, args: argparse.Namespace, settings: ScaleSettings, engines: dict[str, Any] | ModelDeployments,
                 listen: dict[str, Any] | None = None):
        """`engines`: each chat model's deployment handle by model id, or the ModelDeployments that
        deploys them as the fleet loads them; `listen`: uvicorn's options when this replica answers
        HTTP itself (listener.py), None behind Ray Serve's proxy."""
        from lmserve.scale.mailbox import Mailbox

        self._args, self._settings, self._engines, self._listen = args, settings, engines, listen
        if isinstance(engines, ModelDeployments):
            engines.clear_leftovers()
        self._mailbox = Mailbox()
        self._http: Any = None  # the listener's task, kept while the replica runs

    def deliver(self, batch: list, load: Any, stats: list) -> None:
        """Outputs and step stats from an engine replica (mailbox.py)."""
        self._mailbox.deliver(batch, load, stats)

    async def __serve_build_asgi_app__(self) -> Any:  # on the replica's event loop, where the listener runs
        from lmserve.cli_parser import configure_logging
        from lmserve.scale.ingress_state import ingress_state
        from lmserve.server.app import create_app

        configure_logging(self._args.log_level)
        app = create_app(ingress_state(self._args, self._engines, self._settings, self._mailbox))
        if self._listen is not None:
            from lmserve.scale import listener

            self._http = listener.start(app, self._listen)
        return app


def build_application(args: argparse.Namespace, listen: dict[str, Any] | None = None,
                      node_ip: str | None = None) -> Any:
    """The Ray Serve application `args` (parsed `lmserve serve` flags) describe. ValueError for
    flags it cannot run with. With `listen` (uvicorn's options), the ingress answers HTTP itself,
    on the node whose address is `node_ip`, and deploys each chat model when its fleet loads it;
    without, every chat model's deployment is part of the application."""
    from lmserve.serve_settings import catalogue, embedding_config, engine_config, preflight_pinned

    settings = replica_settings(args)
    config = engine_config(args)
    models = catalogue(args, config, embedding_config(args))
    preflight_pinned(models, config)
    # Each replica's engine runs as many threads as the CPUs it reserves, unless --threads says.
    replica_config = replace(config, num_threads=config.num_threads or max(1, int(settings.replica_cpus)))
    engines: dict[str, Any] | ModelDeployments
    if listen is not None:
        engines = ModelDeployments(config, replica_config, settings)
    else:
        engines = {entry.id: _engine_deployment(entry, config, settings).bind(replica_config, entry, INGRESS_NAME,
                                                                              APP_NAME)
                   for entry in models.entries() if entry.kind == "chat"}
    actor_options: dict[str, Any] = {"num_cpus": 0}
    if node_ip is not None:
        actor_options["resources"] = {f"node:{node_ip}": 0.001}  # Ray's own resource of that node
    ingress = serve.deployment(Ingress, name=INGRESS_NAME, num_replicas=1,
                               max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS, ray_actor_options=actor_options,
                               logging_config=_LOGGING, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
    return ingress.bind(args, settings, engines, listen)


def _engine_deployment(entry: ModelEntry, config: EngineConfig, settings: ScaleSettings) -> Any:
    from lmserve.fleet.models import engine_config_for
    from lmserve.scale.ray_router import PrefixAwareRequestRouter

    model_config = engine_config_for(config, entry)
    max_num_seqs = model_config.scheduler.max_num_seqs
    options: dict[str, Any] = {
        "name": deployment_name(entry.id),
        "max_ongoing_requests": 2 * max_num_seqs,  # a batch running and one waiting in the engine's queue
        "ray_actor_options": {"num_cpus": settings.replica_cpus},
        "logging_config": _LOGGING,
        "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
        "request_router_config": RequestRouterConfig(
            request_router_class=PrefixAwareRequestRouter,
            request_router_kwargs={"block_size": model_config.cache.block_size,
                                   "capacity_blocks": _capacity_blocks(model_config)}),
    }
    if settings.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "initial_replicas": settings.num_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests or max(1, max_num_seqs // 2),
            "upscale_delay_s": settings.scale_up_delay, "downscale_delay_s": settings.scale_down_delay,
        }
    else:
        options["num_replicas"] = settings.num_replicas
    return serve.deployment(EngineReplica).options(**options)


def _capacity_blocks(config: EngineConfig) -> int:
    """About how many blocks a replica's prefix cache holds: its whole KV cache, from the header."""
    from lmserve.engine.sizing import num_kv_blocks
    from lmserve.weights.dtype import serving_dtype
    from lmserve.weights.load import read_model_config

    path = Path(config.model_path)
    try:
        return num_kv_blocks(config.cache, read_model_config(path), serving_dtype(path, config.dtype, config.device))
    except (OSError, ValueError, KeyError):  # a remote source, not downloaded yet
        return DEFAULT_CAPACITY_BLOCKS


def app(args: dict[str, Any]) -> Any:
    """The application builder `serve run lmserve.scale:app argv="..."` calls: `argv` holds
    `lmserve serve`'s arguments (a string, or a list in a config file)."""
    from lmserve.cli_parser import build_parser

    unknown = sorted(set(args) - {"argv"})
    if unknown:
        raise ValueError(f"lmserve.scale:app takes one argument, argv (lmserve serve's flags); not {unknown}")
    argv = args.get("argv", "")
    argv = shlex.split(argv) if isinstance(argv, str) else [str(a) for a in argv]
    parsed = build_parser().parse_args(["serve", *argv])
    check_proxy_listening(parsed, build_parser().parse_args(["serve"]))
    return build_application(parsed)
