"""`longmem serve` as a user runs it: a separate process with an embedded local Ray cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from longmem.client import LongMemClient
from tiny import free_port, save_tiny



def test_longmem_serve_answers_grpc_and_stops_on_sigterm(tmp_path):
    model = save_tiny(tmp_path / "tiny", "gpt2")
    port = free_port()
    cmd = [sys.executable, "-m", "longmem.cli", "serve", "--set", f"backbone.name_or_path={model}",
           "--set", f"serve.grpc_port={port}", "--set", f"serve.http_port={free_port()}",
           "--set", "read.segment_tokens=32", "--set", "memory.capacity_tokens=1024",
           "--set", f"serve.storage_uri={tmp_path / 'storage'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    try:
        with LongMemClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(180)
            info = client.create_memory(memory_id="cli", capacity_tokens=512)
            assert info.memory_id == "cli" and info.capacity_tokens == 512
            client.append("cli", text="A memory for the command line test. " * 8)
            assert client.get_memory("cli").tokens_appended > 0
            assert client.score(text="A memory for the test.", memory_id="cli").perplexity > 1
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
        assert server.returncode == 0, output
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
