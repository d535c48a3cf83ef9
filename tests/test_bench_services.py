"""services.bench at tiny sizes on the tiny random llama, each on a local Ray instance of its own: the
service computes the log-probabilities the core computes, ratios are ratios of what was measured, the
sharded search finds exactly what the in-process memory finds, and `longmem bench` writes its report."""

from __future__ import annotations

import json

import pytest
import ray

from conftest import tiny_config
from longmem.cli import main
from longmem.bench import run
from services.bench import common, search, service

PNG = b"\x89PNG\r\n\x1a\n"
SERVICE_TOKENS = 96  # 3 windows of the tiny models' 32 tokens
SEARCH_SIZES = (256, 1024)
SEARCH_SHARDS = (1, 2)
REPORT_KEYS = {"headline", "command", "machine", "sizes", "results", "wall_s", "total_wall_s"}


@pytest.fixture(scope="module")
def service_result(llama_bb):
    before = {m.memory_id for m in llama_bb.list_memories()}
    result = service.run(llama_bb.config, SERVICE_TOKENS, model=llama_bb, warmup_tokens=32)
    assert {m.memory_id for m in llama_bb.list_memories()} == before  # every memory it made is gone
    assert not ray.is_initialized()  # its Ray instance is shut down
    return result


@pytest.fixture(scope="module")
def search_result(tiny_llama_dir):
    result = search.run(tiny_config(tiny_llama_dir), SEARCH_SIZES, SEARCH_SHARDS, query_tokens=8,
                                  fill_tokens=200, repeats=2)
    assert not ray.is_initialized()
    return result


def test_service_overhead(service_result, llama_bb):
    r = service_result
    json.dumps(r)
    assert r["tokens"] == SERVICE_TOKENS and r["scored_tokens"] == SERVICE_TOKENS - 1
    assert r["window"] == llama_bb.config.read.segment_tokens
    # The same tokens through gRPC + Ray give the same log-probabilities as the core in this process.
    assert r["max_abs_logprob_diff"] < 1e-4 and r["max_abs_backbone_logprob_diff"] < 1e-4
    local, service = r["in_process"], r["service"]
    assert service["perplexity"] == pytest.approx(local["perplexity"], rel=1e-4)
    assert service["backbone_perplexity"] == pytest.approx(local["backbone_perplexity"], rel=1e-4)
    for p in (local, service):
        for op in ("append", "score"):
            assert p[f"{op}_s"] > 0
            assert p[f"{op}_tokens_per_s"] == pytest.approx(SERVICE_TOKENS / p[f"{op}_s"])
    for op in ("append", "score"):
        assert r["ratio"][op] == pytest.approx(service[f"{op}_tokens_per_s"] / local[f"{op}_tokens_per_s"])
        assert r["ratio"][op] > 0
    assert local["startup_s"] is None and service["startup_s"] > 0  # the model was given; Serve deployed
    for name in ("encoder", "reader"):
        assert r["replica_threads"][name]["torch_threads"] >= 1
    assert r["ray_cpus"] >= common.service_cpus(llama_bb.config)


def test_search_scaling(search_result):
    r = search_result
    json.dumps(r)
    assert (r["kv_heads"], r["head_dim"], r["query_heads"], r["k_chunks"]) == (2, 16, 4, 8 // 4)
    assert r["shard_actors"] == max(SEARCH_SHARDS) and r["base_shards"] == 1
    assert [row["tokens"] for row in r["rows"]] == list(SEARCH_SIZES)
    for row in r["rows"]:
        local = row["in_process"]
        assert 0 < local["min_s"] <= local["median_s"] and local["fill_tokens_per_s"] > 0
        assert [x["shards"] for x in row["sharded"]] == list(SEARCH_SHARDS)
        one = row["sharded"][0]
        for x in row["sharded"]:
            assert x["topk_match"] == 1.0  # exact search: sharded = one flat store
            assert 0 < x["min_s"] <= x["median_s"] and x["fill_tokens_per_s"] > 0
            assert x["ideal_s"] == pytest.approx(one["median_s"] / x["shards"])
            assert x["vs_ideal"] == pytest.approx(x["median_s"] / x["ideal_s"]) and x["vs_ideal"] > 0
            assert x["vs_base"] == pytest.approx(x["median_s"] / one["median_s"])
            assert x["vs_in_process"] == pytest.approx(x["median_s"] / local["median_s"])
            # every shard of the memory searched, each with its own CPU time per search
            assert len(x["shard_cpu_s"]) == x["shards"] and min(x["shard_cpu_s"]) > 0
            assert x["max_shard_cpu_s"] == max(x["shard_cpu_s"])
            assert x["cpu_vs_ideal"] == pytest.approx(x["max_shard_cpu_s"] / (one["max_shard_cpu_s"] / x["shards"]))
        assert one["vs_ideal"] == one["vs_base"] == one["cpu_vs_ideal"] == 1.0
    assert run.headline_object({"search": r})["shard_cpu_scaling_error"] == max(
        abs(x["cpu_vs_ideal"] - 1) for x in r["rows"][-1]["sharded"])


def test_search_scaling_checks_sizes_before_starting_ray(tiny_llama_dir):
    with pytest.raises(ValueError, match="multiples of the chunk size"):
        search.run(tiny_config(tiny_llama_dir), (30,), (1,), repeats=1)
    assert not ray.is_initialized()


def test_report_renders_every_part(service_result, search_result, tmp_path):
    report = {"command": "longmem bench", "machine": {"cpu_count": 2}, "sizes": {},
              "results": {"service": service_result, "search": search_result},
              "wall_s": {"service": 1.0, "search": 2.0}, "total_wall_s": 3.0}
    run.write_report(report, tmp_path)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert list(written)[0] == "headline"  # the bars by name, first
    assert written["headline"] == {"service_score_ratio": service_result["ratio"]["score"],
                                   "service_append_ratio": service_result["ratio"]["append"],
                                   "shard_cpu_scaling_error": run.headline_object({"search": search_result})[
                                       "shard_cpu_scaling_error"]}
    del written["headline"]
    assert written == json.loads(json.dumps(report))
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG
    text = (tmp_path / "bench.md").read_text()
    for title in ("## Ratios", "## Service overhead", "## Search scaling"):
        assert text.count(title) == 1
    assert "service / in-process" in text and "measured / ideal" in text
    figures = [row[1] for row in run.headline(report["results"])]
    assert "append tokens/s, gRPC + Ray / in-process" in figures
    assert "1k tokens, 2 shards: measured / ideal" in figures
    assert "1k tokens, 2 shards: busiest shard's CPU / ideal" in figures


def check_report(out, parts: set[str]) -> dict:
    assert sorted(p.name for p in out.iterdir()) == sorted(run.BENCH_FILES)
    report = json.loads((out / "bench.json").read_text())
    assert set(report) == REPORT_KEYS
    assert set(report["results"]) == set(report["wall_s"]) == parts
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch_threads"] >= 1 and machine["device"] in ("cpu", "cuda")
    assert set(machine["versions"]) >= {"torch", "faiss", "ray"}
    assert (out / "bench.png").read_bytes()[:8] == PNG
    return report


def test_cli_quick_eviction(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--parts", "eviction", "--out", str(out)]) == 0
    report = check_report(out, {"eviction"})
    from longmem.config import BenchConfig

    quick = BenchConfig().quick["eviction_sizes"]
    assert [row["tokens"] for row in report["results"]["eviction"]["rows"]] == quick
    assert report["sizes"]["eviction_sizes"] == quick
    assert all(row["ring_evicts_exactly"] for row in report["results"]["eviction"]["rows"])
    assert report["command"].startswith("longmem bench --quick --parts eviction")
    text = (out / "bench.md").read_text()
    assert "## Ratios" in text and "## Eviction" in text
    printed = capsys.readouterr().out
    assert "## Eviction" in printed and "bench.json" in printed


def test_cli_set_overrides_quick(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--parts", "eviction", "--out", str(out),
                 "--set", "bench.eviction_sizes=[2048]"]) == 0
    report = check_report(out, {"eviction"})
    assert [row["tokens"] for row in report["results"]["eviction"]["rows"]] == [2048]
