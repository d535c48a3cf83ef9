"""The services on a simulated multi-node cluster (ray.cluster_utils.Cluster), one per module:
a head and three memory nodes, each with a small shard byte budget; Serve gRPC on a free port."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from ray.cluster_utils import Cluster

from longmem.config import LongMemConfig
from longmem.data import essays_document
from longmem.memory import CapacityExceeded, Chunker, ChunkStore, MemoryNotFound
from longmem.model import LongMem
from longmem.v1 import longmem_pb2 as pb
from longmem.v1 import longmem_pb2_grpc as pbg
from services.app import APP_NAME, build, grpc_options
from services.bank import RemoteBank, stop_bank
from tiny import free_port, save_tiny

NODES = 3
TEXT_SHORT = "The quick brown fox jumps over the lazy dog. Memory lets a model read far back."
CLUSTER: dict[str, Cluster] = {}  # the module's cluster, for the test that removes a node
SHARD_BUDGET = 150_000  # bytes: ~215 chunks (~860 tokens) of the tiny model per shard (float16 memory)



@pytest.fixture(scope="module")
def service(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    port = free_port()
    config = LongMemConfig.from_dict({
        "backbone": {"name_or_path": str(path)},
        "read": {"segment_tokens": 64},
        "memory": {"capacity_tokens": 256, "topk_tokens": 8, "chunk_size": 4},
        "serve": {"num_shards": NODES, "shard_budget_bytes": SHARD_BUDGET, "grpc_port": port,
                  "storage_uri": str(tmp_path_factory.mktemp("storage")), "shard_retry_seconds": 60},
    }).validate()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    CLUSTER["cluster"] = cluster
    nodes = [cluster.add_node(num_cpus=1, resources={"memory_node": 1}) for _ in range(NODES)]
    ray.init(address=cluster.address, namespace=config.serve.namespace)
    serve.start(grpc_options=grpc_options(config), http_options={"port": free_port()})
    serve.run(build(config), name=APP_NAME, route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield config, pbg.LongMemStub(channel), RemoteBank(config), nodes
    finally:
        channel.close()
        serve.shutdown()
        stop_bank(config)
        ray.shutdown()
        cluster.shutdown()


def test_shards_spread_over_memory_nodes(service):
    _, _, bank, nodes = service
    stats = ray.get(bank.handle.shard_stats.remote())
    assert len(stats) == NODES
    assert {s.node_id for s in stats} == {n.node_id for n in nodes}


def test_memory_larger_than_one_node_is_striped(service):
    config, _, bank, _ = service
    chunk_bytes = ChunkStore.bytes_per_chunk(4, 2, 16, config.memory.dtype)
    capacity = (SHARD_BUDGET // chunk_bytes) * 4 * 2  # twice what one shard can hold
    with pytest.raises(CapacityExceeded):
        bank.create("too-big-for-one", capacity, 1)
    info = bank.create("striped", capacity, NODES)
    try:
        assert info.num_shards == NODES
        per_shard = [s.reserved_bytes for s in ray.get(bank.handle.shard_stats.remote())]
        assert all(0 < b <= SHARD_BUDGET for b in per_shard)
    finally:
        bank.delete("striped")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), shards=st.integers(1, NODES), capacity_chunks=st.integers(3, 60),
       pieces=st.lists(st.integers(1, 90), min_size=1, max_size=5))
def test_sharded_search_equals_flat_index_and_fifo_is_global(service, seed, shards, capacity_chunks, pieces):
    config, _, bank, _ = service
    rng = np.random.default_rng(seed)
    c, hkv, d, hq = 4, 2, 16, 4
    memory_id = f"prop-{seed}-{shards}-{capacity_chunks}"
    bank.create(memory_id, capacity_chunks * c, shards)
    dtype = config.memory.dtype  # the shards store keys/values in it
    flat_chunker, flat = Chunker(c, hkv, d, dtype), ChunkStore(capacity_chunks, c, hkv, d, dtype)
    try:
        for n in pieces:
            keys, values = rng.standard_normal((2, n, hkv, d)).astype(np.float32)
            ids = rng.integers(0, 300, n).astype(np.int32)
            bank.append(memory_id, keys, values, ids, skip_first=1)
            flat.add(flat_chunker.push(keys, values, ids, skip_first=1))
        info = bank.stats(memory_id)
        assert info.tokens_held == flat.live * c <= capacity_chunks * c
        assert info.tokens_evicted == flat.evicted * c
        assert info.pending_tokens == flat_chunker.pending_tokens
        import torch

        queries = torch.from_numpy(rng.standard_normal((1, 5, hq, d)).astype(np.float32))
        for k in (3, capacity_chunks):
            got = bank.search([[memory_id]], queries, k)[0]
            want = flat.search(queries[0].numpy(), k)
            np.testing.assert_array_equal(got.seqs, want.seqs)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got.positions, want.positions)
            np.testing.assert_allclose(got.keys, want.keys)
        newest = set(range(flat_chunker.next_seq - flat.live, flat_chunker.next_seq))
        everything = bank.search([[memory_id]], queries, capacity_chunks)[0]
        assert set(everything.seqs[0, 0][everything.seqs[0, 0] >= 0].tolist()) == newest
    finally:
        bank.delete(memory_id)


def test_score_through_service_equals_core(service):
    config, stub, _, _ = service
    text = essays_document()[:3000]
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="parity", capacity_tokens=256, num_shards=NODES))
    try:
        stub.Append(pb.AppendRequest(memory_id="parity", text=text[:1500]))
        remote = stub.Score(pb.ScoreRequest(memory_id="parity", text=text[1500:]))
        local = LongMem(config)
        local.create_memory("parity", 256)
        local.append("parity", text[:1500])
        core = local.score(text[1500:], "parity")
        assert remote.num_scored_tokens == len(core.logprobs) > 3 * config.read.segment_tokens
        np.testing.assert_allclose(remote.logprobs, core.logprobs, atol=1e-4)
        np.testing.assert_allclose(remote.backbone_logprobs, core.backbone_logprobs, atol=1e-4)
        assert abs(remote.perplexity - core.perplexity) < 1e-3 * core.perplexity
        with_memory_differs = np.abs(np.array(remote.logprobs) - np.array(remote.backbone_logprobs)).max()
        assert with_memory_differs > 1e-3
        alone = stub.Score(pb.ScoreRequest(memory_id="parity", text=text[1500:], skip_backbone_logprobs=True))
        np.testing.assert_array_equal(alone.logprobs, remote.logprobs)  # the baseline is not part of the reading
        assert len(alone.backbone_logprobs) == 0 and math.isnan(alone.backbone_perplexity)
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="parity"))


def test_fifo_eviction_across_shards_through_the_api(service):
    _, stub, _, _ = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="fifo", capacity_tokens=64, num_shards=NODES))
    try:
        appended = stub.Append(pb.AppendRequest(memory_id="fifo", token_ids=list(range(10, 210)))).memory
        assert appended.tokens_appended == 200
        assert appended.tokens_held == 64
        dropped_sinks = 4  # segments of 64 tokens: 4 segments, each first token is a sink
        assert appended.tokens_held + appended.tokens_evicted + appended.pending_tokens == 200 - dropped_sinks
        spans = stub.Retrieve(pb.RetrieveRequest(memory_id="fifo", text="the lazy dog", max_spans=64)).spans
        assert spans and min(s.start_position for s in spans) >= 200 - 64 - appended.pending_tokens - 1
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="fifo"))


def run_cli(port: int, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LONGMEM_TARGET=f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-m", "longmem.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=120)


def test_end_to_end_from_a_separate_client_process(service, tmp_path):
    config, _, _, _ = service
    port = config.serve.grpc_port
    doc = tmp_path / "doc.txt"
    text = essays_document()[:6000].encode("ascii", "ignore").decode()  # spans must decode to substrings
    doc.write_text(text)

    out = run_cli(port, "memory", "create", "--id", "e2e", "--capacity", "512", "--shards", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["num_shards"] == 2
    out = run_cli(port, "append", "e2e", "--file", str(doc), "--json")
    assert out.returncode == 0, out.stderr
    assert int(json.loads(out.stdout)["tokens_appended"]) > 1000
    out = run_cli(port, "score", "--memory", "e2e", "--text", "The most important thing is to make something people want.", "--json")
    assert out.returncode == 0, out.stderr
    assert float(json.loads(out.stdout)["perplexity"]) > 1
    out = run_cli(port, "score-choices", "--memory", "e2e", "--prefix", "Startups", "--choice", " grow", "--choice", " die", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["choices"]) == 2
    out = run_cli(port, "generate", "--memory", "e2e", "--prompt", "Founders", "--max-new-tokens", "6", "--json")
    assert out.returncode == 0, out.stderr
    chunks = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert sum(len(c.get("token_ids", [])) for c in chunks) == 6 and chunks[-1]["finish_reason"] == "length"
    out = run_cli(port, "retrieve", "e2e", "--text", "how to raise money", "--json")
    assert out.returncode == 0, out.stderr
    spans = json.loads(out.stdout)["spans"]
    assert spans and all(s["text"] in text for s in spans)
    out = run_cli(port, "memory", "delete", "e2e")
    assert out.returncode == 0, out.stderr
    out = run_cli(port, "memory", "get", "e2e")
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr


def test_the_readme_client_examples_run_against_the_service(service, tmp_path):
    from test_examples import EXAMPLES

    config, _, _, _ = service
    target = f"127.0.0.1:{config.serve.grpc_port}"
    book = tmp_path / "book.txt"
    book.write_text(essays_document()[:3000])
    out = subprocess.run([sys.executable, str(EXAMPLES / "client.py"), str(book), "--target", target],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.splitlines()[0]) > 1
    env = dict(os.environ, LONGMEM_TARGET=target, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    out = subprocess.run(["bash", str(EXAMPLES / "client_cli.sh"), str(book)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "book-cli" in out.stdout and "perplexity" in out.stdout


@pytest.mark.parametrize("call, request_msg, code, field", [
    ("GetMemory", pb.GetMemoryRequest(memory_id="missing"), grpc.StatusCode.NOT_FOUND, "missing"),
    ("GetMemory", pb.GetMemoryRequest(), grpc.StatusCode.INVALID_ARGUMENT, "memory_id"),
    ("CreateMemory", pb.CreateMemoryRequest(memory_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "memory_id"),
    ("CreateMemory", pb.CreateMemoryRequest(capacity_tokens=6), grpc.StatusCode.INVALID_ARGUMENT, "capacity_tokens"),
    ("CreateMemory", pb.CreateMemoryRequest(num_shards=99), grpc.StatusCode.INVALID_ARGUMENT, "num_shards"),
    ("CreateMemory", pb.CreateMemoryRequest(capacity_tokens=10**7, num_shards=1),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "fit"),
    ("CreateMemory", pb.CreateMemoryRequest(capacity_tokens=4096, num_shards=1), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "bytes free"),
    ("Append", pb.AppendRequest(memory_id="missing", text="hello"), grpc.StatusCode.NOT_FOUND, "missing"),
    ("Append", pb.AppendRequest(memory_id="missing", text="hello", request_id="r" * 129), grpc.StatusCode.INVALID_ARGUMENT,
     "request_id"),
    ("Score", pb.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    ("Score", pb.ScoreRequest(token_ids=[1, 10**6]), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ("Score", pb.ScoreRequest(text="a b", token_ids=[1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "token_ids"),
    ("ScoreChoices", pb.ScoreChoicesRequest(prefix="a"), grpc.StatusCode.INVALID_ARGUMENT, "choices"),
    ("Retrieve", pb.RetrieveRequest(memory_id="missing", text="x"), grpc.StatusCode.NOT_FOUND, "missing"),
])
def test_bad_requests_get_clear_status_codes(service, call, request_msg, code, field):
    _, stub, _, _ = service
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, call)(request_msg)
    assert err.value.code() == code
    assert field in err.value.details()
    assert "Traceback" not in err.value.details() and "ray::" not in err.value.details()  # the message alone


def test_generate_errors_reach_the_stream(service):
    _, stub, _, _ = service
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=10**6)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_new_tokens" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="hi", memory_id="missing")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_generate_stream_whose_reader_dies_ends_unavailable(service):
    """The reader replica killed (kill -9) while it streams: the stream ends with UNAVAILABLE and a
    retry hint, not with a hang or a truncated OK; Serve replaces the replica and a retry streams again."""
    import signal
    import time

    _, stub, _, _ = service
    pid = _replica_pid("ReaderDeployment")
    stream = stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=500), timeout=120)
    chunks = []
    with pytest.raises(grpc.RpcError) as err:
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                os.kill(pid, signal.SIGKILL)
    assert _retryable(err.value.code(), err.value.details())
    assert 3 <= len(chunks) < 500 and not any(c.finish_reason for c in chunks)
    deadline = time.time() + 120
    while True:  # the controller starts a new reader replica
        try:
            done = list(stub.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=5), timeout=60))
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.time() < deadline
            time.sleep(1)
    assert done[-1].finish_reason in ("length", "eos")


def test_unknown_memory_in_bank_raises_not_found(service):
    _, _, bank, _ = service
    with pytest.raises(MemoryNotFound):
        bank.stats("never-created")


def _complete_and_untorn(bank: RemoteBank, memory_id: str) -> list[int]:
    """Every live chunk of the memory is found on its shard: no holes from a half-applied append."""
    import torch

    info = bank.stats(memory_id)
    capacity_chunks = info.capacity_tokens // 4
    queries = torch.randn(1, 2, 4, 16)
    hits = bank.search([[memory_id]], queries, capacity_chunks)[0]
    found = sorted(set(hits.seqs[hits.seqs >= 0].tolist()))
    live = info.tokens_held // 4
    newest = (info.tokens_held + info.tokens_evicted) // 4
    assert found == list(range(newest - live, newest))
    return found


def _append_load(stub, memory_id: str, threads: int, appends: int, size: int):
    """Bounded concurrent Append load; returns (acknowledged token counts, error codes)."""
    import threading

    acked, errors, lock = [], [], threading.Lock()

    def worker(w: int) -> None:
        for i in range(appends):
            ids = [(w * 37 + i * 11 + j) % 250 + 1 for j in range(size)]
            try:
                stub.Append(pb.AppendRequest(memory_id=memory_id, token_ids=ids), timeout=120)
                with lock:
                    acked.append(size)
            except grpc.RpcError as e:
                with lock:
                    errors.append((e.code(), e.details()))

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    return pool, acked, errors


def _client_append_load(port: int, memory_id: str, threads: int, appends: int, size: int):
    """The same load through the Python client (a request id per append, resent on UNAVAILABLE);
    returns (threads, acknowledged token counts, exceptions)."""
    import threading

    from longmem.client import LongMemClient

    acked, failed, lock = [], [], threading.Lock()

    def worker(w: int) -> None:
        with LongMemClient(f"127.0.0.1:{port}", timeout=120) as client:
            for i in range(appends):
                try:
                    client.append(memory_id, token_ids=[(w * 37 + i * 11 + j) % 250 + 1 for j in range(size)])
                    with lock:
                        acked.append(size)
                except Exception as e:
                    with lock:
                        failed.append(e)

    pool = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
    return pool, acked, failed


def _replica_pid(deployment: str) -> int:
    """The process id of a Serve deployment's (first) replica actor."""
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if deployment in a["name"])
    return ray.get(ray.get_actor(replica["name"], namespace=replica["namespace"]).__ray_call__.remote(
        lambda self: os.getpid()))


def _retryable(code, details: str) -> bool:
    """UNAVAILABLE with a retry hint and no traceback: what an outage must answer."""
    return code == grpc.StatusCode.UNAVAILABLE and "retry" in details and "Traceback" not in details


def test_kill_9_a_shard_under_load_loses_no_acknowledged_append(service):
    import signal
    import time

    _, stub, bank, _ = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="crash", capacity_tokens=1024, num_shards=NODES))
    try:
        pool, acked, errors = _append_load(stub, "crash", threads=3, appends=6, size=40)
        for t in pool:
            t.start()
        while len(acked) < 3:
            time.sleep(0.05)
        victim = ray.get_actor("shard-1", namespace="longmem")
        os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
        during = None
        try:
            stub.Retrieve(pb.RetrieveRequest(memory_id="crash", text="during the outage"), timeout=60)
        except grpc.RpcError as e:
            during = e
        for t in pool:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in pool)
        assert during is None or (during.code() == grpc.StatusCode.UNAVAILABLE and "retry" in during.details())
        assert all(code == grpc.StatusCode.UNAVAILABLE and "retry" in details for code, details in errors)
        info = stub.GetMemory(pb.GetMemoryRequest(memory_id="crash"))
        # every acknowledged append is there; an unacknowledged one is wholly there or wholly absent
        extra = info.tokens_appended - sum(acked)
        assert extra >= 0 and extra % 40 == 0 and extra // 40 <= len(errors)
        before = _complete_and_untorn(bank, "default~crash")

        os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)  # once more, idle: a pure restore
        deadline = time.time() + 60
        while True:
            try:
                after = _complete_and_untorn(bank, "default~crash")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert after == before
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="crash"))


def test_kill_9_of_the_bank_under_load_answers_unavailable_and_retried_appends_land_once(service):
    """The bank actor killed while clients append (the Python client: a request id per append, retried
    on UNAVAILABLE) and search: callers hear only OK or UNAVAILABLE with a retry hint (never INTERNAL,
    never a traceback), every append succeeds, and the memory holds each exactly once."""
    import signal
    import time

    config, stub, _, _ = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="bank-crash", capacity_tokens=1024, num_shards=NODES))
    try:
        pool, acked, failed = _client_append_load(config.serve.grpc_port, "bank-crash", threads=2, appends=6, size=40)
        for t in pool:
            t.start()
        while len(acked) < 2:
            time.sleep(0.05)
        os.kill(ray.get(ray.get_actor("bank", namespace="longmem").pid.remote()), signal.SIGKILL)
        during = []
        for _ in range(3):
            try:
                stub.Retrieve(pb.RetrieveRequest(memory_id="bank-crash", text="during the outage"), timeout=60)
            except grpc.RpcError as e:
                during.append((e.code(), e.details()))
        for t in pool:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in pool)
        assert all(_retryable(code, details) for code, details in during), during
        assert not failed and sum(acked) == 12 * 40
        info = stub.GetMemory(pb.GetMemoryRequest(memory_id="bank-crash"))
        assert info.tokens_appended == 12 * 40  # each append exactly once
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="bank-crash"))


def test_kill_9_of_the_encoder_under_load_answers_unavailable_and_retried_appends_land_once(service):
    """The encoder replica killed while Python clients append and a raw client scores: appends all
    succeed and land exactly once; scores answer OK or UNAVAILABLE with a retry hint, never INTERNAL."""
    import signal
    import threading
    import time

    config, stub, _, _ = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="encoder-crash", capacity_tokens=1024, num_shards=NODES))
    scored, stop = [], threading.Event()

    def scorer() -> None:
        while not stop.is_set():
            try:
                stub.Score(pb.ScoreRequest(text=TEXT_SHORT), timeout=60)
                scored.append(None)
            except grpc.RpcError as e:
                scored.append((e.code(), e.details()))

    pid = _replica_pid("EncoderDeployment")
    try:
        appenders, acked, failed = _client_append_load(config.serve.grpc_port, "encoder-crash", threads=2,
                                                       appends=5, size=40)
        pool = appenders + [threading.Thread(target=scorer)]
        for t in pool:
            t.start()
        while len(acked) < 2:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        for t in appenders:
            t.join(timeout=300)
        stop.set()
        pool[-1].join(timeout=120)
        assert not any(t.is_alive() for t in pool)
        assert not failed and sum(acked) == 10 * 40
        assert all(_retryable(*outcome) for outcome in scored if outcome is not None)
        assert stub.GetMemory(pb.GetMemoryRequest(memory_id="encoder-crash")).tokens_appended == 10 * 40
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="encoder-crash"))


def test_an_append_resent_with_its_request_id_is_applied_once(service):
    _, stub, _, _ = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="resent", capacity_tokens=1024, num_shards=NODES))
    try:
        ids = list(range(1, 150))  # several segments
        first = stub.Append(pb.AppendRequest(memory_id="resent", token_ids=ids, request_id="req-1"))
        again = stub.Append(pb.AppendRequest(memory_id="resent", token_ids=ids, request_id="req-1"))
        other = stub.Append(pb.AppendRequest(memory_id="resent", token_ids=ids, request_id="req-2"))
        assert first.memory.tokens_appended == again.memory.tokens_appended == len(ids)
        assert other.memory.tokens_appended == 2 * len(ids)
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="resent"))


def test_removing_a_node_under_load_moves_its_shard_with_its_memory(service):
    import time

    _, stub, bank, nodes = service
    stub.CreateMemory(pb.CreateMemoryRequest(memory_id="moving", capacity_tokens=1024, num_shards=NODES))
    try:
        cluster = CLUSTER["cluster"]
        spare = cluster.add_node(num_cpus=1, resources={"memory_node": 1})
        victim = ray.get_actor("shard-2", namespace="longmem")
        node = next(n for n in nodes if n.node_id == ray.get(victim.stats.remote()).node_id)
        pool, acked, errors = _append_load(stub, "moving", threads=2, appends=5, size=40)
        for t in pool:
            t.start()
        while len(acked) < 2:
            time.sleep(0.05)
        cluster.remove_node(node)
        nodes.remove(node)
        nodes.append(spare)
        for t in pool:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in pool)
        assert all(code == grpc.StatusCode.UNAVAILABLE and "retry" in details for code, details in errors)
        deadline = time.time() + 90
        while True:
            try:
                moved_to = ray.get(victim.stats.remote(), timeout=10).node_id
                before = _complete_and_untorn(bank, "default~moving")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        assert moved_to == spare.node_id
        info = stub.GetMemory(pb.GetMemoryRequest(memory_id="moving"))
        extra = info.tokens_appended - sum(acked)
        assert extra >= 0 and extra % 40 == 0 and extra // 40 <= len(errors)
        assert _complete_and_untorn(bank, "default~moving") == before
    finally:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="moving"))
