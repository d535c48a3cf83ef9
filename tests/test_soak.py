"""`longmem soak` as an operator runs it, briefly: its own simulated cluster, random faults under load,
the data checks against a fault-free replay and the fuzz; the report is written and the exit code says
whether everything held."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tiny import free_port, save_tiny


def test_a_short_soak_injects_faults_and_every_check_holds(tmp_path):
    model = save_tiny(tmp_path / "llama", "llama")
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "longmem.cli", "soak", "--minutes", "1", "--out", str(out),
           "--set", f"backbone.name_or_path={model}", "--set", f"serve.grpc_port={free_port()}",
           "--set", f"serve.http_port={free_port()}", "--set", f"serve.storage_uri={tmp_path / 'storage'}",
           "--set", "serve.num_shards=3", "--set", "read.segment_tokens=64", "--set", "memory.chunk_size=4",
           "--set", "memory.topk_tokens=8", "--set", "soak.fault_interval_s=[8,14]", "--set", "soak.fuzz_messages=100"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads((out / "soak.json").read_text())
    assert report["ok"] and len(report["faults"]) >= 3
    assert set(report["answers"]) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"} and not report["failed"]
    assert sum(report["requests"].values()) > 50
    assert set(report["requests"]) == {"Append", "Score", "Generate", "Retrieve", "Chat"}
    data = report["data"]
    assert data["appends"] > 10 and data["lost_tokens"] == data["duplicated_tokens"] == 0 and not data["retrieval_differs"]
    assert report["fuzz"]["messages"] == 100 and not report["fuzz"]["bad"]
    summary = (out / "soak.txt").read_text()
    assert "0 acknowledged appends lost, 0 duplicated" in summary and summary.endswith("result: PASS\n")
    assert summary in run.stdout
