"""Builds the LongMem Serve application: `serve run deploy/serve.yaml`, or `longmem serve`.

The builder starts (or finds) the detached bank and shard actors, then binds the gateway to the
encoder and reader deployments, which autoscale (serve.encoder_autoscaling / reader_autoscaling)
and batch concurrent requests (serve.batch_max_requests). Encoder and reader replicas ask for the `lm_node` resource when the
cluster has it, so both land on the LM nodes and hidden states move through the node's object store.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import ray
from ray import serve
from ray.serve.config import gRPCOptions

from longmem.backbone import model_dims
from longmem.config import LongMemConfig

from .bank import start_bank, stop_bank
from .encoder import EncoderDeployment
from .gateway import Gateway
from .reader import ReaderDeployment

SERVICER = "services.proxy.add_servicer"  # registers longmem.v1.LongMem inside the proxy
APP_NAME = "longmem"


PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"  # read by the Serve controller when it starts


def serve_environment(config: LongMemConfig) -> None:
    """Sets the environment the Serve controller reads at its start (inherited from this process by a
    Ray instance or simulated cluster started after this call): how long a proxy may take to be ready
    (serve.proxy_ready_timeout_s; Ray's 5 s fails Serve starts on a busy machine). A value the
    environment already has wins."""
    os.environ.setdefault(PROXY_READY_ENV, str(config.serve.proxy_ready_timeout_s))


@contextlib.contextmanager
def serving(config: LongMemConfig) -> Iterator[None]:
    """Serve with the gRPC API on serve.grpc_port and the application, on the Ray instance this process
    is connected to, for the block; Serve and the bank are stopped on exit, also when a start fails."""
    try:
        serve.start(grpc_options=grpc_options(config), http_options={"port": config.serve.http_port})
        serve.run(build(config), name=APP_NAME, route_prefix="/")
        yield
    finally:
        serve.shutdown()  # a no-op where Serve did not start
        stop_bank(config)


@contextlib.contextmanager
def local_service(config: LongMemConfig, **ray_init: Any) -> Iterator[None]:
    """LongMem (`serving`) on a fresh local Ray instance for the block (ray.init(address="local",
    **ray_init)); all of it is stopped on exit, also when a start fails, so a failed start leaves no
    Ray instance behind."""
    serve_environment(config)
    ray.init(address="local", namespace=config.serve.namespace, **ray_init)
    try:
        with serving(config):
            yield
    finally:
        ray.shutdown()


def grpc_options(config: LongMemConfig) -> gRPCOptions:
    return gRPCOptions(port=config.serve.grpc_port, grpc_servicer_functions=[SERVICER])


def _actor_options(config: LongMemConfig, num_cpus: float) -> dict[str, Any]:
    lm = config.serve.lm_resource
    resources = {lm: 0.01} if ray.cluster_resources().get(lm, 0) > 0 else {}
    return {"num_cpus": num_cpus, "resources": resources}


def build(config: LongMemConfig):
    dims = model_dims(config.backbone)
    start_bank(config, dims.num_kv_heads, dims.head_dim)
    cfg = config.to_dict()
    serve_cfg = config.serve
    encoder = EncoderDeployment.options(
        ray_actor_options=_actor_options(config, serve_cfg.encoder_num_cpus),
        autoscaling_config=serve_cfg.encoder_autoscaling,
        max_ongoing_requests=serve_cfg.replica_max_ongoing_requests).bind(cfg)
    reader = ReaderDeployment.options(
        ray_actor_options=_actor_options(config, serve_cfg.reader_num_cpus),
        autoscaling_config=serve_cfg.reader_autoscaling,
        max_ongoing_requests=serve_cfg.replica_max_ongoing_requests).bind(cfg)
    return Gateway.options(ray_actor_options={"num_cpus": config.serve.gateway_num_cpus},
                           max_ongoing_requests=config.serve.gateway_max_ongoing_requests,
                           max_queued_requests=config.serve.gateway_max_queued_requests).bind(cfg, encoder, reader)


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder. args: {"config": path or null, "overrides": ["section.key=value", ...]}."""
    args = args or {}
    return build(LongMemConfig.load(args.get("config"), args.get("overrides")).validate())
