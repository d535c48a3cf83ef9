"""Benchmarks of the LongMem services on a local Ray instance, and `run_bench`, which runs them with the
Ray-free parts of longmem/bench.py in one process (`longmem bench`).

- `service_overhead`: Append and Score through the gRPC API of the Serve application (gateway,
  encoder, reader, bank and shard actors) against `longmem.model.LongMem` in this process, on the
  same real tokens and backbone: tokens/s of each path, service / in-process, and the largest
  difference of their log-probabilities (the service must compute what the core computes).
- `search_scaling`: the bank actor driven directly (`start_bank` + `RemoteBank`), memories of several
  sizes striped over 1, 2, 4... shards and filled with random keys/values: latency of one search
  against the in-process `longmem.memory.Memory` holding the same chunks, and against the ideal of
  perfect striping, lat(N, 1 shard) / S.

Each starts and stops its own local Ray instance (`ray.init(address="local")`: a bare ray.init() would
join whatever cluster it finds, and these start and kill the detached bank and shard actors by their
fixed names), with Serve on free ports and durable state in a temporary directory removed afterwards.
Results are plain, JSON-ready dicts keyed like longmem.bench's: {"service": ..., "search": ...}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longmem import bench as core
from longmem.config import BENCH_PARTS, LongMemConfig
from longmem.memory import round_up
from longmem.model import LongMem
from longmem.report import markdown_table

# ---- fixed parameters (the sizes of each part are config.bench's) --------------------------------
SERVICE_WARMUP_TOKENS = 256  # an untimed append + score this long per path first (lazy inits, first calls)
SEARCH_QUERY_TOKENS = 64  # query tokens per search (x the model's query heads)
SEARCH_FILL_TOKENS = 64 * 1024  # tokens per bank append while filling a memory
SEARCH_WARMUP = 1  # untimed searches first
SHARD_BUDGET_HEADROOM = 1.05  # shard byte budget: the biggest memory on one shard, x this ...
SHARD_BUDGET_EXTRA_BYTES = 64 << 20  # ... plus this
READY_TIMEOUT_S = 300.0  # Serve deploy until the gRPC API answers
RAY_START_ATTEMPTS = 2  # a local Ray instance may time out starting on a busy machine: try once more
BENCH_NAMESPACE = "longmem-bench"  # Ray namespace of the bank and shard actors the benchmarks start
SEED = 0
PARTS = {part: {"memory": "memory_cost"}.get(part, part) for part in BENCH_PARTS}  # name -> result key
BENCH_FILES = ("bench.json", "bench.md", "bench.png")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- Ray helpers -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(config: LongMemConfig, num_cpus: float) -> Iterator[None]:
    """A fresh local Ray instance of our own for the block (never a cluster that happens to run), with at
    least `num_cpus` logical CPUs so that every actor the benchmark starts is scheduled."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("the service benchmarks start their own local Ray instance; call them with Ray not "
                           "initialized")
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
            _log(f"local Ray did not start ({e}); trying again")
    try:
        yield
    finally:
        ray.shutdown()


def _bench_config(config: LongMemConfig, storage: str, **serve: Any) -> LongMemConfig:
    """A copy of `config` whose services listen on free ports, keep state under `storage`, and name their
    actors in BENCH_NAMESPACE."""
    data = config.to_dict()
    data["serve"].update(grpc_port=free_port(), http_port=free_port(), storage_uri=storage,
                         namespace=BENCH_NAMESPACE, **serve)
    return LongMemConfig.from_dict(data).validate()


def _probe_threads(num_cpus: float, replica_threads: int) -> dict[str, Any]:
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


def _service_cpus(config: LongMemConfig) -> float:
    s = config.serve
    return (s.encoder_num_cpus + s.reader_num_cpus + s.gateway_num_cpus + s.bank_num_cpus
            + s.num_shards * s.shard_num_cpus)


# ---- 1. service overhead -----------------------------------------------------------------------

def _path(startup_s: float | None, tokens: int, append_s: float, score_s: float, logprobs,
          backbone_logprobs, perplexity: float, backbone_perplexity: float) -> dict[str, Any]:
    return {"startup_s": startup_s, "append_s": append_s, "score_s": score_s,
            "append_tokens_per_s": tokens / append_s, "score_tokens_per_s": tokens / score_s,
            "perplexity": float(perplexity), "backbone_perplexity": float(backbone_perplexity),
            "logprobs": np.asarray(logprobs, np.float64),
            "backbone_logprobs": np.asarray(backbone_logprobs, np.float64)}


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"the service scored {a.shape} tokens, the core {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def service_overhead(config: LongMemConfig, tokens: int, *, model: LongMem | None = None,
                     warmup_tokens: int = SERVICE_WARMUP_TOKENS,
                     ready_timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Append and Score tokens/s through the gRPC API against the in-process core, and how far apart
    their log-probabilities are.

    The first `tokens` tokens of the essays are appended to a fresh memory of exactly that capacity;
    the next `tokens` are scored against it (append=False: a scratch memory of the text's own earlier
    segments is searched with it). Token ids are sent, so both paths read identical tokens. Each path
    first runs an untimed append + score of `warmup_tokens` further tokens. The in-process path runs
    first, before Ray starts; the service path then deploys the Serve application of `config` (its
    serve section: CPUs, threads, shards) on a fresh local Ray instance.
    `model`: a LongMem already loaded (its config then applies to both paths); None loads one.
    """
    import ray
    from ray import serve

    from longmem.client import LongMemClient
    from services.app import APP_NAME, build, grpc_options
    from services.bank import stop_bank

    if tokens <= 0 or warmup_tokens <= 0:
        raise ValueError("tokens and warmup_tokens must be positive")
    if model is None:
        t0 = time.perf_counter()
        model = LongMem(config)
        load_s: float | None = time.perf_counter() - t0
    else:
        load_s = None
    config = model.config
    c = config.memory.chunk_size
    capacity = round_up(tokens, c)
    ids = core.text_ids(model.tokenizer, 2 * tokens + 2 * warmup_tokens)
    append_ids, score_ids = ids[:tokens], ids[tokens:2 * tokens]
    warm_append, warm_score = ids[2 * tokens:2 * tokens + warmup_tokens], ids[2 * tokens + warmup_tokens:]

    _log(f"service overhead: in-process, {tokens:,} tokens")
    warm = model.create_memory(capacity_tokens=round_up(warmup_tokens, c))
    model.append(warm, token_ids=warm_append)
    model.score(token_ids=warm_score, memory_id=warm, append=False)
    model.delete_memory(warm)
    memory = model.create_memory(capacity_tokens=capacity)
    try:
        append_s, _ = core._timed(lambda: model.append(memory, token_ids=append_ids), model.backbone.device)
        score_s, r = core._timed(lambda: model.score(token_ids=score_ids, memory_id=memory, append=False),
                                 model.backbone.device)
    finally:
        model.delete_memory(memory)
    local = _path(load_s, tokens, append_s, score_s, r.logprobs, r.backbone_logprobs, r.perplexity,
                  r.backbone_perplexity)
    local_threads = torch.get_num_threads()

    storage = tempfile.mkdtemp(prefix="longmem-bench-storage-")
    cfg = _bench_config(config, storage)
    try:
        with local_ray(cfg, _service_cpus(cfg)):
            ray_cpus = ray.cluster_resources().get("CPU", 0.0)
            probes = {cpus: _probe_threads(cpus, cfg.serve.replica_torch_threads)
                      for cpus in {cfg.serve.encoder_num_cpus, cfg.serve.reader_num_cpus}}
            threads = {"encoder": probes[cfg.serve.encoder_num_cpus], "reader": probes[cfg.serve.reader_num_cpus]}
            _log(f"service overhead: deploying the Serve application (gRPC :{cfg.serve.grpc_port})")
            t0 = time.perf_counter()
            serve.start(grpc_options=grpc_options(cfg), http_options={"host": "127.0.0.1",
                                                                      "port": cfg.serve.http_port})
            try:
                serve.run(build(cfg), name=APP_NAME, route_prefix="/")
                with LongMemClient(f"127.0.0.1:{cfg.serve.grpc_port}") as client:
                    client.wait_ready(ready_timeout_s)
                    startup_s = time.perf_counter() - t0
                    _log(f"service overhead: service ready in {startup_s:.1f} s; {tokens:,} tokens")
                    client.create_memory("bench-warm", capacity_tokens=round_up(warmup_tokens, c))
                    client.append("bench-warm", token_ids=warm_append)
                    client.score(token_ids=warm_score, memory_id="bench-warm", append=False)
                    client.delete_memory("bench-warm")
                    client.create_memory("bench", capacity_tokens=capacity)
                    append_s, appended = core._timed(lambda: client.append("bench", token_ids=append_ids))
                    if appended.tokens_appended != tokens:
                        raise AssertionError(f"the service appended {appended.tokens_appended} of {tokens} tokens")
                    score_s, s = core._timed(lambda: client.score(token_ids=score_ids, memory_id="bench",
                                                                  append=False))
                    client.delete_memory("bench")
            finally:
                serve.shutdown()
                stop_bank(cfg)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    service = _path(startup_s, tokens, append_s, score_s, s.logprobs, s.backbone_logprobs, s.perplexity,
                    s.backbone_perplexity)

    out = {
        "tokens": tokens, "warmup_tokens": warmup_tokens, "backbone": config.backbone.name_or_path,
        "device": str(model.backbone.device), "window": config.read.segment_tokens, "chunk_size": c,
        "topk_tokens": config.memory.topk_tokens, "shard_actors": cfg.serve.num_shards,
        "memory_shards": cfg.serve.default_memory_shards, "ray_cpus": ray_cpus,
        "in_process_torch_threads": local_threads, "replica_threads": threads,
        "scored_tokens": int(local["logprobs"].size),
        "max_abs_logprob_diff": _max_abs_diff(service["logprobs"], local["logprobs"]),
        "max_abs_backbone_logprob_diff": _max_abs_diff(service["backbone_logprobs"], local["backbone_logprobs"]),
        "ratio": {"append": service["append_tokens_per_s"] / local["append_tokens_per_s"],
                  "score": service["score_tokens_per_s"] / local["score_tokens_per_s"]},
    }
    for name, p in (("in_process", local), ("service", service)):
        del p["logprobs"], p["backbone_logprobs"]
        out[name] = p
    return out


# ---- 2. search scaling -------------------------------------------------------------------------

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
        spent += core._timed(partial(append, keys, values, ids))[0]
    return spent


def _time_calls(call: Callable, warmup: int, repeats: int) -> tuple[list[float], Any]:
    out = None
    for _ in range(warmup):
        out = call()
    times = []
    for _ in range(repeats):
        seconds, out = core._timed(call)
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


def search_scaling(config: LongMemConfig, sizes: Sequence[int], shards: Sequence[int], repeats: int, *,
                   query_tokens: int = SEARCH_QUERY_TOKENS, fill_tokens: int = SEARCH_FILL_TOKENS,
                   warmup: int = SEARCH_WARMUP, seed: int = SEED) -> dict[str, Any]:
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
    cfg = _bench_config(config, storage, num_shards=max(shards), shard_budget_bytes=budget)
    cfg.memory.ann_min_tokens = 0  # exact: random keys have no structure for an index to find
    queries = np.random.default_rng(seed).standard_normal((1, query_tokens, hq, d), dtype=np.float32)
    q_torch = torch.from_numpy(queries)
    rows = []
    try:
        with local_ray(cfg, cfg.serve.bank_num_cpus + cfg.serve.num_shards * cfg.serve.shard_num_cpus):
            ray_cpus = ray.cluster_resources().get("CPU", 0.0)
            shard_threads = _probe_threads(cfg.serve.shard_num_cpus, 0)
            handle = start_bank(cfg, num_kv_heads=hkv, head_dim=d)
            bank = RemoteBank(cfg)
            try:
                ray.get(handle.shard_stats.remote())  # every actor up before anything is timed
                for size in sizes:
                    data_seed = seed + size
                    _log(f"search scaling: {core._tokens(size)} tokens in process")
                    memory = Memory("reference", size, c, hkv, d, np.dtype(config.memory.dtype))  # as the shards store
                    fill_s = _fill(memory.append, size, fill_tokens, data_seed, hkv, d)
                    times, ref = _time_calls(partial(memory.search, queries[0], k), warmup, repeats)
                    local = {"median_s": statistics.median(times), "min_s": min(times),
                             "fill_tokens_per_s": size / fill_s}
                    del memory
                    gc.collect()
                    row = {"tokens": size, "in_process": local, "sharded": []}
                    for s in shards:
                        _log(f"search scaling: {core._tokens(size)} tokens over {s} shard(s)")
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


# ---- 3. rendering ------------------------------------------------------------------------------

def _format_service(r: dict) -> str:
    rows = []
    for name, key in (("in-process core", "in_process"), ("service (gRPC + Ray)", "service")):
        p = r[key]
        rows.append([name, f"{p['append_tokens_per_s']:,.0f}", f"{p['score_tokens_per_s']:,.0f}",
                     f"{p['append_s']:.2f}", f"{p['score_s']:.2f}", f"{p['perplexity']:.3f}",
                     f"{p['backbone_perplexity']:.3f}",
                     "-" if p["startup_s"] is None else f"{p['startup_s']:.1f}"])
    rows.append(["service / in-process", f"{r['ratio']['append']:.2f}x", f"{r['ratio']['score']:.2f}x",
                 "", "", "", "", ""])
    t = r["replica_threads"]
    title = (f"## Service overhead: {r['tokens']:,} tokens appended, {r['tokens']:,} scored against them; "
             f"window {r['window']}, {r['shard_actors']} shard actors, memory on {r['memory_shards']}")
    threads = (f"torch threads: in process {r['in_process_torch_threads']}, encoder replica "
               f"{t['encoder']['torch_threads']} ({t['encoder']['num_cpus']:g} CPU), reader replica "
               f"{t['reader']['torch_threads']} ({t['reader']['num_cpus']:g} CPU); Ray CPUs {r['ray_cpus']:g}")
    same = (f"max |log p service - in-process| over {r['scored_tokens']:,} tokens: LongMem "
            f"{r['max_abs_logprob_diff']:.2e}, backbone {r['max_abs_backbone_logprob_diff']:.2e}")
    return "\n".join([
        title, "",
        markdown_table(["path", "append tok/s", "score tok/s", "append s", "score s", "ppl (memory)",
                     "ppl (backbone)", "startup s"], rows), "",
        threads, same])


def _format_search(r: dict) -> str:
    rows = []
    base = r["base_shards"]
    for row in r["rows"]:
        local = row["in_process"]
        rows.append([core._tokens(row["tokens"]), "in-process", f"{1e3 * local['median_s']:.1f}",
                     f"{1e3 * local['min_s']:.1f}", "", "", "", "1.00x", f"{local['fill_tokens_per_s']:,.0f}", "", "", ""])
        for x in row["sharded"]:
            rows.append([core._tokens(row["tokens"]), str(x["shards"]), f"{1e3 * x['median_s']:.1f}",
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


def _plot_service(axes, r: dict) -> None:
    ax = axes[0]
    ops = ["append", "score"]
    x = np.arange(len(ops))
    for offset, key, label in ((-0.2, "in_process", "in-process"), (0.2, "service", "gRPC + Ray")):
        ax.bar(x + offset, [r[key][f"{op}_tokens_per_s"] for op in ops], 0.4, label=label)
    for i, op in enumerate(ops):
        ax.annotate(f"{r['ratio'][op]:.2f}x", (i + 0.2, r["service"][f"{op}_tokens_per_s"]), ha="center",
                    xytext=(0, 2), textcoords="offset points", fontsize=7)
    ax.set_xticks(x, ops)
    ax.set_ylabel("tokens/s")
    ax.set_title("service overhead", fontsize=10)
    ax.legend(fontsize=7)


def _plot_search(axes, r: dict) -> None:
    tokens = [row["tokens"] for row in r["rows"]]
    ax = axes[0]
    ax.plot(tokens, [1e3 * row["in_process"]["median_s"] for row in r["rows"]], "o--", label="in-process")
    for i, s in enumerate(x["shards"] for x in r["rows"][0]["sharded"]):
        ax.plot(tokens, [1e3 * row["sharded"][i]["median_s"] for row in r["rows"]], "o-", label=f"{s} shard(s)")
    core.latency_axes(ax, "ms per search", "search latency")
    ax = axes[1]
    for row in r["rows"]:
        ax.plot([x["shards"] for x in row["sharded"]], [x["vs_ideal"] for x in row["sharded"]], "o-",
                label=f"{core._tokens(row['tokens'])} tokens")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    shards = [x["shards"] for x in r["rows"][0]["sharded"]]
    ax.set_xticks(shards, [str(s) for s in shards])
    ax.minorticks_off()
    ax.set_xlabel("shards")
    ax.set_ylabel("measured / ideal latency")
    ax.set_title("search scaling", fontsize=10)
    ax.legend(fontsize=7)


FORMATTERS = {**core.FORMATTERS, "service": _format_service, "search": _format_search}
PLOTTERS = {**core.PLOTTERS, "service": (1, _plot_service), "search": (2, _plot_search)}


def format_table(results: dict[str, dict]) -> str:
    """Every part present in `results` (longmem.bench's and these), each as a titled text table."""
    return core.format_table(results, FORMATTERS)


def plot(results: dict[str, dict], path: str | Path) -> Path:
    """One PNG with the subplots of every part present in `results`."""
    return core.plot(results, path, PLOTTERS)


def headline(results: dict[str, dict]) -> list[list[str]]:
    """One ratio or a few per part, both sides measured in this run: [part, figure, value] rows."""
    out = []
    if r := results.get("roofline"):
        for path in ("ingest", "score"):
            out.append(["roofline", f"{path}: measured tokens/s / FLOP bound", f"{r[path]['fraction']:.1%}"])
        e = r["early_exit"]
        out.append(["roofline", "full encode time / encode_memory time (FLOP ratio)",
                    f"{e['speedup']:.2f}x ({e['flop_ratio']:.2f}x)"])
    if r := results.get("eviction"):
        big = r["rows"][-1]
        out.append(["eviction", f"remove_ids + shift / ring buffer, {core._tokens(big['tokens'])} tokens",
                    f"{big['ratio']:,.0f}x"])
    if r := results.get("memory_cost"):
        fp32 = r["rows"][0]
        for x in r["rows"][1:]:
            out.append(["memory cost", f"{x['name']}: bytes/token vs {fp32['name']}, recall@{r['k_chunks']}",
                        f"{x['bytes_per_token'] / fp32['bytes_per_token']:.2f}x, {x['recall']:.3f}"])
    if r := results.get("long_context"):
        both = [x for x in r["rows"] if x["longmem"] and x["full_attention"]]
        if both:
            x = both[-1]
            lm, fa = x["longmem"], x["full_attention"]
            n = core._tokens(x["tokens"])
            out.append(["long context", f"LongMem / full attention, time per token, {n}",
                        f"{lm['s_per_token'] / fa['s_per_token']:.2f}x"])
            if fa["bytes_per_token"] > 0:
                out.append(["long context", f"LongMem / full attention, peak memory per token, {n}",
                            f"{lm['bytes_per_token'] / fa['bytes_per_token']:.2f}x"])
        first, last = r["rows"][0], r["rows"][-1]
        if len(r["rows"]) > 1:
            span = f"{core._tokens(last['tokens'])} / {core._tokens(first['tokens'])}"
            out.append(["long context", f"LongMem time per token, {span}",
                        f"{last['longmem']['s_per_token'] / first['longmem']['s_per_token']:.2f}x"])
    if r := results.get("service"):
        out.append(["service", "append tokens/s, gRPC + Ray / in-process", f"{r['ratio']['append']:.2f}x"])
        out.append(["service", "score tokens/s, gRPC + Ray / in-process", f"{r['ratio']['score']:.2f}x"])
        out.append(["service", "max |log p, gRPC + Ray - in-process|", f"{r['max_abs_logprob_diff']:.1e}"])
    if r := results.get("search"):
        big = r["rows"][-1]
        n = core._tokens(big["tokens"])
        most = big["sharded"][-1]
        out.append(["search", f"{n} tokens, {most['shards']} shards / {r['base_shards']} shard",
                    f"{most['vs_base']:.2f}x"])
        out.append(["search", f"{n} tokens, {most['shards']} shards: measured / ideal", f"{most['vs_ideal']:.2f}x"])
        out.append(["search", f"{n} tokens, {most['shards']} shards: busiest shard's CPU / ideal",
                    f"{most['cpu_vs_ideal']:.2f}x"])
        out.append(["search", f"{n} tokens, {r['base_shards']} shard / in-process",
                    f"{big['sharded'][0]['vs_in_process']:.2f}x"])
    if r := results.get("retrieval"):
        small, big = r["rows"][0], r["rows"][-1]
        span = f"{core._tokens(big['tokens'])} / {core._tokens(small['tokens'])}"
        out.append(["retrieval", f"time per segment's search, {span} ({big['method']} / {small['method']})",
                    f"{r['largest_over_smallest']:.2f}x"])
        out.append(["retrieval", f"{core._tokens(big['tokens'])} tokens: recall@{r['k_chunks']} vs exact, "
                    "time vs exact", f"{big['recall']:.3f}, {big['search_s'] / big['exact_search_s']:.2f}x"])
    return out


def headline_object(results: dict[str, dict]) -> dict[str, float]:
    """bench.json's `headline`: the issue's bars by name, for the parts this run measured."""
    out: dict[str, float] = {}
    if r := results.get("roofline"):
        out.update(ingest_roofline=r["ingest"]["fraction"], score_roofline=r["score"]["fraction"])
    if r := results.get("service"):
        out.update(service_score_ratio=r["ratio"]["score"], service_append_ratio=r["ratio"]["append"])
    if r := results.get("retrieval"):
        sizes = {row["tokens"]: row for row in r["rows"]}
        if 65_536 in sizes and 1_048_576 in sizes:
            out["retrieval_1m_over_64k"] = sizes[1_048_576]["search_s"] / sizes[65_536]["search_s"]
        if 1_048_576 in sizes:
            out["retrieval_recall_1m"] = sizes[1_048_576]["recall"]
    if r := results.get("search"):  # the largest memory: how far the busiest shard's CPU is from 1/S
        out["shard_cpu_scaling_error"] = max(abs(x["cpu_vs_ideal"] - 1) for x in r["rows"][-1]["sharded"])
    return out


# ---- 4. the whole benchmark --------------------------------------------------------------------

def _version(package: str) -> str:
    """The installed version of `package`, without importing it (the core parts run without Ray)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info(config: LongMemConfig) -> dict[str, Any]:
    import faiss

    device = config.backbone.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or "",
        "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
                     "ray": _version("ray"), "transformers": _version("transformers")},
    }


def _machine_table(machine: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {x}" for k, x in v.items())
        if isinstance(v, list):
            return " / ".join(map(str, v))
        return str(v)

    return markdown_table(["machine", ""], [[k, cell(v)] for k, v in machine.items()])


def render(report: dict[str, Any]) -> str:
    """bench.md: the machine, the headline ratios, then every part's table."""
    results = report["results"]
    parts = [f"# LongMem benchmark\n\nCommand: `{report['command']}`\n", _machine_table(report["machine"])]
    if results:
        rows = [[part, figure, value] for part, figure, value in headline(results)]
        parts += ["## Ratios (both sides measured in this run)\n\n"
                  + markdown_table(["part", "figure", "value"], rows),
                  format_table(results).rstrip()]
    walls = ", ".join(f"{p} {s:.0f} s" for p, s in report["wall_s"].items())
    parts.append(f"Wall time: {report['total_wall_s']:.0f} s ({walls}).")
    return "\n\n".join(parts) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"headline": headline_object(report["results"]), **report},
                                               indent=1) + "\n")
    (out / "bench.md").write_text(render(report))
    if report["results"]:
        plot(report["results"], out / "bench.png")


def run_bench(config: LongMemConfig, parts: Sequence[str] = tuple(PARTS), out: str | Path | None = None,
              command: str = "longmem bench") -> dict[str, Any]:
    """Runs `parts` (names of PARTS) with the sizes of config.bench, in this process; loads the LongMem
    once for the parts that take a model. After every part writes bench.json (everything measured so
    far, the machine, the sizes), bench.md (the tables) and bench.png to `out` (default
    config.bench.out_dir); prints each part's table to stderr as it finishes. Returns the report."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown benchmark parts {sorted(unknown)}; known: {list(PARTS)}")
    out = Path(out or config.bench.out_dir)
    b = config.bench
    t_start = time.perf_counter()
    report: dict[str, Any] = {"command": command, "machine": machine_info(config), "sizes": {
        k: v for k, v in config.to_dict()["bench"].items() if k not in ("quick", "out_dir")},
        "results": {}, "wall_s": {}, "total_wall_s": 0.0}
    model = None
    if {"roofline", "memory", "service", "retrieval"} & set(parts):
        _log(f"loading LongMem ({config.backbone.name_or_path})")
        t0 = time.perf_counter()
        model = LongMem(config)
        report["machine"]["model_load_s"] = round(time.perf_counter() - t0, 2)
        report["machine"]["device"] = str(model.backbone.device)
    runs = {
        "roofline": lambda: core.roofline(config, b.roofline_tokens, model=model),
        "eviction": lambda: core.eviction(b.eviction_sizes),
        "memory": lambda: core.memory_cost(config, b.memory_cost_tokens, model=model),
        "long_context": lambda: core.long_context(config, b.long_context_lengths),
        "service": lambda: service_overhead(config, b.service_tokens, model=model),
        "search": lambda: search_scaling(config, b.search_sizes, b.search_shards, repeats=b.search_repeats),
        "retrieval": lambda: core.retrieval(config, b.retrieval_sizes, b.retrieval_repeats, model=model),
    }
    for part, key in PARTS.items():  # always in this order
        if part not in parts:
            continue
        _log(f"part {part}")
        t0 = time.perf_counter()
        result = runs[part]()
        report["wall_s"][part] = time.perf_counter() - t0
        report["results"][key] = result
        report["total_wall_s"] = time.perf_counter() - t_start
        print(format_table({key: result}), file=sys.stderr, flush=True)
        write_report(report, out)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = time.perf_counter() - t_start
    write_report(report, out)
    return report
