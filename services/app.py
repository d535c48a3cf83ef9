"""Builds the LongMem Serve application: `serve run deploy/serve.yaml`, or `longmem serve`.

The builder starts (or finds) the detached bank and shard actors, then binds the gateway to the
encoder and reader deployments, which autoscale (serve.encoder_autoscaling / reader_autoscaling)
and batch concurrent requests (serve.batch_max_requests). Encoder and reader replicas ask for the `lm_node` resource when the
cluster has it, so both land on the LM nodes and hidden states move through the node's object store.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve.config import gRPCOptions

from longmem.backbone import model_dims
from longmem.config import LongMemConfig

from .bank import start_bank
from .encoder import EncoderDeployment
from .gateway import Gateway
from .reader import ReaderDeployment

SERVICER = "services.proxy.add_servicer"  # registers longmem.v1.LongMem inside the proxy
APP_NAME = "longmem"


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
