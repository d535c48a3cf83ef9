"""longmem.bench at tiny sizes on the tiny random llama: the FLOP count matches the model's parameters,
fractions of the roofline bound are real fractions, the ring buffer evicts exactly the oldest chunks,
the storage options' bytes and recall are what their encodings imply, long-context reads run in fresh
processes, and every part renders to the table and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longmem.bench import common, eviction, long_context, memory_cost, retrieval, roofline, run

TINY_STORE = eviction.StoreShape(chunk_size=4, kv_heads=2, head_dim=16)
TINY_INDEX = memory_cost.IndexOptions(pq_subquantizers=(4, 8), pq_bits=4)  # 16 centroids: few training points suffice


@pytest.fixture(scope="module")
def roofline_result(llama_bb):
    before = {m.memory_id for m in llama_bb.list_memories()}
    result = roofline.run(llama_bb.config, 4 * 32, model=llama_bb, matmul_sizes=(64, 128), matmul_repeats=2)
    assert {m.memory_id for m in llama_bb.list_memories()} == before  # every memory it made is gone
    return result


@pytest.fixture(scope="module")
def eviction_result():
    return eviction.run((1024, 4096), shape=TINY_STORE, batch_chunks=16, repeats=2)


@pytest.fixture(scope="module")
def memory_cost_result(llama_bb):
    return memory_cost.run(llama_bb.config, 512, model=llama_bb, options=TINY_INDEX)


@pytest.fixture(scope="module")
def long_context_result(llama_bb):
    """One fresh process only (each costs seconds): 600 tokens are past the tiny model's 512
    positions, so the backbone with full attention is skipped; test_read_context runs that path."""
    return long_context.run(llama_bb.config, (600,))


def test_flop_count_matches_the_parameters(llama_bb):
    backbone = llama_bb.backbone
    shape = roofline.ModelShape.of(llama_bb)
    def weights(modules):
        return sum(p.numel() for module in modules for p in module.parameters() if p.dim() == 2)

    # Without attention over context, a forward pass costs 2 FLOPs per weight of each matrix it uses.
    flops = roofline.flops_per_token(shape, window=0, topk_tokens=0, search_chunks=0)
    assert flops["full_encode"] == 2 * weights(backbone.layers)
    attn = backbone.layers[backbone.memory_layer].self_attn
    assert flops["ingest"] == 2 * weights([*backbone.layers[:backbone.memory_layer],
                                           attn.q_proj, attn.k_proj, attn.v_proj])
    assert flops["score_parts"]["backbone_lm_head"] == 2 * backbone.model.get_output_embeddings().weight.numel()
    # Attention and memory terms by hand: 4 heads of 16 dims, 64 retrieved tokens, 100 chunks searched.
    assert roofline.layer_flops(shape, 8) == {"projections": 2 * weights([backbone.layers[0]]),
                                           "attention": 4 * 4 * 16 * 8}
    parts = roofline.flops_per_token(shape, 32, 64, 100)["score_parts"]
    assert parts["memory_attention"] == 4 * 4 * 16 * 64 and parts["memory_search"] == 2 * 4 * 16 * 100


def test_mean_scratch_chunks():
    # 3 segments of 32 tokens, 1 sink each: segment s searches s * 31 tokens = s * 31 // 4 chunks.
    assert roofline.mean_scratch_chunks(96, 32, 1, 4) == pytest.approx((0 + 7 + 15) / 3)


def test_roofline(roofline_result, llama_bb):
    r = roofline_result
    json.dumps(r)
    assert r["peak_flops"] == max(r["matmul_flops"].values()) > 0
    assert r["torch_threads"] == torch.get_num_threads()
    f = r["flops_per_token"]
    assert 0 < f["ingest"] < f["full_encode"] < f["score"]
    assert f["score"] == pytest.approx(sum(f["score_parts"].values()))
    for path in ("ingest", "score"):
        p = r[path]
        assert p["bound_tokens_per_s"] == pytest.approx(r["peak_flops"] / f[path])
        assert p["tokens_per_s"] == pytest.approx(r["tokens"] / p["seconds"])
        assert 0 < p["fraction"] <= 1
    assert r["memory_tokens_held"] == 4 * 31 // 4 * 4  # 4 segments without their sink, whole chunks
    assert r["sidenet_blocks_run"] == r["sidenet_blocks"] == llama_bb.backbone.num_layers // 2
    assert r["early_exit"]["flop_ratio"] > 1 and r["early_exit"]["encode_memory_s"] > 0


def test_eviction(eviction_result):
    r = eviction_result
    json.dumps(r)
    assert [row["chunks"] for row in r["rows"]] == [256, 1024]
    for row in r["rows"]:
        assert row["ring_evicts_exactly"]
        assert row["official_holds"] == row["chunks"]
        assert row["ring_s"] > 0 and row["official_index_s"] > 0
        assert row["official_s"] == pytest.approx(row["official_index_s"] + row["official_array_s"])
    with pytest.raises(ValueError, match="fewer than"):
        eviction.run((32,), shape=TINY_STORE, batch_chunks=16, repeats=1)


def test_official_memory_evicts_the_oldest():
    rng = np.random.default_rng(0)
    chunks = eviction.random_chunks(6, TINY_STORE, rng)
    official = eviction.OfficialMemory(chunks, 1, 6)
    new = eviction.random_chunks(2, TINY_STORE, rng)
    official.evict_and_add(new)
    for h in range(TINY_STORE.kv_heads):
        expected = np.concatenate([chunks.keys[2:, h], new.keys[:, h]])  # [6, c, d]
        np.testing.assert_array_equal(official.keys[h], expected)
        stored = official.indexes[h].reconstruct_n(0, 6)
        np.testing.assert_allclose(stored, expected.mean(axis=1), rtol=1e-6)


def test_memory_cost(memory_cost_result, llama_bb):
    r = memory_cost_result
    json.dumps(r)
    rows = {row["name"].split(" (")[0]: row for row in r["rows"]}
    assert list(rows) == ["fp32 flat", "fp16 flat", "int8 SQ", "PQ M=4", "PQ M=8", "IVF-Flat", "HNSW-Flat"]
    assert r["k_chunks"] == llama_bb.config.memory.topk_tokens // llama_bb.config.memory.chunk_size
    assert r["query_tokens"] == llama_bb.config.read.segment_tokens
    assert r["query_heads"] == llama_bb.backbone.num_heads
    fp32 = rows["fp32 flat"]
    assert fp32["recall"] == 1.0 and fp32["key_rel_error"] == 0 == fp32["value_rel_error"]
    # fp32 keys + values: 2 * Hkv * d * 4 bytes per token
    assert fp32["kv_bytes_per_token"] == 2 * r["kv_heads"] * r["head_dim"] * 4
    assert rows["fp16 flat"]["kv_bytes_per_token"] == fp32["kv_bytes_per_token"] / 2
    assert fp32["kv_bytes_per_token"] / 4 < rows["int8 SQ"]["kv_bytes_per_token"] < fp32["kv_bytes_per_token"] / 2
    pq4, pq8, sq8 = (rows[n]["kv_bytes_per_token"] for n in ("PQ M=4", "PQ M=8", "int8 SQ"))
    assert pq4 < pq8 < sq8
    for name in ("IVF-Flat", "HNSW-Flat"):
        assert rows[name]["kv_bytes_per_token"] == fp32["kv_bytes_per_token"]
        assert not rows[name]["in_place_eviction"]
    for row in r["rows"]:
        assert 0 <= row["recall"] <= 1
        assert row["bytes_per_token"] == pytest.approx(row["kv_bytes_per_token"] + row["index_bytes_per_token"])
        assert row["build_s"] > 0 and row["search_s"] > 0
    assert rows["PQ M=4"]["key_rel_error"] > rows["int8 SQ"]["key_rel_error"] > 0


def test_recall_at_k():
    exact = [np.array([[1, 2], [3, 4]])]
    assert memory_cost.recall_at_k([np.array([[2, 1], [4, 3]])], exact) == 1.0
    assert memory_cost.recall_at_k([np.array([[1, 9], [9, 9]])], exact) == 0.25


def test_memory_queries_are_the_memory_blocks_pre_rotary_queries(llama_bb):
    ids = common.text_ids(llama_bb.tokenizer, 40)
    queries = common.memory_queries(llama_bb, ids)  # two segments: 32 + 8 tokens
    side = llama_bb.sidenet
    block = side.blocks[side.memory_block]
    seen = []
    hook = block.layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    try:
        common.memory_queries(llama_bb, ids)
    finally:
        hook.remove()
    d = llama_bb.backbone.head_dim
    expected = torch.cat(seen).view(len(ids), -1, d).numpy()
    assert queries.shape == (len(ids), llama_bb.backbone.num_heads, d)
    np.testing.assert_allclose(queries, expected, rtol=1e-5, atol=1e-6)  # rotated and un-rotated: rounding


def check_context_read(m: dict, tokens: int) -> None:
    assert m["device"] == "cpu"
    assert m["seconds"] > 0 and m["s_per_token"] == pytest.approx(m["seconds"] / tokens)
    # The tiny model's reads may fit in memory the process freed before (after loading, warming up).
    assert m["peak_bytes"] >= m["baseline_bytes"] > 0
    assert m["bytes_per_token"] == pytest.approx((m["peak_bytes"] - m["baseline_bytes"]) / tokens)


def test_long_context(long_context_result, llama_bb):
    r = long_context_result
    json.dumps(r)
    assert r["max_positions"] == llama_bb.backbone.max_positions == 512 and r["window"] == 32
    assert r["memory"] == "peak RSS above the loaded model"
    (row,) = r["rows"]
    assert row["tokens"] == 600 and row["full_attention"] is None
    check_context_read(row["longmem"], 600)


@pytest.mark.parametrize("method", ["longmem", "full_attention"])
def test_read_context(llama_bb, method):
    """What long_context runs in a fresh process, run here (it loads its own model)."""
    ids = common.text_ids(llama_bb.tokenizer, 64)
    m = long_context._read_context(llama_bb.config.to_dict(), method, ids, torch.get_num_threads())
    check_context_read(m, 64)


def test_retrieval_is_exact_below_the_threshold_and_approximate_above(llama_bb, tmp_path):
    """Real keys of the essays in the tiny model's stores: 256 tokens searched exactly, 1,024 (past
    ann_min_tokens) through IVF + hot sets, each against exact search; the encoded memory is cached."""
    from longmem.config import LongMemConfig

    config = LongMemConfig.from_dict({**llama_bb.config.to_dict(), "memory": {
        **llama_bb.config.to_dict()["memory"], "ann_min_tokens": 512, "ann_probe": 1, "ann_query_clusters": 2,
        "ann_hot_chunks": 8}})
    r = retrieval.run(config, (256, 1024), repeats=1, model=llama_bb, cache_dir=tmp_path)
    json.dumps(r)
    small, big = r["rows"]
    assert (small["method"], big["method"]) == ("exact", "approximate")
    assert small["recall"] == 1.0 and small["ivf_lists"] == 0 and small["ivf_recall"] is None
    assert 0 <= big["ivf_recall"] <= big["recall"]  # the hot sets only add candidates
    assert big["chunks"] == retrieval.held_chunks(config, 1024) == (1024 - 1024 // 32) // 4  # 32-token segments, 1 sink
    assert 0 < big["recall"] < 1 and big["ivf_lists"] == big["chunks"] // 39  # lists capped by chunks held
    assert r["largest_over_smallest"] == big["search_s"] / small["search_s"]
    cached = list(tmp_path.glob("real-memory-*.npz"))
    assert len(cached) == 1
    assert retrieval.run(config, (1024,), repeats=1, model=llama_bb, cache_dir=tmp_path)["rows"][0]["recall"] == big["recall"]
    text = run.format_table({"retrieval": r})
    assert text.startswith("## Retrieval") and "approximate" in text
    config.memory.search_device = "cpu"  # the GPU index's torch search, here on CPU: exact, checked against faiss
    on_device = retrieval.run(config, (1024,), repeats=1, model=llama_bb, cache_dir=tmp_path)["rows"][0]
    assert on_device["method"] == "exact (cpu)" and on_device["recall"] == 1.0 and on_device["ivf_recall"] is None
    assert run.plot({"retrieval": r}, tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_ids_are_a_prefix_of_the_essays(llama_bb):
    assert common.text_ids(llama_bb.tokenizer, 50) == common.text_ids(llama_bb.tokenizer, 300)[:50]


def test_format_table_and_plot(roofline_result, eviction_result, memory_cost_result, long_context_result, tmp_path):
    results = {"roofline": roofline_result, "eviction": eviction_result, "memory_cost": memory_cost_result,
               "long_context": long_context_result}
    text = run.format_table(results)
    for title in ("## Roofline", "## Eviction", "## Memory cost", "## Long context"):
        assert text.count(title) == 1
    assert "HNSW-Flat" in text and "| 4k" in text
    assert run.format_table({"eviction": eviction_result}).startswith("## Eviction")
    for name, part in (("all.png", results), ("one.png", {"memory_cost": memory_cost_result})):
        path = run.plot(part, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fresh_process_memory_is_its_own_not_its_parents(llama_bb):
    """A spawned child inherits its parent's ru_maxrss through exec; the peak must be the child's."""
    ballast = np.ones(2**30 // 8)  # 1 GiB resident in this (the parent) process
    parent_peak = long_context._memory_peak(torch.device("cpu"))
    ids = common.text_ids(llama_bb.tokenizer, 64)
    m = common.in_fresh_process(long_context._read_context, llama_bb.config.to_dict(), "longmem", ids, 1)
    del ballast
    check_context_read(m, 64)
    assert m["peak_bytes"] < parent_peak - 2**29
