"""`lmserve serve`'s replica flags: what settings they make, and the combinations refused by name."""

from __future__ import annotations

import pytest

from lmserve.cli import build_parser
from lmserve.scale.options import DEFAULT_SCALE_UP_DELAY, scale_settings


def settings(*flags: str):
    return scale_settings(build_parser().parse_args(["serve", "model.gguf", *flags]))


def test_no_replica_flag_means_one_process():
    assert settings() is None


def test_a_fixed_number_of_replicas():
    fixed = settings("--replicas", "3")
    assert (fixed.num_replicas, fixed.autoscaling, fixed.most_replicas, fixed.ray_address) == (3, False, 3, None)
    assert fixed.replica_cpus == 1.0


def test_joining_a_cluster_starts_one_replica():
    joined = settings("--ray-address", "ray://head:10001")
    assert (joined.num_replicas, joined.ray_address) == (1, "ray://head:10001")


def test_autoscaling_bounds_and_target():
    scaled = settings("--min-replicas", "0", "--max-replicas", "4", "--replicas", "2", "--target-ongoing-requests",
                      "8", "--scale-down-delay", "60")
    assert scaled.autoscaling and (scaled.min_replicas, scaled.max_replicas, scaled.num_replicas) == (0, 4, 2)
    assert (scaled.target_ongoing_requests, scaled.scale_up_delay, scaled.scale_down_delay) == (
        8.0, DEFAULT_SCALE_UP_DELAY, 60.0)
    assert scaled.most_replicas == 4


def test_max_alone_starts_at_the_minimum_of_one():
    scaled = settings("--max-replicas", "3")
    assert (scaled.min_replicas, scaled.num_replicas, scaled.max_replicas) == (1, 1, 3)


@pytest.mark.parametrize("flags, named", [
    (["--target-ongoing-requests", "4"], "--target-ongoing-requests"),
    (["--replicas", "2", "--scale-up-delay", "5"], "--scale-up-delay"),
    (["--replicas", "2", "--scale-down-delay", "5"], "--scale-down-delay"),
    (["--replicas", "5", "--max-replicas", "4"], "--replicas 5"),
    (["--replicas", "1", "--min-replicas", "2", "--max-replicas", "3"], "--min-replicas 2"),
])
def test_contradictions_are_refused_by_name(flags, named):
    with pytest.raises(ValueError, match=named):
        settings(*flags)


@pytest.mark.parametrize("flags", [["--replicas", "0"], ["--max-replicas", "0"], ["--min-replicas", "-1"],
                                   ["--replica-cpus", "0"], ["--target-ongoing-requests", "0"]])
def test_out_of_range_values_stop_the_parser(flags):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "model.gguf", *flags])
