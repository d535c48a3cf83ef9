"""The cluster launcher config, Serve config and KubeRay manifest are valid for Ray 2.60."""

import importlib
import json
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import (
    gRPCOptionsSchema,
    HTTPOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
GRPC_PORT = 9000
SERVICER_FUNCTION = "services.proxy.add_servicer"


def load_yaml(relative_path: str):
    return yaml.safe_load((REPO_ROOT / relative_path).read_text())


def assert_known_keys(data: dict, schema: type[BaseModel], where: str) -> None:
    """Serve's schemas silently ignore unknown keys, so a misspelt option would go unnoticed."""
    unknown = set(data) - set(schema.model_fields)
    assert not unknown, f"unknown keys in {where}: {sorted(unknown)}"


def validate_serve_config(config: dict) -> ServeDeploySchema:
    assert_known_keys(config, ServeDeploySchema, "the Serve config")
    assert_known_keys(config["grpc_options"], gRPCOptionsSchema, "grpc_options")
    assert_known_keys(config["http_options"], HTTPOptionsSchema, "http_options")
    for app in config["applications"]:
        assert_known_keys(app, ServeApplicationSchema, f"application {app.get('name')}")
    return ServeDeploySchema.model_validate(config)


def import_function(dotted_path: str):
    module_name, _, attribute = dotted_path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


@pytest.fixture(scope="module")
def cluster_config():
    config = prepare_config(load_yaml("ray_cluster.yaml"))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def serve_config():
    return load_yaml("deploy/serve.yaml")


@pytest.fixture(scope="module")
def rayservice():
    return load_yaml("deploy/kuberay/rayservice.yaml")


def test_cluster_config_node_types(cluster_config):
    assert cluster_config["cluster_name"] == "longmem"
    node_types = cluster_config["available_node_types"]
    assert cluster_config["head_node_type"] == "head"
    assert set(node_types) == {"head", "lm_worker", "memory_node"}

    assert node_types["head"]["resources"].get("GPU", 0) == 0
    assert node_types["lm_worker"]["resources"]["GPU"] == 1
    assert node_types["lm_worker"]["resources"]["lm_node"] == 1
    assert node_types["memory_node"]["resources"]["memory_node"] == 1
    assert "lm_node" not in node_types["memory_node"]["resources"]
    assert "memory_node" not in node_types["lm_worker"]["resources"]


def test_cluster_config_opens_the_grpc_port(cluster_config):
    rules = cluster_config["provider"]["security_group"]["IpPermissions"]
    assert any(r["FromPort"] <= GRPC_PORT <= r["ToPort"] for r in rules)
    assert any("ray start --head" in c for c in cluster_config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster_config["worker_start_ray_commands"])


def test_serve_config(serve_config):
    schema = validate_serve_config(serve_config)
    assert schema.grpc_options.port == GRPC_PORT
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER_FUNCTION]
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    [app] = schema.applications
    assert (app.name, app.route_prefix) == ("longmem", "/")
    assert app.import_path == "services.app:build_app"
    assert app.args == {"config": None}


def test_serve_config_autoscales_and_batches_the_model_deployments(serve_config):
    from longmem.config import LongMemConfig
    from services.encoder import EncoderDeployment
    from services.reader import ReaderDeployment

    [app] = validate_serve_config(serve_config).applications
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {EncoderDeployment.name, ReaderDeployment.name}
    for d in deployments.values():
        auto = d.autoscaling_config
        assert 1 <= auto["min_replicas"] < auto["max_replicas"]
        assert d.max_ongoing_requests >= LongMemConfig().serve.batch_max_requests
        assert d.max_ongoing_requests >= auto["target_ongoing_requests"]


def test_grpc_servicer_function_is_importable(serve_config):
    for dotted_path in serve_config["grpc_options"]["grpc_servicer_functions"]:
        assert callable(import_function(dotted_path))


def test_rayservice_manifest(rayservice, serve_config):
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    validate_serve_config(embedded)
    assert embedded == serve_config, "serveConfigV2 must match deploy/serve.yaml"


def test_rayservice_head_ports(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    [container] = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == GRPC_PORT
    assert ports["serve"] == 8000
    assert ports["dashboard"] == 8265
    assert ports["gcs"] == 6379


def test_rayservice_worker_groups(rayservice):
    groups = {
        g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    assert set(groups) == {"lm-workers", "memory-nodes"}

    def custom_resources(group):
        # KubeRay takes the value as a quoted, escaped JSON object: '"{\"lm_node\": 1}"'.
        return json.loads(json.loads(group["rayStartParams"]["resources"]))

    def limits(group):
        [container] = group["template"]["spec"]["containers"]
        return container["resources"]["limits"]

    assert custom_resources(groups["lm-workers"]) == {"lm_node": 1}
    assert limits(groups["lm-workers"])["nvidia.com/gpu"] == 1
    assert custom_resources(groups["memory-nodes"]) == {"memory_node": 1}
    assert "nvidia.com/gpu" not in limits(groups["memory-nodes"])
