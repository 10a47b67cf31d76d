"""`lmserve serve ... --replicas N`: run the application (application.py) on a local Ray instance, or on
the cluster --ray-address names, until SIGINT or SIGTERM. The ingress answers HTTP itself
(listener.py), on this machine, where --host and --port say: no Ray Serve proxy is started."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading

from lmserve.scale.options import check_node_address, replica_settings

log = logging.getLogger("lmserve.scale")

CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"  # read by the controller the local instance starts
LOCAL_CONTROL_LOOP_INTERVAL_S = "0.5"


def serve_on_ray(args: argparse.Namespace) -> None:
    """Blocks until the server is told to stop. ValueError for flags it cannot run with (before
    anything starts)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'lmserve[ray]'") from None
    from lmserve.scale import listener
    from lmserve.scale.application import APP_NAME, MODEL_APP_PREFIX, build_application
    from lmserve.serve_settings import connection_options, listen_options

    settings = replica_settings(args)
    check_node_address(settings)
    listen = listen_options(args) | connection_options(args) | {"log_level": args.log_level}
    listen |= {name: os.path.abspath(listen[name]) for name in ("uds", "ssl_keyfile", "ssl_certfile") if name in listen}
    listener.check_free(listen)
    application = build_application(args, listen, ray.util.get_node_ip_address())
    local = settings.ray_address is None
    if local:
        # Ray Serve's controller checks every deployment ten times a second by default; on a small
        # machine that CPU comes out of the engines' (bench/RESULTS.md, tenth sitting: the
        # controller's and GCS's CPU halved). Half a second is still quick enough for health
        # checks and autoscaling. A cluster keeps its own setting, as does a user who sets it.
        os.environ.setdefault(CONTROL_LOOP_ENV, LOCAL_CONTROL_LOOP_INTERVAL_S)
    # "local": a Ray instance of its own, even where RAY_ADDRESS is set or a `ray start` cluster runs
    # on this machine (Ray's default would join it, and stopping would then shut its Serve down).
    ray.init(address="local" if local else settings.ray_address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True)
    stop = _stop_on_signals()  # after ray.init, whose own SIGTERM handler would end the process at once
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # not its "ready at" Ray Serve's proxy address
    try:
        # The ingress listens itself: no proxy is started (a cluster's Serve already running keeps
        # its own), and the application claims no route on one.
        serve.start(proxy_location="Disabled")
        serve.run(application, name=APP_NAME, route_prefix=None, blocking=False)
        log.info("serving on %s: %d replica(s) per chat model%s", _url(listen), settings.num_replicas,
                 " (autoscaling)" if settings.autoscaling else "")
        stop.wait()
        log.info("stopping")
    finally:
        if local:
            _shutdown_local(serve, ray)
        else:  # the cluster's Serve goes on serving its other applications
            for name in [APP_NAME, *(app for app in serve.status().applications if app.startswith(MODEL_APP_PREFIX))]:
                serve.delete(name)
            ray.shutdown()
        if "uds" in listen and os.path.exists(listen["uds"]):
            os.remove(listen["uds"])


def _url(listen: dict) -> str:
    if "uds" in listen:
        return f"unix:{listen['uds']}"
    scheme = "https" if listen.get("ssl_certfile") else "http"
    return f"{scheme}://{listen['host']}:{listen['port']}"


def _shutdown_local(serve, ray) -> None:
    """Stop the local Ray instance this command started, and every process it left: its
    per-node agents outlive ray.shutdown() otherwise (seen with Ray 2.60)."""
    import psutil

    started = psutil.Process().children(recursive=True)
    serve.shutdown()
    ray.shutdown()
    for process in started:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(started, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop
