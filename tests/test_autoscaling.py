"""Serve autoscaling of the model deployments under gRPC load, and the Prometheus metrics, on a local
Ray cluster with the tiny model. Autoscaling metrics are pushed every AUTOSCALING_PUSH_S and Ray's
metrics every METRICS_REPORT_MS (instead of 10 s each) so the test stays short; every wait is bounded."""

from __future__ import annotations

import os
import threading
import time
import urllib.request

import grpc
import pytest
from ray import serve

from conftest import TEXT, tiny_config
from longmem.v1 import longmem_pb2 as pb
from longmem.v1 import longmem_pb2_grpc as pbg
from services.app import APP_NAME, local_service
from tiny import free_port

AUTOSCALING_PUSH_S = "0.5"
# Each replica reports the requests it runs (not the gateway's handles, whose reports were seen to be
# missing for the encoder for minutes under load), sampled every look_back_period_s x this factor
# (Ray's 0.2: every 0.6 s here); every 60 ms instead, so a window's maximum sees the encoder's short
# passes however fast this machine is.
RECORD_INTERVAL_FACTOR = "0.02"
GENERATED_TOKENS = 48  # a Generate stream holds one reader request for its whole length
METRICS_REPORT_MS = 500
MAX_REPLICAS = 2
LOAD_CLIENTS = 8
SCALE_UP_DEADLINE_S = 240
SCALE_DOWN_DEADLINE_S = 60
METRICS_DEADLINE_S = 30
MODEL_DEPLOYMENTS = ("EncoderDeployment", "ReaderDeployment")
# A very low target, and the window's maximum rather than its mean: the tiny model is fast (an encode
# takes ~30 ms of a ~1.6 s append), so the encoder's mean ongoing requests is a few hundredths. With the
# maximum, one ongoing request seen in a look-back window asks for the maximum and an idle window for the
# minimum; with frequent samples and reader requests that last a whole stream, a window under load
# always sees one, so the decision depends on whether the load runs, not on this machine's speed.
AUTOSCALING = {"min_replicas": 1, "max_replicas": MAX_REPLICAS, "target_ongoing_requests": 0.01,
               "aggregation_function": "max", "upscale_delay_s": 0.5, "downscale_delay_s": 2.0,
               "look_back_period_s": 3.0, "metrics_interval_s": 0.5}


@pytest.fixture(scope="module")
def service(tiny_llama_dir, tmp_path_factory):
    env = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": AUTOSCALING_PUSH_S,
           "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": AUTOSCALING_PUSH_S,
           "RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR": RECORD_INTERVAL_FACTOR,
           "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the raylet and every worker of the local cluster
    config = tiny_config(tiny_llama_dir)
    port, metrics_port = free_port(), free_port()
    config.serve.grpc_port = port
    config.serve.storage_uri = str(tmp_path_factory.mktemp("storage"))
    config.serve.encoder_autoscaling = dict(AUTOSCALING)
    config.serve.reader_autoscaling = dict(AUTOSCALING)
    config.serve.encoder_num_cpus = config.serve.reader_num_cpus = 0.25
    config.memory.capacity_tokens = 64
    config.serve.http_port = free_port()
    try:
        with local_service(config, num_cpus=4, _metrics_export_port=metrics_port,
                           _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS}), \
                grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pbg.LongMemStub(channel), metrics_port
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def running_replicas() -> dict[str, int]:
    deployments = serve.status().applications[APP_NAME].deployments
    return {name: deployments[name].replica_states.get("RUNNING", 0) for name in MODEL_DEPLOYMENTS}


def wait_for(condition, deadline_s: float, poll_s: float = 0.5):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    return condition()


def test_model_deployments_scale_up_to_max_under_load_and_back_down(service):
    """Each deployment reaches its maximum while the load runs (not necessarily at the same moment)
    and both are back at their minimum after it."""
    stub, _ = service
    assert running_replicas() == {name: 1 for name in MODEL_DEPLOYMENTS}
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="autoscaled"))
    stop = threading.Event()
    done, failures = [], []

    def client(appends: bool):
        """Appends keep the encoder busy (encode and store); generation streams the reader."""
        while not stop.is_set():
            try:
                if appends:
                    stub.Append(pb.AppendRequest(memory_id="autoscaled", text=TEXT * 3), timeout=60)
                else:
                    for _ in stub.Generate(pb.GenerateRequest(prompt=TEXT, max_new_tokens=GENERATED_TOKENS),
                                           timeout=60):
                        pass
                done.append(1)
            except grpc.RpcError as e:
                failures.append(e.code())

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(LOAD_CLIENTS)]
    for t in threads:
        t.start()
    peak = {name: 1 for name in MODEL_DEPLOYMENTS}

    def reached_max() -> bool:
        for name, n in running_replicas().items():
            peak[name] = max(peak[name], n)
        return min(peak.values()) == MAX_REPLICAS

    try:
        wait_for(reached_max, SCALE_UP_DEADLINE_S)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert peak == {name: MAX_REPLICAS for name in MODEL_DEPLOYMENTS}, running_replicas()
    assert done and not failures
    back = wait_for(lambda: (lambda r: r if max(r.values()) == 1 else None)(running_replicas()),
                    SCALE_DOWN_DEADLINE_S)
    assert back == {name: 1 for name in MODEL_DEPLOYMENTS}, running_replicas()
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="autoscaled"))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_prometheus_metrics(service):
    stub, metrics_port = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="metered"))
    stub.Append(pb.AppendRequest(memory_id="metered", text=TEXT * 4))  # past the 64-token capacity: evictions
    stub.Score(pb.ScoreRequest(memory_id="metered", text=TEXT))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetMemory(pb.GetMemoryRequest(memory_id="missing"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    wanted = ['ray_longmem_tokens_appended', 'source="grpc"', 'ray_longmem_tokens_scored',
              'ray_longmem_memory_tokens', 'shard="shard-0"', 'ray_longmem_evicted_tokens',
              'ray_longmem_search_seconds_bucket', 'component="reader"', 'component="shard"',
              'ray_longmem_request_seconds_bucket', 'method="Append"', 'method="Score"',
              'ray_longmem_errors', 'code="NOT_FOUND"']
    text = wait_for(lambda: (lambda t: t if all(w in t for w in wanted) else None)(scrape(metrics_port)),
                    METRICS_DEADLINE_S, poll_s=1.0)
    assert text, [w for w in wanted if w not in scrape(metrics_port)]
    held = [line for line in text.splitlines() if line.startswith("ray_longmem_memory_tokens{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in held) >= 60  # the memory is full: ~64 tokens
    errors = [line for line in text.splitlines()
              if line.startswith("ray_longmem_errors") and 'code="NOT_FOUND"' in line and 'method="GetMemory"' in line]
    assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 1
