"""Roofline: peak matmul FLOP/s of this machine, the FLOPs per token ingest and score need (counted from
the model's dimensions), the tokens/s bounds they give, and the tokens/s the in-process core reaches;
also encode_memory's early exit against a full backbone pass. FLOPs are forward FLOPs, 2 per multiply-add."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypedDict

import faiss
import numpy as np
import torch

from .. import layers
from ..config import LongMemConfig
from ..memory import round_up
from ..model import LongMem
from ..report import markdown_table
from ..roles import batches, pad_segments, segments
from .common import SEED, si, text_ids, timed

MATMUL_REPEATS = 5  # timed runs per size; the fastest counts (the machine may be shared)
EARLY_EXIT_REPEATS = 2  # timed encode_memory / encode passes over the same tokens; the fastest counts
PANELS = 1  # subplots of this part in bench.png


class PathRate(TypedDict):
    """One path (ingest or score) against its FLOP bound."""
    seconds: float
    bound_tokens_per_s: float
    tokens_per_s: float
    fraction: float  # tokens_per_s / bound_tokens_per_s


class EarlyExit(TypedDict):
    encode_memory_s: float
    encode_s: float
    speedup: float  # encode_s / encode_memory_s
    flop_ratio: float  # what the FLOP counts predict


class Result(TypedDict):
    device: str
    dtype: str
    torch_threads: int
    faiss_threads: int
    peak_flops: float  # the fastest square matmul, FLOP/s
    matmul_flops: dict[str, float]  # size -> FLOP/s
    tokens: int
    window: int
    memory_tokens_held: int
    search_chunks: float
    sidenet_blocks_run: int
    sidenet_blocks: int
    flops_per_token: dict[str, Any]
    ingest: PathRate
    score: PathRate
    early_exit: EarlyExit


def peak_matmul_flops(sizes: Sequence[int], repeats: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """FLOP/s of one square [n, n] @ [n, n] matmul per size: the fastest of `repeats`, after one
    untimed matmul of every size (the first calls start thread pools and fault pages in)."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    pairs = {n: [torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2)]
             for n in sizes}
    for a, b in pairs.values():
        timed(partial(torch.mm, a, b), device)
    return {n: 2 * n**3 / min(timed(partial(torch.mm, a, b), device)[0] for _ in range(repeats))
            for n, (a, b) in pairs.items()}


@dataclass
class ModelShape:
    """What the FLOP count needs of a LongMem model (every decoder layer the size of the memory layer)."""

    layer_weights: int  # weights of one decoder layer's linear maps: 2 FLOPs each per token
    qkv_weights: int  # of its attention's projections before the output projection: ingest's share of layer m
    num_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int  # L
    memory_layer: int  # m: ingest runs layers 0..m-1 and the q/k/v projections of layer m
    vocab_size: int
    sidenet_blocks: int  # SideNet blocks that run when reading memory (identity blocks are skipped)

    @classmethod
    def of(cls, model: LongMem) -> "ModelShape":
        bb, side = model.backbone, model.sidenet
        running = sum(1 for i, b in enumerate(side.blocks) if i == side.memory_block or not b.is_identity())
        layer = bb.layers[bb.memory_layer]
        attention = layers.attention_of(layer)
        outputs = set(side.blocks[side.memory_block].outputs)  # the same layer's output projections
        inside = {id(m) for m in attention.modules()}
        linear = [(name, m) for name, m in layer.named_modules() if layers.is_linear(m)]
        return cls(sum(m.weight.numel() for _, m in linear),
                   sum(m.weight.numel() for name, m in linear if id(m) in inside and name not in outputs),
                   bb.num_heads, bb.head_dim, bb.hidden_size, bb.num_layers, bb.memory_layer, bb.vocab_size, running)


def layer_flops(shape: ModelShape, context: float) -> dict[str, float]:
    """Per token, one decoder layer attending to `context` keys."""
    return {"projections": 2 * shape.layer_weights,
            "attention": 4 * shape.num_heads * shape.head_dim * context}  # q·k and p·v, every query head


def flops_per_token(shape: ModelShape, window: int, topk_tokens: int, search_chunks: float) -> dict[str, Any]:
    """Forward FLOPs per token of ingest (encode_memory), of a full backbone pass, and of score.

    Attention runs at the average causal context of a window, W/2. Score = the full backbone, its LM
    head (the baseline log-probabilities), the SideNet blocks that run, the SideNet's LM head, joint
    attention over the topk_tokens retrieved keys, and the exact search over `search_chunks` chunk
    keys per query head.
    """
    layer = layer_flops(shape, window / 2)
    per_layer = sum(layer.values())
    lm_head = 2 * shape.hidden_size * shape.vocab_size
    score = {
        "backbone": shape.num_layers * per_layer,
        "backbone_lm_head": lm_head,
        "sidenet": shape.sidenet_blocks * per_layer,
        "sidenet_lm_head": lm_head,
        "memory_attention": 4 * shape.num_heads * shape.head_dim * topk_tokens,
        "memory_search": 2 * shape.num_heads * shape.head_dim * search_chunks,
    }
    return {
        "ingest": shape.memory_layer * per_layer + 2 * shape.qkv_weights,
        "full_encode": shape.num_layers * per_layer,
        "score": sum(score.values()),
        "score_parts": score,
        "layer": layer,
    }


def mean_scratch_chunks(num_tokens: int, window: int, sink_tokens: int, chunk_size: int) -> float:
    """Chunks a score call's scratch memory holds, on average over its segments: segment s searches
    the s segments before it, each stored without its sink tokens."""
    n_segments = math.ceil(num_tokens / window)
    return statistics.fmean(s * (window - sink_tokens) // chunk_size for s in range(n_segments))


def run(config: LongMemConfig, tokens: int, *, model: LongMem | None = None,
             matmul_sizes: Sequence[int] | None = None, matmul_repeats: int = MATMUL_REPEATS,
             early_exit_repeats: int = EARLY_EXIT_REPEATS) -> Result:
    """Measured ingest and score tokens/s of the in-process core against the bounds peak FLOP/s gives.

    The first `tokens` tokens of the essays are appended to a fresh memory (LongMem.append, which runs
    Backbone.encode_memory), the next `tokens` are scored against it (LongMem.score, append=False),
    after an untimed append + score of one further window. The same `tokens` then go through
    encode_memory and through the full Backbone.encode, `early_exit_repeats` times each (the fastest
    counts), for the early exit's speedup.
    `model`: a LongMem already loaded (its own config then applies); None loads one for `config`.
    """
    model = model or LongMem(config)
    config = model.config
    backbone = model.backbone
    device = backbone.device
    c, w = config.memory.chunk_size, config.read.segment_tokens
    window = min(w, tokens)
    rates = peak_matmul_flops(matmul_sizes or config.bench.roofline_matmul_sizes, matmul_repeats, device,
                              backbone.model.dtype)
    peak = max(rates.values())
    ids = text_ids(model.tokenizer, 2 * tokens + w)
    append_ids, score_ids, warm_ids = ids[:tokens], ids[tokens:2 * tokens], ids[2 * tokens:]

    warm = model.create_memory(capacity_tokens=round_up(w, c))
    model.append(warm, token_ids=warm_ids)
    model.score(token_ids=warm_ids, memory_id=warm, append=False)
    model.delete_memory(warm)

    memory = model.create_memory(capacity_tokens=round_up(tokens, c))
    try:
        ingest_s, _ = timed(lambda: model.append(memory, token_ids=append_ids), device)
        held = model.memory_stats(memory).tokens_held
        score_s, _ = timed(lambda: model.score(token_ids=score_ids, memory_id=memory, append=False), device)
    finally:
        model.delete_memory(memory)

    batch = config.read.batch_segments
    encoder_batches = [pad_segments(g, device) for g in batches(segments(append_ids[:tokens], w), batch)]  # [B, W]
    early, full = [], []
    for _ in range(early_exit_repeats):  # interleaved, so a busy spell of the machine hits both
        early.append(timed(lambda: [backbone.encode_memory(x) for x in encoder_batches], device)[0])
        full.append(timed(lambda: [backbone.encode(x) for x in encoder_batches], device)[0])
    early_s, full_s = min(early), min(full)

    search_chunks = held / c + mean_scratch_chunks(tokens, w, config.memory.sink_tokens, c)
    shape = ModelShape.of(model)
    flops = flops_per_token(shape, window, config.memory.topk_tokens, search_chunks)

    def path(seconds: float, flops_token: float) -> dict[str, float]:
        bound, measured = peak / flops_token, tokens / seconds
        return {"seconds": seconds, "bound_tokens_per_s": bound, "tokens_per_s": measured,
                "fraction": measured / bound}

    return {
        "device": str(device), "dtype": str(backbone.model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
        "peak_flops": peak, "matmul_flops": {str(n): r for n, r in rates.items()},
        "tokens": tokens, "window": window, "memory_tokens_held": held, "search_chunks": search_chunks,
        "sidenet_blocks_run": shape.sidenet_blocks, "sidenet_blocks": len(model.sidenet.blocks),
        "flops_per_token": flops,
        "ingest": path(ingest_s, flops["ingest"]),
        "score": path(score_s, flops["score"]),
        "early_exit": {"encode_memory_s": early_s, "encode_s": full_s, "speedup": full_s / early_s,
                       "flop_ratio": flops["full_encode"] / flops["ingest"]},
    }


def table(r: Result) -> str:
    f = r["flops_per_token"]
    rows = [[name, si(f[name], "FLOP"), f"{r[name]['bound_tokens_per_s']:,.0f}", f"{r[name]['tokens_per_s']:,.0f}",
             f"{r[name]['fraction']:.1%}"] for name in ("ingest", "score")]
    e = r["early_exit"]
    title = (f"## Roofline: peak {si(r['peak_flops'], 'FLOP/s')} ({r['dtype']} matmul, {r['device']}, "
             f"{r['torch_threads']} torch threads); {r['tokens']:,} tokens, window {r['window']}, "
             f"{r['memory_tokens_held']:,} tokens in memory, {r['sidenet_blocks_run']} of {r['sidenet_blocks']} "
             "SideNet blocks run")
    early = (f"ingest early exit (encode_memory vs full encode, same tokens): {e['encode_memory_s']:.2f} s vs "
             f"{e['encode_s']:.2f} s = {e['speedup']:.2f}x (FLOP ratio {e['flop_ratio']:.2f}x)")
    return "\n".join([
        title,
        "", markdown_table(["path", "FLOPs/token", "bound tok/s", "measured tok/s", "of bound"], rows), "",
        "score FLOPs/token: " + ", ".join(f"{k} {si(v)}" for k, v in f["score_parts"].items()),
        early,
    ])


def plot(axes, r: Result) -> None:
    ax = axes[0]
    names = ["ingest", "score"]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [r[n]["bound_tokens_per_s"] for n in names], 0.4, label="bound (peak FLOP/s)")
    ax.bar(x + 0.2, [r[n]["tokens_per_s"] for n in names], 0.4, label="measured")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s")
    ax.set_title("roofline", fontsize=10)
    ax.legend(fontsize=7)
