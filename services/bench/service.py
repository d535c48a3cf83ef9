"""Service overhead: Append and Score through the gRPC API of the Serve application (gateway,
encoder, reader, bank and shard actors) against `longmem.model.LongMem` in this process, on the same
real tokens and backbone: tokens/s of each path, service / in-process, and the largest difference of
their log-probabilities (the service must compute what the core computes)."""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any, TypedDict

import numpy as np
import torch

from longmem.bench.common import log, text_ids, timed
from longmem.config import LongMemConfig
from longmem.memory import round_up
from longmem.model import LongMem
from longmem.report import markdown_table

from .common import (
    READY_TIMEOUT_S,
    bench_config,
    probe_threads,
    service_cpus,
    local_ray,
)

SERVICE_WARMUP_TOKENS = 256  # an untimed append + score this long per path first (lazy inits, first calls)
PANELS = 1  # subplots of this part in bench.png


class PathRate(TypedDict):
    """Append then score through one path."""
    startup_s: float | None
    append_s: float
    score_s: float
    append_tokens_per_s: float
    score_tokens_per_s: float
    perplexity: float
    backbone_perplexity: float


class Result(TypedDict):
    tokens: int
    warmup_tokens: int
    backbone: str
    device: str
    window: int
    chunk_size: int
    topk_tokens: int
    shard_actors: int
    memory_shards: int
    ray_cpus: float
    in_process_torch_threads: int
    replica_threads: dict[str, Any]
    scored_tokens: int
    max_abs_logprob_diff: float
    max_abs_backbone_logprob_diff: float
    ratio: dict[str, float]  # append, score: service / in process
    in_process: PathRate
    service: PathRate


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


def run(config: LongMemConfig, tokens: int, *, model: LongMem | None = None,
                     warmup_tokens: int = SERVICE_WARMUP_TOKENS,
                     ready_timeout_s: float = READY_TIMEOUT_S) -> Result:
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
    ids = text_ids(model.tokenizer, 2 * tokens + 2 * warmup_tokens)
    append_ids, score_ids = ids[:tokens], ids[tokens:2 * tokens]
    warm_append, warm_score = ids[2 * tokens:2 * tokens + warmup_tokens], ids[2 * tokens + warmup_tokens:]

    log(f"service overhead: in-process, {tokens:,} tokens")
    warm = model.create_memory(capacity_tokens=round_up(warmup_tokens, c))
    model.append(warm, token_ids=warm_append)
    model.score(token_ids=warm_score, memory_id=warm, append=False)
    model.delete_memory(warm)
    memory = model.create_memory(capacity_tokens=capacity)
    try:
        append_s, _ = timed(lambda: model.append(memory, token_ids=append_ids), model.backbone.device)
        score_s, r = timed(lambda: model.score(token_ids=score_ids, memory_id=memory, append=False),
                                 model.backbone.device)
    finally:
        model.delete_memory(memory)
    local = _path(load_s, tokens, append_s, score_s, r.logprobs, r.backbone_logprobs, r.perplexity,
                  r.backbone_perplexity)
    local_threads = torch.get_num_threads()

    storage = tempfile.mkdtemp(prefix="longmem-bench-storage-")
    cfg = bench_config(config, storage)
    try:
        with local_ray(cfg, service_cpus(cfg)):
            ray_cpus = ray.cluster_resources().get("CPU", 0.0)
            probes = {cpus: probe_threads(cpus, cfg.serve.replica_torch_threads)
                      for cpus in {cfg.serve.encoder_num_cpus, cfg.serve.reader_num_cpus}}
            threads = {"encoder": probes[cfg.serve.encoder_num_cpus], "reader": probes[cfg.serve.reader_num_cpus]}
            log(f"service overhead: deploying the Serve application (gRPC :{cfg.serve.grpc_port})")
            t0 = time.perf_counter()
            serve.start(grpc_options=grpc_options(cfg), http_options={"host": "127.0.0.1",
                                                                      "port": cfg.serve.http_port})
            try:
                serve.run(build(cfg), name=APP_NAME, route_prefix="/")
                with LongMemClient(f"127.0.0.1:{cfg.serve.grpc_port}") as client:
                    client.wait_ready(ready_timeout_s)
                    startup_s = time.perf_counter() - t0
                    log(f"service overhead: service ready in {startup_s:.1f} s; {tokens:,} tokens")
                    client.create_memory("bench-warm", capacity_tokens=round_up(warmup_tokens, c))
                    client.append("bench-warm", token_ids=warm_append)
                    client.score(token_ids=warm_score, memory_id="bench-warm", append=False)
                    client.delete_memory("bench-warm")
                    client.create_memory("bench", capacity_tokens=capacity)
                    append_s, appended = timed(lambda: client.append("bench", token_ids=append_ids))
                    if appended.tokens_appended != tokens:
                        raise AssertionError(f"the service appended {appended.tokens_appended} of {tokens} tokens")
                    score_s, s = timed(lambda: client.score(token_ids=score_ids, memory_id="bench",
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


def table(r: Result) -> str:
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


def plot(axes, r: Result) -> None:
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
