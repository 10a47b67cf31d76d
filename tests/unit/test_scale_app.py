"""The Ray Serve application object (`serve run lmserve.scale:app argv="..."`), built without
starting Ray: what it takes and what it refuses."""

from __future__ import annotations

import pytest
from ray.serve import Application

import lmserve.scale
from lmserve.scale.application import deployment_name


def test_serve_run_finds_the_application_builder():
    application = lmserve.scale.app({"argv": "--replicas 2 --no-embedding-model --max-model-len 2048"})
    assert isinstance(application, Application)
    ingress = application._bound_deployment
    assert ingress.name == "lmserve-ingress" and ingress._deployment_config.num_replicas == 1
    engines = ingress.init_args[2]
    assert list(engines) == ["SmolLM2-135M-Instruct"]
    engine = engines["SmolLM2-135M-Instruct"]
    assert engine._bound_deployment.name == "lmserve-engine-SmolLM2-135M-Instruct"
    assert engine._bound_deployment._deployment_config.num_replicas == 2
    assert engine._bound_deployment.init_args[0].num_threads == 1  # the one CPU each replica reserves (--replica-cpus)


def test_replicas_run_the_threads_given_or_their_cpus():
    def threads(argv: str) -> int:
        application = lmserve.scale.app({"argv": argv + " --no-embedding-model"})
        return application._bound_deployment.init_args[2]["SmolLM2-135M-Instruct"]._bound_deployment.init_args[0].num_threads

    assert threads("--replicas 1 --replica-cpus 2") == 2
    assert threads("--replicas 2 --replica-cpus 2 --threads 3") == 3


def test_serve_run_without_replica_flags_runs_one_replica():
    application = lmserve.scale.app({"argv": "--no-embedding-model"})
    settings = application._bound_deployment.init_args[1]
    assert (settings.num_replicas, settings.autoscaling) == (1, False)
    engine = application._bound_deployment.init_args[2]["SmolLM2-135M-Instruct"]
    assert engine._bound_deployment._deployment_config.num_replicas == 1


def test_autoscaling_flags_become_the_deployments_autoscaling_config():
    application = lmserve.scale.app({"argv": ["--min-replicas", "0", "--max-replicas", "3",
                                              "--target-ongoing-requests", "6", "--no-embedding-model"]})
    engine = application._bound_deployment.init_args[2]["SmolLM2-135M-Instruct"]
    scaling = engine._bound_deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (0, 3, 6)


def test_the_builder_takes_argv_only_and_checks_the_flags():
    with pytest.raises(ValueError, match="argv"):
        lmserve.scale.app({"model": "x.gguf"})
    with pytest.raises(ValueError, match="UNIX socket"):
        lmserve.scale.app({"argv": "--replicas 2 --host /tmp/lmserve.sock"})


def test_deployment_names_keep_to_safe_characters():
    assert deployment_name("org/model:Q4 v2") == "lmserve-engine-org-model-Q4-v2"


def test_lmserve_serve_deploys_models_as_they_load_from_an_ingress_on_its_machine():
    from lmserve.cli import build_parser
    from lmserve.scale.application import ModelDeployments, build_application, model_app_name

    args = build_parser().parse_args(["serve", "--replicas", "2", "--no-embedding-model"])
    application = build_application(args, {"host": "127.0.0.1", "port": 8080}, node_ip="10.1.2.3")
    ingress = application._bound_deployment
    engines, listen = ingress.init_args[2], ingress.init_args[3]
    assert isinstance(engines, ModelDeployments) and listen == {"host": "127.0.0.1", "port": 8080}
    assert ingress._deployment_config.num_replicas == 1
    assert ingress.ray_actor_options["resources"] == {"node:10.1.2.3": 0.001}
    assert model_app_name("org/model:Q4") == "lmserve-model-org-model-Q4"


def _deployments():
    from lmserve.cli import build_parser
    from lmserve.scale.application import build_application

    args = build_parser().parse_args(["serve", "--replicas", "2", "--no-embedding-model"])
    application = build_application(args, {"host": "127.0.0.1", "port": 8080}, node_ip="10.1.2.3")
    return application._bound_deployment.init_args[2]  # ModelDeployments: 2 replicas x 1 CPU


class _Entry:
    id = "second"


def _free_cpus(monkeypatch, values: list[float]) -> list[float]:
    """ray.available_resources() answering `values` in turn (the last one after); returns the
    CPU counts it gave."""
    import ray

    given: list[float] = []

    def available_resources() -> dict[str, float]:
        given.append(values[min(len(given), len(values) - 1)])
        return {"CPU": given[-1]}

    monkeypatch.setattr(ray, "available_resources", available_resources)
    return given


def test_a_load_right_after_an_unload_waits_for_the_cpus_the_unload_frees(monkeypatch):
    from lmserve.scale import application

    monkeypatch.setattr(application.serve, "delete", lambda *args, **kwargs: None)
    monkeypatch.setattr(application, "ROOM_POLL_S", 0.0)
    deployments = _deployments()
    deployments.delete("SmolLM2-135M-Instruct")
    given = _free_cpus(monkeypatch, [0.0, 0.0, 1.0, 2.0])
    deployments._check_room(_Entry())  # no FleetBusy: the room came back
    assert given == [0.0, 0.0, 1.0, 2.0]


def test_no_room_without_an_unload_is_refused_at_once_and_after_one_when_the_cpus_stay_taken(monkeypatch):
    from lmserve.fleet.fleet import FleetBusy
    from lmserve.scale import application

    monkeypatch.setattr(application.serve, "delete", lambda *args, **kwargs: None)
    monkeypatch.setattr(application, "ROOM_POLL_S", 0.0)
    monkeypatch.setattr(application, "ROOM_WAIT_S", 0.05)
    deployments = _deployments()
    given = _free_cpus(monkeypatch, [1.0])
    with pytest.raises(FleetBusy, match="no room for second's replicas"):
        deployments._check_room(_Entry())
    assert given == [1.0]  # asked once: nothing was being released
    deployments.delete("SmolLM2-135M-Instruct")
    with pytest.raises(FleetBusy, match="1 of this machine's"):
        deployments._check_room(_Entry())
    assert len(given) > 2  # it waited, asking again, before refusing
