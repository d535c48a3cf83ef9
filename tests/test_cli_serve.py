"""`longmem serve` as a user runs it: a separate process with an embedded local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc

from longmem.client import LongMemClient
from longmem.v1 import longmem_pb2 as pb
from longmem.v1 import longmem_pb2_grpc as pbg
from tiny import free_port, save_tiny


def start_server(model, storage, *overrides: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "longmem.cli", "serve", "--set", f"backbone.name_or_path={model}",
           "--set", f"serve.grpc_port={port}", "--set", f"serve.http_port={free_port()}",
           "--set", "read.segment_tokens=32", "--set", "memory.capacity_tokens=1024",
           "--set", f"serve.storage_uri={storage}", *(a for o in overrides for a in ("--set", o))]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    return server, port


def stop(server: subprocess.Popen) -> str:
    server.send_signal(signal.SIGTERM)
    output, _ = server.communicate(timeout=120)
    assert server.returncode == 0, output
    return output


def kill(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_longmem_serve_answers_grpc_and_stops_on_sigterm(tmp_path):
    model = save_tiny(tmp_path / "tiny", "gpt2")
    server, port = start_server(model, tmp_path / "storage")
    try:
        with LongMemClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(180)
            info = client.create_memory(memory_id="cli", capacity_tokens=512)
            assert info.memory_id == "cli" and info.capacity_tokens == 512
            client.append("cli", text="A memory for the command line test. " * 8)
            assert client.get_memory("cli").tokens_appended > 0
            assert client.score(text="A memory for the test.", memory_id="cli").perplexity > 1
        stop(server)
    finally:
        kill(server)


def test_a_plain_restart_keeps_every_acknowledged_memory_and_one_server_owns_the_storage(tmp_path):
    """Issue 11's reproduction from a client of the .proto alone: A (2 shards) gets 18 appends, so the
    bank snapshots at record 16 and appends 17-19 stay in its log; A is deleted; B gets 5 appends.
    A second server on the same storage refuses to start. After SIGTERM and a restart, B is there
    with its appends, A is gone, and new memories can be made."""
    model = save_tiny(tmp_path / "tiny", "gpt2")
    storage = tmp_path / "storage"
    first, port = start_server(model, storage, "serve.snapshot_every=16")
    servers = [first]
    try:
        with LongMemClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(180)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.LongMemStub(channel)
            stub.CreateMemory(pb.CreateMemoryRequest(memory_id="A", capacity_tokens=512, num_shards=2))
            for i in range(18):
                stub.Append(pb.AppendRequest(memory_id="A", token_ids=[(i * 7 + j) % 200 + 1 for j in range(24)]))
            stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="A"))
            stub.CreateMemory(pb.CreateMemoryRequest(memory_id="B", capacity_tokens=512, num_shards=2))
            for i in range(5):
                stub.Append(pb.AppendRequest(memory_id="B", token_ids=[(i * 5 + j) % 200 + 1 for j in range(40)]))
            before = stub.GetMemory(pb.GetMemoryRequest(memory_id="B"))
            hits_before = stub.Retrieve(pb.RetrieveRequest(memory_id="B", text="the quick fox", max_spans=4))

        second, _ = start_server(model, storage)
        servers.append(second)
        output, _ = second.communicate(timeout=300)
        assert second.returncode == 1, output
        assert "in use by another server" in output and "pid" in output

        stop(first)
        third, port = start_server(model, storage, "serve.snapshot_every=16")
        servers.append(third)
        with LongMemClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(180)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pbg.LongMemStub(channel)
            listed = stub.ListMemories(pb.ListMemoriesRequest())
            assert [m.memory_id for m in listed.memories] == ["B"]
            assert stub.GetMemory(pb.GetMemoryRequest(memory_id="B")) == before
            assert stub.Retrieve(pb.RetrieveRequest(memory_id="B", text="the quick fox", max_spans=4)) == hits_before
            stub.CreateMemory(pb.CreateMemoryRequest(memory_id="C", capacity_tokens=512, num_shards=2))
            again = stub.CreateMemory(pb.CreateMemoryRequest(memory_id="A", capacity_tokens=512))
            assert again.tokens_appended == 0
        stop(third)
    finally:
        for server in servers:
            kill(server)
