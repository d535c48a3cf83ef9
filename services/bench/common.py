"""What the service benchmarks share: a local Ray instance of their own, free ports, the bench's
config, the threads a replica or actor gets."""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator
from typing import Any

import torch

from longmem.bench.common import log
from longmem.config import LongMemConfig

from ..app import serve_environment

SHARD_BUDGET_HEADROOM = 1.05  # shard byte budget: the biggest memory on one shard, x this ...
SHARD_BUDGET_EXTRA_BYTES = 64 << 20  # ... plus this
READY_TIMEOUT_S = 300.0  # Serve deploy until the gRPC API answers
RAY_START_ATTEMPTS = 2  # a local Ray instance may time out starting on a busy machine: try once more
BENCH_NAMESPACE = "longmem-bench"  # Ray namespace of the bank and shard actors the benchmarks start


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on loopback, never one this process was given before: two servers started
    together (a gRPC and an HTTP port) must not be handed the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@contextlib.contextmanager
def local_ray(config: LongMemConfig, num_cpus: float) -> Iterator[None]:
    """A fresh local Ray instance of our own for the block (never a cluster that happens to run), with at
    least `num_cpus` logical CPUs so that every actor the benchmark starts is scheduled."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("the service benchmarks start their own local Ray instance; call them with Ray not "
                           "initialized")
    serve_environment(config)
    cpus = max(len(os.sched_getaffinity(0)), math.ceil(num_cpus))  # Ray takes whole CPUs only
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(address="local", namespace=config.serve.namespace, num_cpus=cpus, include_dashboard=False,
                     log_to_driver=False, logging_level="WARNING")
            break
        except Exception as e:  # Ray raises a bare Exception when its raylet is slow to register
            ray.shutdown()
            if attempt == RAY_START_ATTEMPTS or "timed out during startup" not in str(e):
                raise
            log(f"local Ray did not start ({e}); trying again")
    try:
        yield
    finally:
        ray.shutdown()


def bench_config(config: LongMemConfig, storage: str, **serve: Any) -> LongMemConfig:
    """A copy of `config` whose services listen on free ports, keep state under `storage`, and name their
    actors in BENCH_NAMESPACE."""
    data = config.to_dict()
    data["serve"].update(grpc_port=free_port(), http_port=free_port(), storage_uri=storage,
                         namespace=BENCH_NAMESPACE, **serve)
    return LongMemConfig.from_dict(data).validate()


def probe_threads(num_cpus: float, replica_threads: int) -> dict[str, Any]:
    """What a Ray worker granted `num_cpus` runs with (after set_replica_threads, as encoder and reader
    replicas apply serve.replica_torch_threads): OMP_NUM_THREADS, torch and faiss threads."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe() -> dict[str, Any]:
        import faiss

        from services.remote import set_replica_threads

        set_replica_threads(replica_threads)
        return {"num_cpus": num_cpus, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
                "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()}

    return ray.get(probe.remote())


def service_cpus(config: LongMemConfig) -> float:
    s = config.serve
    return (s.encoder_num_cpus + s.reader_num_cpus + s.gateway_num_cpus + s.bank_num_cpus
            + s.num_shards * s.shard_num_cpus)
