"""Benchmark of the LongMem services against the in-process core (prints numbers; not a test).

Part 1 (model): the Serve application (gateway, encoder, reader, bank and shard actors on a local
Ray instance, gRPC on a free port) against `longmem.model.LongMem` in this process, on the same real
text and the same backbone: Append tokens/s, and Score tokens/s reading against that memory
(append=False, so a scratch memory is searched with it). Both paths score the same tokens, so
their log-probabilities are compared too (the service must compute what the core computes).

Part 2 (search): the bank actor driven directly (`services.bank.start_bank` + `RemoteBank`),
memories of several sizes striped over 1, 2, 4 shards and filled with random keys/values; the
latency of one search of [1, T, Hq, d] queries, against the in-process `longmem.memory.Memory`
holding the same chunks in one store.

The tables and the machine description are printed and written as Markdown to --out.

    .venv/bin/python scripts/bench_services.py                  # everything, defaults below
    .venv/bin/python scripts/bench_services.py --parts search --sizes 16k,64k --shards 1,2
    .venv/bin/python scripts/bench_services.py --parts model --backbone /path/to/hf-model --tokens 1024
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---- defaults (all documented in --help) -------------------------------------------------------
DEFAULT_PARTS = "model,search"
DEFAULT_TOKENS = 4096  # tokens appended, then as many further tokens scored, per path
DEFAULT_WARMUP_TOKENS = 256  # a small append + score per path before timing (lazy inits, first calls)
DEFAULT_SIZES = "16k,64k,256k,1M"  # memory sizes (tokens) of the search benchmark
DEFAULT_SHARDS = "1,2,4"  # shard counts a memory is striped over
DEFAULT_KV_HEADS = 3  # SmolLM2-135M: 3 kv heads of 64 dims, 9 query heads
DEFAULT_HEAD_DIM = 64
DEFAULT_QUERY_HEADS = 9
DEFAULT_QUERY_TOKENS = 64
DEFAULT_K_CHUNKS = 16  # topk_tokens 64 / chunk_size 4, the config defaults
DEFAULT_CHUNK_SIZE = 4
DEFAULT_FILL_TOKENS = 65_536  # tokens per bank append while filling a memory
DEFAULT_REPEATS = 5  # timed searches per (size, shards); the median is reported
DEFAULT_WARMUP = 1  # untimed searches before them
DEFAULT_SEED = 0
DEFAULT_OUT = ROOT / "results" / "bench_services.md"
READY_TIMEOUT_S = 120.0
SIZE_SUFFIX = {"k": 1024, "m": 1024**2}


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = SIZE_SUFFIX.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def fmt_size(n: int) -> str:
    for suffix, scale in (("M", 1024**2), ("k", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, padded so that it also reads well on a terminal."""
    cells = [headers] + rows
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]
    just = lambda i: str.ljust if i == 0 else str.rjust  # first column (names) left, numbers right
    line = lambda r: "| " + " | ".join(just(i)(str(c), w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    rule = ["-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(headers), "|" + "|".join(rule) + "|",
                      *map(line, rows)])


class Report:
    """Collects what is printed, to write the same text as Markdown at the end."""

    def __init__(self):
        self.parts: list[str] = []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.parts.append(text)

    def markdown(self) -> str:
        return "\n".join(self.parts).rstrip() + "\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- Ray helpers -------------------------------------------------------------------------------
def probe_worker_threads(num_cpus: float) -> tuple[str, int, int]:
    """(OMP_NUM_THREADS, torch threads, faiss threads) seen by a Ray worker granted num_cpus: what
    the actors of the services asking for that many CPUs run with."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe():
        import faiss
        import torch

        return os.environ.get("OMP_NUM_THREADS", "unset"), torch.get_num_threads(), faiss.omp_get_max_threads()

    return ray.get(probe.remote())


def wait_actors_gone(names: list[str], namespace: str, timeout_s: float = 60.0) -> None:
    """After ray.kill, a detached actor's name is released asynchronously; start_bank uses
    get_if_exists, so it must not find the previous bank."""
    import ray

    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"actor {name} still registered {timeout_s:g} s after ray.kill")


# ---- part 1: service vs in-process -------------------------------------------------------------
def model_config(args, grpc_port: int):
    from longmem.config import LongMemConfig

    data: dict = {"serve": {"grpc_port": grpc_port, "http_port": free_port(), "storage_uri": tempfile.mkdtemp()},
                  "read": {}, "backbone": {}}
    if args.backbone:
        data["backbone"]["name_or_path"] = str(Path(args.backbone).expanduser().resolve())
    if args.segment:
        data["read"]["segment_tokens"] = args.segment
    if args.torch_threads:
        data["backbone"]["torch_threads"] = args.torch_threads
    return LongMemConfig.from_dict(data).validate()


def bench_model(args, report: Report, machine: dict) -> None:
    import numpy as np
    from ray import serve
    from transformers import AutoTokenizer

    from longmem.backbone import resolve_backbone_path
    from longmem.client import LongMemClient
    from longmem.data import essays_document
    from longmem.model import LongMem
    from services.app import APP_NAME, build, grpc_options
    from services.bank import BANK_NAME, shard_names, stop_bank

    port = free_port()
    cfg = model_config(args, port)
    path = resolve_backbone_path(cfg.backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    n, warm = args.tokens, args.warmup_tokens
    ids = tokenizer.encode(essays_document(), add_special_tokens=False)
    if len(ids) < 2 * n + 2 * warm:
        raise SystemExit(f"the essays have {len(ids):,} tokens; --tokens {n} needs {2 * n + 2 * warm:,}")
    append_ids, score_ids = ids[:n], ids[n:2 * n]
    warm_append, warm_score = ids[2 * n:2 * n + warm], ids[2 * n + warm:2 * n + 2 * warm]

    ns = cfg.serve.namespace
    for cpus in sorted({cfg.serve.encoder_num_cpus, cfg.serve.reader_num_cpus}):
        omp, tt, ft = probe_worker_threads(cpus)
        machine[f"Ray worker with num_cpus={cpus:g} (encoder/reader replicas)"] = (
            f"OMP_NUM_THREADS={omp}, torch threads {tt}, faiss threads {ft}"
            + (f"; backbone.torch_threads={cfg.backbone.torch_threads} overrides torch in the replicas"
               if cfg.backbone.torch_threads else ""))

    results = {}
    t0 = time.perf_counter()
    log(f"starting Serve (gRPC :{port}) with backbone {path}")
    serve.start(grpc_options=grpc_options(cfg), http_options={"port": cfg.serve.http_port})
    try:
        serve.run(build(cfg), name=APP_NAME, route_prefix="/")
        with LongMemClient(f"localhost:{port}") as client:
            client.wait_ready(READY_TIMEOUT_S)
            startup = time.perf_counter() - t0
            log(f"service ready in {startup:.1f} s; warm-up")
            client.create_memory("bench-warm")
            client.append("bench-warm", token_ids=warm_append)
            client.score(token_ids=warm_score, memory_id="bench-warm", append=False)
            client.delete_memory("bench-warm")
            log(f"service: append {n} tokens")
            client.create_memory("bench-svc")
            t = time.perf_counter()
            resp = client.append("bench-svc", token_ids=append_ids)
            t_append = time.perf_counter() - t
            assert resp.tokens_appended == n, resp
            log(f"service: score {n} tokens with memory")
            t = time.perf_counter()
            scored = client.score(token_ids=score_ids, memory_id="bench-svc", append=False)
            t_score = time.perf_counter() - t
            results["service (gRPC)"] = (startup, t_append, t_score, np.asarray(scored.logprobs),
                                         scored.perplexity, scored.backbone_perplexity)
            client.delete_memory("bench-svc")
    finally:
        serve.shutdown()
        stop_bank(cfg)
        wait_actors_gone([BANK_NAME, *shard_names(cfg)], ns)

    log("in-process: loading LongMem")
    t0 = time.perf_counter()
    model = LongMem(cfg)
    startup = time.perf_counter() - t0
    machine["in-process torch threads (this process)"] = str(__import__("torch").get_num_threads())
    m = model.create_memory("bench-warm")
    model.append(m, token_ids=warm_append)
    model.score(token_ids=warm_score, memory_id=m, append=False)
    model.delete_memory(m)
    log(f"in-process: append {n} tokens")
    m = model.create_memory("bench-local")
    t = time.perf_counter()
    assert model.append(m, token_ids=append_ids) == n
    t_append = time.perf_counter() - t
    log(f"in-process: score {n} tokens with memory")
    t = time.perf_counter()
    r = model.score(token_ids=score_ids, memory_id=m, append=False)
    t_score = time.perf_counter() - t
    results["in-process (LongMem)"] = (startup, t_append, t_score, r.logprobs, r.perplexity, r.backbone_perplexity)
    model.delete_memory(m)
    del model
    gc.collect()

    svc, loc = results["service (gRPC)"], results["in-process (LongMem)"]
    rows = [[name, f"{s:.1f}", f"{n / a:,.0f}", f"{a:.2f}", f"{n / sc:,.0f}", f"{sc:.2f}", f"{ppl:.3f}", f"{bppl:.3f}"]
            for name, (s, a, sc, _, ppl, bppl) in results.items()]
    rows.append(["ratio service / in-process", "", f"{(n / svc[1]) / (n / loc[1]):.2f}", "",
                 f"{(n / svc[2]) / (n / loc[2]):.2f}", "", "", ""])
    diff = float(np.max(np.abs(svc[3] - loc[3]))) if len(svc[3]) == len(loc[3]) else float("nan")
    report.add(f"## 1. Service vs in-process: append and score, {n:,} tokens each\n")
    report.add(f"Backbone `{cfg.backbone.name_or_path}` ({path}), segment {cfg.read.segment_tokens} tokens, "
               f"chunk {cfg.memory.chunk_size}, top-k {cfg.memory.topk_tokens} tokens, "
               f"{cfg.serve.num_shards} shard actors, memory striped over {cfg.serve.default_memory_shards}. "
               f"Text: the first {n:,} tokens of `longmem.data.essays_document()` are appended to a fresh "
               f"memory; the next {n:,} are scored against it (append=False: scratch memory + that memory). "
               f"Token ids are sent, so both paths read identical tokens. One timed run per path after a "
               f"{warm}-token append + score warm-up; startup = Serve deploy until ready / LongMem(cfg).\n")
    report.add(table(["path", "startup s", "append tok/s", "append s", "score tok/s", "score s",
                      "ppl (memory)", "ppl (backbone)"], rows))
    report.add(f"\nmax |logprob service − in-process| over the {len(loc[3]):,} scored tokens: {diff:.2e}\n")


# ---- part 2: search latency vs memory size and shards --------------------------------------------
def random_kv(rng_seed: int, tokens: int, kv_heads: int, head_dim: int):
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    keys = rng.standard_normal((tokens, kv_heads, head_dim), dtype=np.float32)
    values = rng.standard_normal((tokens, kv_heads, head_dim), dtype=np.float32)
    return keys, values, np.arange(tokens, dtype=np.int32)


def fill(append, size: int, piece: int, seed: int, kv_heads: int, head_dim: int) -> float:
    """Appends `size` random tokens in pieces (the same data for every memory of this size);
    returns the seconds spent in the appends themselves (not generating the data)."""
    spent = 0.0
    for i, start in enumerate(range(0, size, piece)):
        k, v, ids = random_kv(seed * 1_000_003 + i, min(piece, size - start), kv_heads, head_dim)
        t = time.perf_counter()
        append(k, v, ids)
        spent += time.perf_counter() - t
    return spent


def time_calls(call, warmup: int, repeats: int) -> tuple[list[float], object]:
    out = None
    for _ in range(warmup):
        out = call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
    return times, out


def bench_search(args, report: Report, machine: dict) -> None:
    import numpy as np
    import ray
    import torch

    from longmem.config import LongMemConfig
    from longmem.memory import ChunkStore, Memory
    from services.bank import BANK_NAME, RemoteBank, shard_names, start_bank, stop_bank

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    shards = sorted({int(s) for s in args.shards.split(",")})
    c, hkv, d, hq, tq, k = (args.chunk_size, args.kv_heads, args.head_dim, args.query_heads,
                            args.query_tokens, args.k_chunks)
    if hq % hkv or any(s % c for s in sizes):
        raise SystemExit("query heads must be a multiple of kv heads, and sizes multiples of the chunk size")
    per_chunk = ChunkStore.bytes_per_chunk(c, hkv, d)
    budget = int(per_chunk * (max(sizes) // c) * 1.05) + (64 << 20)  # the biggest memory on one shard
    cfg = LongMemConfig.from_dict({
        "memory": {"chunk_size": c},
        "serve": {"num_shards": max(shards), "shard_budget_bytes": budget, "storage_uri": tempfile.mkdtemp()},
    })
    omp, tt, ft = probe_worker_threads(cfg.serve.shard_num_cpus)
    machine[f"Ray worker with num_cpus={cfg.serve.shard_num_cpus:g} (shard actors)"] = (
        f"OMP_NUM_THREADS={omp}, torch threads {tt}, faiss threads {ft}")

    handle = start_bank(cfg, num_kv_heads=hkv, head_dim=d)
    bank = RemoteBank(handle)
    rng = np.random.default_rng(args.seed)
    queries = rng.standard_normal((1, tq, hq, d), dtype=np.float32)
    q_torch = torch.from_numpy(queries)
    rows, medians, extra = [], {}, {}
    try:
        ray.get(handle.shard_stats.remote())  # all actors up before timing anything
        for size in sizes:
            seed = args.seed + size
            log(f"search: {fmt_size(size)} tokens in process")
            mem = Memory("ref", size, c, hkv, d)
            fill_s = fill(lambda kk, vv, ii: mem.append(kk, vv, ii), size, args.fill_tokens, seed, hkv, d)
            times, ref = time_calls(lambda: mem.search(queries[0], k), args.warmup, args.repeats)
            medians[(size, 0)] = statistics.median(times)
            extra[(size, 0)] = (fill_s, times, 1.0)
            del mem
            gc.collect()
            for s in shards:
                log(f"search: {fmt_size(size)} tokens over {s} shard(s)")
                mid = f"bench-{fmt_size(size)}-{s}"
                bank.create(mid, size, s)
                try:
                    fill_s = fill(lambda kk, vv, ii: bank.append(mid, kk, vv, ii), size, args.fill_tokens,
                                  seed, hkv, d)
                    held = bank.stats(mid).tokens_held
                    assert held == size, (held, size)
                    times, hits = time_calls(lambda: bank.search([[mid]], q_torch, k), args.warmup, args.repeats)
                    match = float(np.mean(hits[0].seqs == ref.seqs))
                finally:
                    bank.delete(mid)
                medians[(size, s)] = statistics.median(times)
                extra[(size, s)] = (fill_s, times, match)
            del ref
            gc.collect()
    finally:
        stop_bank(cfg)
        wait_actors_gone([BANK_NAME, *shard_names(cfg)], cfg.serve.namespace)

    base_s, big = shards[0], max(sizes)
    anchor = medians[(big, base_s)]  # ideal(N, S) = anchor * (N / N_max) * (S_base / S)
    for size in sizes:
        local = medians[(size, 0)]
        fill_s, times, _ = extra[(size, 0)]
        rows.append([fmt_size(size), "in-process", f"{local * 1e3:.1f}", f"{min(times) * 1e3:.1f}",
                     f"{local * 1e3 * 1000 / tq:.0f}", "", "", "1.00", f"{size / fill_s:,.0f}", ""])
        for s in shards:
            lat = medians[(size, s)]
            fill_s, times, match = extra[(size, s)]
            ideal = anchor * (size / big) * (base_s / s)
            rows.append([fmt_size(size), str(s), f"{lat * 1e3:.1f}", f"{min(times) * 1e3:.1f}",
                         f"{lat * 1e3 * 1000 / tq:.0f}", f"{lat / medians[(size, base_s)]:.2f}",
                         f"{lat / ideal:.2f}", f"{lat / local:.2f}", f"{size / fill_s:,.0f}", f"{match:.4f}"])
    report.add("## 2. Search latency vs memory size and shards\n")
    report.add(f"Bank actor driven directly (`start_bank` + `RemoteBank`, {max(shards)} shard actors, "
               f"{budget / 2**30:.2f} GiB budget each, chunk {c}); random float32 keys/values "
               f"[T, {hkv}, {d}] appended {fmt_size(args.fill_tokens)} tokens at a time. One search = "
               f"`search([[id]], queries [1, {tq}, {hq}, {d}], k_chunks={k})`: {tq} query tokens × {hq} "
               f"heads; median (and min) of {args.repeats} after {args.warmup} warm-up. "
               f"`in-process` = `longmem.memory.Memory` (one store) searched in this process with the "
               f"same data and queries. ms/1k q-tok = median × 1000 / {tq} (linear estimate). "
               f"× vs {base_s} shard = median / median at {base_s} shard(s), same size. × vs ideal = "
               f"median / ideal, ideal(N, S) = latency({fmt_size(big)}, {base_s} shard) × N / "
               f"{fmt_size(big)} × {base_s} / S (latency ∝ N/S anchored at the biggest memory). "
               f"top-k match = share of the {tq}×{hq}×{k} hit seqs equal to the in-process search.\n")
    hit_bytes = tq * hq * k * (4 + 8 + 8 + 4 * c + 2 * c * d * np.dtype(np.float32).itemsize)
    report.add(f"Each search moves the hits with their token keys/values: {hit_bytes / 2**20:.1f} MiB from every "
               f"shard of the memory to the bank, and {hit_bytes / 2**20:.1f} MiB (merged) from the bank "
               f"to the caller, as protobuf through Ray.\n")
    report.add(table(["size", "shards", "median ms", "min ms", "ms/1k q-tok", f"× vs {base_s} shard",
                      "× vs ideal N/S", "× vs in-process", "fill tok/s", "top-k match"], rows))
    report.add("")


# ---- main --------------------------------------------------------------------------------------
def machine_info() -> dict:
    import faiss
    import ray
    import torch
    import transformers

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": f"{platform.node()} ({platform.platform()})",
        "CPU cores": f"os.cpu_count() {os.cpu_count()}, usable {len(os.sched_getaffinity(0))}",
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB",
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "this process": (f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}, "
                         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"),
        "versions": (f"python {platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}, "
                     f"ray {ray.__version__}, transformers {transformers.__version__}"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=DEFAULT_PARTS,
                   help="comma list of parts to run: model (service vs in-process), search (default: %(default)s)")
    g = p.add_argument_group("part 1: service vs in-process")
    g.add_argument("--backbone", default=None,
                   help="Hugging Face model directory (default: the config default, SmolLM2-135M-Instruct)")
    g.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help="tokens appended, then as many further tokens scored, per path (default: %(default)s)")
    g.add_argument("--segment", type=int, default=None,
                   help="read.segment_tokens (default: the config default, 1024)")
    g.add_argument("--warmup-tokens", type=int, default=DEFAULT_WARMUP_TOKENS,
                   help="tokens of the untimed append + score per path (default: %(default)s)")
    g.add_argument("--torch-threads", type=int, default=0,
                   help="backbone.torch_threads for both paths; 0 leaves torch's default, which in Ray "
                        "replicas with num_cpus<1 is 1 thread (default: %(default)s)")
    g = p.add_argument_group("part 2: search latency")
    g.add_argument("--sizes", default=DEFAULT_SIZES, help="memory sizes in tokens, k/M suffixes (default: %(default)s)")
    g.add_argument("--shards", default=DEFAULT_SHARDS, help="shard counts (default: %(default)s)")
    g.add_argument("--kv-heads", type=int, default=DEFAULT_KV_HEADS, help="kv heads (default: %(default)s)")
    g.add_argument("--head-dim", type=int, default=DEFAULT_HEAD_DIM, help="head dim (default: %(default)s)")
    g.add_argument("--query-heads", type=int, default=DEFAULT_QUERY_HEADS, help="query heads (default: %(default)s)")
    g.add_argument("--query-tokens", type=int, default=DEFAULT_QUERY_TOKENS,
                   help="query tokens per search (default: %(default)s)")
    g.add_argument("--k-chunks", type=int, default=DEFAULT_K_CHUNKS, help="chunks per query (default: %(default)s)")
    g.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per chunk (default: %(default)s)")
    g.add_argument("--fill-tokens", type=int, default=DEFAULT_FILL_TOKENS,
                   help="tokens per append while filling (default: %(default)s)")
    g.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed searches (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed searches first (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random data seed (default: %(default)s)")
    p.add_argument("--ray-cpus", type=float, default=None,
                   help="num_cpus of the local Ray instance (default: Ray's detection)")
    p.add_argument("--ray-logs", action="store_true", help="forward actor and replica logs to this terminal")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report, overwritten (default: %(default)s)")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts <= {"model", "search"}:
        p.error(f"unknown parts: {sorted(parts - {'model', 'search'})}")

    import ray

    t_start = time.perf_counter()
    machine = machine_info()
    report = Report()
    sections: list[str] = []
    # address="local": always a fresh Ray instance of our own. A bare ray.init() joins the cluster in
    # /tmp/ray/ray_current_cluster when one is running (e.g. a test's ray.cluster_utils.Cluster),
    # and this benchmark starts and kills the detached bank/shard actors by their fixed names.
    ray.init(address="local", namespace="longmem", num_cpus=args.ray_cpus, include_dashboard=False,
             log_to_driver=args.ray_logs, logging_level="WARNING")
    machine["Ray CPUs"] = f"{ray.cluster_resources().get('CPU', 0):g}"
    try:
        body = Report()
        if "model" in parts:
            bench_model(args, body, machine)
        if "search" in parts:
            bench_search(args, body, machine)
        sections = body.parts
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t_start
    machine["load average at end (1/5/15 min)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    machine["benchmark wall time"] = f"{wall:.1f} s"

    # The sections were printed as they were measured; the machine table is printed now, and the
    # file gets both.
    command = " ".join(["scripts/bench_services.py", *(sys.argv[1:] if argv is None else argv)])
    report.add("\n# LongMem services benchmark\n")
    report.add(f"Command: `{command}`\n")
    report.add(table(["machine", ""], [[k, v] for k, v in machine.items()]))
    report.add("")
    report.parts.extend(sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.markdown(), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
