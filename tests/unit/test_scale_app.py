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
