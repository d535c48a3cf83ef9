"""Search scaling: memories of several sizes striped over 1, 2, 4... shards and filled with random
keys/values, searched as a reader searches (the bank actor's route, then the shard actors): latency
against the in-process `longmem.memory.Memory` holding the same chunks and against the ideal of perfect
striping, lat(N, 1 shard) / S, and each shard's own CPU time per search."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypedDict

import numpy as np
import torch

from longmem.bench.common import SEED, latency_axes, log, timed, tokens_label
from longmem.config import LongMemConfig
from longmem.report import markdown_table

from .common import (
    SHARD_BUDGET_EXTRA_BYTES,
    SHARD_BUDGET_HEADROOM,
    bench_config,
    probe_threads,
    local_ray,
)

SEARCH_QUERY_TOKENS = 64  # query tokens per search (x the model's query heads)
SEARCH_FILL_TOKENS = 64 * 1024  # tokens per bank append while filling a memory
SEARCH_WARMUP = 1  # untimed searches first
PANELS = 2  # subplots of this part in bench.png


class InProcess(TypedDict):
    median_s: float
    min_s: float
    fill_tokens_per_s: float


class Sharded(TypedDict):
    shards: int
    median_s: float
    min_s: float
    fill_tokens_per_s: float
    topk_match: float  # against the in-process search
    shard_cpu_s: list[float]  # each shard's process CPU per search
    max_shard_cpu_s: float
    ideal_s: float  # lat(N, smallest S) x smallest S / S
    vs_ideal: float
    vs_base: float
    vs_in_process: float
    cpu_ideal_s: float
    cpu_vs_ideal: float


class Row(TypedDict):
    tokens: int
    in_process: InProcess
    sharded: list[Sharded]


class Result(TypedDict):
    chunk_size: int
    kv_heads: int
    head_dim: int
    query_heads: int
    query_tokens: int
    k_chunks: int
    fill_tokens: int
    repeats: int
    warmup: int
    shard_actors: int
    shard_budget_bytes: int
    ray_cpus: float
    shard_threads: dict[str, Any]
    base_shards: int
    hits_array_bytes: int
    hits_proto_bytes: int
    rows: list[Row]


def _random_kv(seed: int, tokens: int, kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((tokens, kv_heads, head_dim), dtype=np.float32)
    values = rng.standard_normal((tokens, kv_heads, head_dim), dtype=np.float32)
    return keys, values, np.arange(tokens, dtype=np.int32)


def _fill(append: Callable, size: int, piece: int, seed: int, kv_heads: int, head_dim: int) -> float:
    """Appends `size` random tokens in pieces of `piece` (the same data for every memory of this size);
    returns the seconds spent in the appends (not making the data)."""
    spent = 0.0
    for i, start in enumerate(range(0, size, piece)):
        keys, values, ids = _random_kv(seed * 1_000_003 + i, min(piece, size - start), kv_heads, head_dim)
        spent += timed(partial(append, keys, values, ids))[0]
    return spent


def _time_calls(call: Callable, warmup: int, repeats: int) -> tuple[list[float], Any]:
    out = None
    for _ in range(warmup):
        out = call()
    times = []
    for _ in range(repeats):
        seconds, out = timed(call)
        times.append(seconds)
    return times, out


def search_dims(config: LongMemConfig) -> dict[str, int]:
    """The memory layer's geometry, read from the backbone's config.json (no weights loaded)."""
    from longmem.backbone import model_dims

    dims = model_dims(config.backbone)
    return {"kv_heads": dims.num_kv_heads, "head_dim": dims.head_dim, "query_heads": dims.num_heads}


def _shard_search_cpu(bank_handle) -> dict[str, tuple[float, int]]:
    """Every shard's (search CPU seconds, searches) so far."""
    import ray

    return {s.name: (s.search_cpu_seconds, s.searches) for s in ray.get(bank_handle.shard_stats.remote())}


def _cpu_per_search(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> list[float]:
    """The CPU seconds per search of each shard that searched between two _shard_search_cpu readings, sorted."""
    return sorted((cpu - before[name][0]) / (n - before[name][1]) for name, (cpu, n) in after.items()
                  if n > before[name][1])


def run(config: LongMemConfig, sizes: Sequence[int], shards: Sequence[int], repeats: int, *,
                   query_tokens: int = SEARCH_QUERY_TOKENS, fill_tokens: int = SEARCH_FILL_TOKENS,
                   warmup: int = SEARCH_WARMUP, seed: int = SEED) -> Result:
    """Latency of one exact search of a memory of N tokens striped over S shards, as a reader searches:
    the bank actor's route, then the shard actors directly and the merge here (approximate search of large stores is the retrieval part's question, on real text).

    For each size a memory is filled with random float32 keys/values of the backbone's memory-layer
    geometry (config.json), `fill_tokens` per append, and searched with [1, query_tokens, Hq, d] random
    queries for topk_tokens / chunk_size chunks: `warmup` untimed searches, then `repeats` timed; the
    median counts. The same data goes into an in-process `Memory` (one store, searched in this
    process). Per (N, S): measured / 1 shard, the ideal of perfect striping ideal(N, S) =
    lat(N, S0) x S0 / S (S0 the smallest shard count, normally 1), measured / ideal, measured /
    in-process, and the share of hit seqs equal to the in-process search's (exact search: 1.0); and the
    work each shard does: the CPU time of its process per search (Shard.search), the largest of the S
    against the same ideal (max shard CPU(N, S0) x S0 / S): how well striping divides the work where
    the cores to run the shards in parallel are missing (the bank's merge is in the latency only).
    One local Ray instance with max(shards) shard actors, each with the byte budget of the biggest
    memory on one shard.
    """
    import ray

    from longmem.memory import ChunkStore, Memory
    from services.bank import RemoteBank, start_bank, stop_bank
    from services.messages import hits_to_proto

    sizes, shards = sorted(set(sizes)), sorted(set(shards))
    c = config.memory.chunk_size
    k = config.memory.topk_tokens // c
    dims = search_dims(config)
    hkv, d, hq = dims["kv_heads"], dims["head_dim"], dims["query_heads"]
    if not sizes or not shards or shards[0] < 1:
        raise ValueError("search_scaling needs sizes and shard counts >= 1")
    if any(n % c or n // c < k for n in sizes):
        raise ValueError(f"memory sizes must be multiples of the chunk size {c} holding at least {k} chunks")
    budget = int(ChunkStore.bytes_per_chunk(c, hkv, d) * (max(sizes) // c) * SHARD_BUDGET_HEADROOM
                 + SHARD_BUDGET_EXTRA_BYTES)
    storage = tempfile.mkdtemp(prefix="longmem-bench-storage-")
    cfg = bench_config(config, storage, num_shards=max(shards), shard_budget_bytes=budget)
    cfg.memory.ann_min_tokens = 0  # exact: random keys have no structure for an index to find
    queries = np.random.default_rng(seed).standard_normal((1, query_tokens, hq, d), dtype=np.float32)
    q_torch = torch.from_numpy(queries)
    rows = []
    try:
        with local_ray(cfg, cfg.serve.bank_num_cpus + cfg.serve.num_shards * cfg.serve.shard_num_cpus):
            ray_cpus = ray.cluster_resources().get("CPU", 0.0)
            shard_threads = probe_threads(cfg.serve.shard_num_cpus, 0)
            handle = start_bank(cfg, num_kv_heads=hkv, head_dim=d)
            bank = RemoteBank(cfg)
            try:
                ray.get(handle.shard_stats.remote())  # every actor up before anything is timed
                for size in sizes:
                    data_seed = seed + size
                    log(f"search scaling: {tokens_label(size)} tokens in process")
                    memory = Memory("reference", size, c, hkv, d, np.dtype(config.memory.dtype))  # as the shards store
                    fill_s = _fill(memory.append, size, fill_tokens, data_seed, hkv, d)
                    times, ref = _time_calls(partial(memory.search, queries[0], k), warmup, repeats)
                    local = {"median_s": statistics.median(times), "min_s": min(times),
                             "fill_tokens_per_s": size / fill_s}
                    del memory
                    gc.collect()
                    row = {"tokens": size, "in_process": local, "sharded": []}
                    for s in shards:
                        log(f"search scaling: {tokens_label(size)} tokens over {s} shard(s)")
                        memory_id = f"bench-{size}-{s}"
                        bank.create(memory_id, size, s)
                        try:
                            fill_s = _fill(partial(bank.append, memory_id), size, fill_tokens, data_seed, hkv, d)
                            held = bank.stats(memory_id).tokens_held
                            if held != size:
                                raise AssertionError(f"a memory of {size} tokens holds {held}")
                            cpu_before = _shard_search_cpu(handle)
                            times, hits = _time_calls(partial(bank.search, [[memory_id]], q_torch, k), warmup,
                                                      repeats)
                            shard_cpu = _cpu_per_search(cpu_before, _shard_search_cpu(handle))
                        finally:
                            bank.delete(memory_id)
                        # What one search returns: the merged hits as arrays, and as the bank's reply
                        # (hits with their token keys/values; every shard sends the bank as much).
                        hits_array_bytes = sum(getattr(hits[0], f.name).nbytes for f in dataclasses.fields(hits[0]))
                        hits_proto_bytes = hits_to_proto(hits[0]).ByteSize()
                        row["sharded"].append({
                            "shards": s, "median_s": statistics.median(times), "min_s": min(times),
                            "fill_tokens_per_s": size / fill_s,
                            "topk_match": float(np.mean(hits[0].seqs == ref.seqs)),
                            "shard_cpu_s": shard_cpu, "max_shard_cpu_s": max(shard_cpu),
                        })
                    del ref
                    gc.collect()
                    rows.append(row)
            finally:
                stop_bank(cfg)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    for row in rows:
        base = row["sharded"][0]  # the smallest shard count
        for x in row["sharded"]:
            x["ideal_s"] = base["median_s"] * base["shards"] / x["shards"]
            x["vs_ideal"] = x["median_s"] / x["ideal_s"]
            x["vs_base"] = x["median_s"] / base["median_s"]
            x["vs_in_process"] = x["median_s"] / row["in_process"]["median_s"]
            x["cpu_ideal_s"] = base["max_shard_cpu_s"] * base["shards"] / x["shards"]
            x["cpu_vs_ideal"] = x["max_shard_cpu_s"] / x["cpu_ideal_s"]
    return {"chunk_size": c, **dims, "query_tokens": query_tokens, "k_chunks": k, "fill_tokens": fill_tokens,
            "repeats": repeats, "warmup": warmup, "shard_actors": cfg.serve.num_shards,
            "shard_budget_bytes": budget, "ray_cpus": ray_cpus, "shard_threads": shard_threads,
            "base_shards": shards[0], "hits_array_bytes": hits_array_bytes, "hits_proto_bytes": hits_proto_bytes,
            "rows": rows}


def table(r: Result) -> str:
    rows = []
    base = r["base_shards"]
    for row in r["rows"]:
        local = row["in_process"]
        rows.append([tokens_label(row["tokens"]), "in-process", f"{1e3 * local['median_s']:.1f}",
                     f"{1e3 * local['min_s']:.1f}", "", "", "", "1.00x", f"{local['fill_tokens_per_s']:,.0f}", "", "", ""])
        for x in row["sharded"]:
            rows.append([tokens_label(row["tokens"]), str(x["shards"]), f"{1e3 * x['median_s']:.1f}",
                         f"{1e3 * x['min_s']:.1f}", f"{x['vs_base']:.2f}x", f"{1e3 * x['ideal_s']:.1f}",
                         f"{x['vs_ideal']:.2f}x", f"{x['vs_in_process']:.2f}x", f"{x['fill_tokens_per_s']:,.0f}",
                         f"{x['topk_match']:.4f}", f"{1e3 * x['max_shard_cpu_s']:.1f}", f"{x['cpu_vs_ideal']:.2f}x"])
    title = (f"## Search scaling: one search of {r['query_tokens']} query tokens x {r['query_heads']} heads for "
             f"{r['k_chunks']} chunks as a reader searches (bank route, shards, merge; median of {r['repeats']}); ideal = "
             f"lat(N, {base} shard) x {base} / S; shard CPU: the busiest shard's process CPU time per search, "
             f"against the same ideal")
    moved = (f"one search returns {r['hits_array_bytes'] / 2**20:.1f} MiB of hits with their token keys/values "
             f"({r['hits_proto_bytes'] / 2**20:.1f} MiB as protobuf); shard actors: "
             f"{r['shard_threads']['torch_threads']} torch / {r['shard_threads']['faiss_threads']} faiss threads "
             f"({r['shard_threads']['num_cpus']:g} CPU)")
    return "\n".join([
        title, "",
        markdown_table(["memory tokens", "shards", "median ms", "min ms", f"vs {base} shard", "ideal ms",
                     "measured / ideal", "vs in-process", "fill tok/s", "top-k match", "shard CPU ms",
                     "shard CPU / ideal"], rows), "",
        moved])


def plot(axes, r: Result) -> None:
    tokens = [row["tokens"] for row in r["rows"]]
    ax = axes[0]
    ax.plot(tokens, [1e3 * row["in_process"]["median_s"] for row in r["rows"]], "o--", label="in-process")
    for i, s in enumerate(x["shards"] for x in r["rows"][0]["sharded"]):
        ax.plot(tokens, [1e3 * row["sharded"][i]["median_s"] for row in r["rows"]], "o-", label=f"{s} shard(s)")
    latency_axes(ax, "ms per search", "search latency")
    ax = axes[1]
    for row in r["rows"]:
        ax.plot([x["shards"] for x in row["sharded"]], [x["vs_ideal"] for x in row["sharded"]], "o-",
                label=f"{tokens_label(row['tokens'])} tokens")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    shards = [x["shards"] for x in r["rows"][0]["sharded"]]
    ax.set_xticks(shards, [str(s) for s in shards])
    ax.minorticks_off()
    ax.set_xlabel("shards")
    ax.set_ylabel("measured / ideal latency")
    ax.set_title("search scaling", fontsize=10)
    ax.legend(fontsize=7)
