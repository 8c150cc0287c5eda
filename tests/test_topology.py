"""The Ray app's topologies as configuration, without a cluster: defaults, what is refused, the Serve
options each deployment gets, and the flags of serve/run.py and serve/config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve.app import _pinned_version, app_builder, deployment_options
from serve.config import ServiceConfig
from serve.run import parse_args

CONFIG_YAML = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"


def test_colocated_is_the_default_and_batching_follows_the_topology() -> None:
    assert ServiceConfig().topology == "colocated" and parse_args([]).topology == "colocated"
    assert ServiceConfig().batching is False and ServiceConfig(topology="split").batching is True
    assert ServiceConfig(batching=True).batching is True
    assert ServiceConfig(topology="split", batching=False).batching is False
    assert parse_args(["--topology", "split"]).batching is True and parse_args(["--batching"]).batching is True


@pytest.mark.parametrize(("fields", "field"), [
    ({"ingress_replicas": 2}, "ingress_replicas"),
    ({"replicas": 3, "autoscaling_max_replicas": 2}, "autoscaling_max_replicas"),
    ({"topology": "both"}, "topology"),
])
def test_what_a_topology_cannot_take_is_refused_with_the_field_named(fields: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        ServiceConfig(**fields)


def test_colocated_is_one_deployment_scaled_by_replicas_or_autoscaling() -> None:
    config = ServiceConfig(replicas=2, variant="onnx-fp32")
    (name, options), = deployment_options(config).items()
    assert name == "RankingService" and options["num_replicas"] == 2
    assert options["user_config"] == config.ranker_user_config()
    assert options["max_ongoing_requests"] >= config.ingress_max_ongoing_requests
    batched = ServiceConfig(batching=True, max_batch_docs=8192)
    assert deployment_options(batched)["RankingService"]["max_ongoing_requests"] >= 8192 // 16  # a batch can fill
    auto = deployment_options(ServiceConfig(replicas=1, autoscaling_max_replicas=4))["RankingService"]
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4}


def test_split_is_an_ingress_keyed_on_the_model_and_a_batched_ranker() -> None:
    config = ServiceConfig(topology="split", replicas=3, ingress_replicas=2, variant="onnx-fp32")
    options = deployment_options(config)
    assert set(options) == {"Ingress", "Ranker"}
    assert options["Ranker"]["num_replicas"] == 3 and options["Ranker"]["user_config"]["batching"] is True
    assert options["Ingress"]["num_replicas"] == 2
    assert options["Ingress"]["user_config"] == {"variant": "onnx-fp32", "model": None, "manifest_path": None}


@pytest.mark.parametrize("topology", ["colocated", "split"])
def test_a_swap_keeps_the_pinned_versions_so_replicas_reconfigure_in_place(topology: str) -> None:
    config = ServiceConfig(topology=topology, variant="onnx-fp32")
    swapped = config.model_copy(update={"variant": "onnx-fp32-opt", "model": "other"})
    for role in ("colocated", "ranker", "ingress"):
        assert _pinned_version(config, role) == _pinned_version(swapped, role)
    assert _pinned_version(config, "ranker") != _pinned_version(config.model_copy(update={"replicas": 2}), "ranker")


def test_run_flags_and_config_yaml_know_the_topology() -> None:
    config = parse_args(["--topology", "split", "--replicas", "2", "--autoscaling-max-replicas", "5",
                         "--ingress-replicas", "2"])
    assert (config.topology, config.replicas, config.autoscaling_max_replicas, config.ingress_replicas) == (
        "split", 2, 5, 2)
    (app,) = yaml.safe_load(CONFIG_YAML.read_text())["applications"]
    assert app["args"]["topology"] == "colocated"
    assert ServiceConfig(**app["args"]).topology == "colocated"
    assert app_builder({**app["args"], "topology": "split"}) is not None
