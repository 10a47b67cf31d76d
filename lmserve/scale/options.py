"""`lmserve serve`'s flags for replicas on Ray Serve, and the settings they make (no Ray import:
the parser is built whether Ray is installed or not)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from lmserve.arg_types import non_negative_int, positive_int

DEFAULT_REPLICA_CPUS = 1.0
DEFAULT_SCALE_UP_DELAY = 30.0  # Ray Serve's own defaults for upscale_delay_s and downscale_delay_s
DEFAULT_SCALE_DOWN_DELAY = 600.0


def add_scale_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("replicas on Ray Serve", "each chat model served by replicas behind one "
                                     "endpoint, prefix-aware routing between them (docs/scale-out.md); needs "
                                     "pip install 'lmserve[ray]'")
    group.add_argument("--replicas", type=positive_int, help="replicas per chat model (with --min-replicas and "
                       "--max-replicas: how many to start with)")
    group.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto) rather than "
                       "starting a local Ray instance")
    group.add_argument("--min-replicas", type=non_negative_int, help="autoscale: the fewest replicas per model")
    group.add_argument("--max-replicas", type=positive_int, help="autoscale: the most replicas per model")
    group.add_argument("--target-ongoing-requests", type=_positive_float, help="autoscale: requests in flight per "
                       "replica that Ray Serve scales toward (default: half the engine's --max-num-seqs)")
    group.add_argument("--scale-up-delay", type=_non_negative_float, default=None,
                       help=f"autoscale: seconds of demand before adding a replica (default {DEFAULT_SCALE_UP_DELAY:g})")
    group.add_argument("--scale-down-delay", type=_non_negative_float, default=None,
                       help=f"autoscale: seconds of low demand before removing one (default "
                            f"{DEFAULT_SCALE_DOWN_DELAY:g})")
    group.add_argument("--replica-cpus", type=_positive_float, default=None,
                       help=f"CPUs each replica reserves from Ray (default {DEFAULT_REPLICA_CPUS:g}); its engine "
                            "runs that many threads unless --threads says otherwise")


@dataclass(frozen=True, kw_only=True)
class ScaleSettings:
    """How many replicas each chat model runs, and where."""

    num_replicas: int  # at start
    ray_address: str | None
    min_replicas: int | None  # None: no autoscaling
    max_replicas: int | None
    target_ongoing_requests: float | None  # None: from the engine's batch size
    scale_up_delay: float
    scale_down_delay: float
    replica_cpus: float

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.max_replicas is not None else self.num_replicas


def scale_settings(args: argparse.Namespace) -> ScaleSettings | None:
    """The settings the flags make; None when none is given (one process, no Ray). ValueError
    for flags that contradict each other or that only autoscaling takes, given without it."""
    given = [args.replicas, args.ray_address, args.min_replicas, args.max_replicas, args.target_ongoing_requests,
             args.scale_up_delay, args.scale_down_delay, args.replica_cpus]
    if all(value is None for value in given):
        return None
    autoscaling = args.min_replicas is not None or args.max_replicas is not None
    if not autoscaling:
        for flag, value in (("--target-ongoing-requests", args.target_ongoing_requests),
                            ("--scale-up-delay", args.scale_up_delay), ("--scale-down-delay", args.scale_down_delay)):
            if value is not None:
                raise ValueError(f"{flag} sets autoscaling: give --min-replicas and --max-replicas with it")
    low = args.min_replicas if args.min_replicas is not None else 1
    high = args.max_replicas if args.max_replicas is not None else max(low, args.replicas or 1)
    start = args.replicas if args.replicas is not None else max(low, 1)
    if autoscaling and not low <= start <= high:
        raise ValueError(f"--replicas {start} is outside --min-replicas {low} .. --max-replicas {high}")
    return ScaleSettings(num_replicas=start, ray_address=args.ray_address,
                         min_replicas=low if autoscaling else None, max_replicas=high if autoscaling else None,
                         target_ongoing_requests=args.target_ongoing_requests,
                         scale_up_delay=_or(args.scale_up_delay, DEFAULT_SCALE_UP_DELAY),
                         scale_down_delay=_or(args.scale_down_delay, DEFAULT_SCALE_DOWN_DELAY),
                         replica_cpus=_or(args.replica_cpus, DEFAULT_REPLICA_CPUS))


def replica_settings(args: argparse.Namespace) -> ScaleSettings:
    """scale_settings, with one replica per chat model when no flag asks for more (the
    application built for `serve run` from flags that name none)."""
    settings = scale_settings(args)
    return settings if settings is not None else scale_settings(argparse.Namespace(**{**vars(args), "replicas": 1}))


_PROXY_SETTLES = (("--host", "host"), ("--port", "port"), ("--read-timeout", "read_timeout"),
                  ("--write-timeout", "write_timeout"), ("--max-connections", "max_connections"))


def check_proxy_listening(args: argparse.Namespace, defaults: argparse.Namespace) -> None:
    """Behind Ray Serve's HTTP proxy (`serve run lmserve.scale:app`): it listens where the
    cluster's Serve is configured to, on a port, over plain HTTP, with its own connection
    settings. ValueError for flags asking otherwise (`defaults`: the flags' values when not given)."""
    if args.host.endswith(".sock"):
        raise ValueError("serve run: Ray Serve's proxy listens on a host and port, not a UNIX socket "
                         "(lmserve serve --replicas listens on one)")
    if getattr(args, "ssl_key_file", None) or getattr(args, "ssl_cert_file", None):
        raise ValueError("serve run: Ray Serve's proxy speaks plain HTTP; put TLS in front of it "
                         "(lmserve serve --replicas takes --ssl-key-file and --ssl-cert-file)")
    given = [flag for flag, name in _PROXY_SETTLES if getattr(args, name) != getattr(defaults, name)]
    if given:
        raise ValueError(f"serve run: {', '.join(given)} would change nothing: Ray Serve's proxy answers HTTP, "
                         "as the cluster's Serve configures it (http_options); lmserve serve --replicas takes them")


def check_node_address(settings: ScaleSettings) -> None:
    """`lmserve serve --replicas` answers HTTP from the machine it runs on, which must be a node of
    the cluster: a Ray client address (ray://) names a cluster from outside it."""
    if settings.ray_address is not None and settings.ray_address.startswith("ray://"):
        raise ValueError(f"--ray-address {settings.ray_address}: lmserve serve answers HTTP from the machine it "
                         "runs on, which must be a node of the cluster: run it on one with --ray-address auto (or "
                         "HEAD:6379), or deploy with serve run lmserve.scale:app")


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not above 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value
