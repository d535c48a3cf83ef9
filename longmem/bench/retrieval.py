"""Retrieval: one segment's queries against memories of N tokens of real text, as configured (exact
below memory.ann_min_tokens, approximate above) against exact search: time and recall."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from ..config import LongMemConfig
from ..memory import EXACT, ApproxSearch, Chunks, ChunkStore
from ..model import LongMem
from ..report import markdown_table
from .common import latency_axes, median_time, real_memory, tokens_label
from .eviction import EVICTION_BATCH_CHUNKS
from .memory_cost import recall_at_k

PANELS = 1  # subplots of this part in bench.png


class Row(TypedDict):
    tokens: int
    chunks: int
    method: str  # "exact" or "approximate", as configured for this size
    search_s: float
    exact_search_s: float
    fill_s: float
    recall: float  # recall@K against exact search
    ivf_recall: float | None  # the IVF lists alone, without the query-chosen hot sets
    ivf_lists: int


class Result(TypedDict):
    query_tokens: int
    query_heads: int
    k_chunks: int
    chunk_size: int
    approx: dict[str, Any]  # ApproxSearch
    repeats: int
    text: str
    rows: list[Row]
    largest_over_smallest: float  # search time, largest memory / smallest


def held_chunks(config: LongMemConfig, tokens: int) -> int:
    """Chunks a memory holds after `tokens` tokens are appended: each segment's sinks are dropped."""
    w, sink = config.read.segment_tokens, config.memory.sink_tokens
    return (tokens - sink * math.ceil(tokens / w)) // config.memory.chunk_size


def _store_of(arrays: dict[str, np.ndarray], chunks: int, approx: ApproxSearch,
              dtype: str) -> tuple[ChunkStore, float]:
    """A store (keys/values in `dtype`) holding the first `chunks` chunks of real_memory's arrays, and the
    seconds adding them took (with approx on: the IVF training once it holds approx.min_chunks)."""
    keys, values = arrays["keys"][:chunks], arrays["values"][:chunks]
    _, hkv, c, d = keys.shape
    store = ChunkStore(chunks, c, hkv, d, dtype, approx)
    positions = np.arange(chunks * c, dtype=np.int64).reshape(chunks, c)
    batch = EVICTION_BATCH_CHUNKS  # one 1,024-token segment per add, as ingest does
    t0 = time.perf_counter()
    for a in range(0, chunks, batch):
        b = min(a + batch, chunks)
        store.add(Chunks(keys[a:b].astype(np.float32), values[a:b].astype(np.float32),
                         np.zeros((b - a, c), np.int32), positions[a:b], np.arange(a, b, dtype=np.int64)))
    return store, time.perf_counter() - t0


def run(config: LongMemConfig, sizes: Sequence[int], repeats: int, *,
              model: LongMem | None = None, cache_dir: str | Path | None = None) -> Result:
    """Retrieval of one segment's queries from memories of N tokens of real text, as configured (exact
    below memory.ann_min_tokens, ApproxSearch above) and exactly.

    Keys/values and queries: real_memory (the essays, then the Python docs; the memory block's queries
    for the window after them). Each search is one ChunkStore.search of the whole window, the call
    the reader makes per segment, hits gathered included (N: tokens appended; the memory holds them
    less each segment's sinks); its top K = topk_tokens / chunk_size chunks
    are compared with exact search (recall@K: the share of the exact top-K chunks found, over every
    query token and head). Reports, per size, the median time of `repeats` searches after an untimed
    one (a size searched exactly as configured is measured once, as both), the time to fill the store
    (IVF training included) and the recall; and time(largest) / time(smallest)."""
    model = model or LongMem(config)
    c = config.memory.chunk_size
    k = config.memory.topk_tokens // c
    cache_dir = cache_dir or Path(config.backbone.cache_dir) / "bench"
    sizes = sorted(set(sizes))
    arrays = real_memory(model, sizes[-1], config.read.segment_tokens, cache_dir)
    queries = arrays["queries"]  # [T, Hq, d]
    approx = config.memory.approx_search()
    rows = []
    recall = lambda found, exact: recall_at_k([found.reshape(-1, k)], [exact.reshape(-1, k)])  # [T, Hq, k] seqs
    for n in sizes:
        chunks = held_chunks(config, n)
        store, fill_s = _store_of(arrays, chunks, approx, config.memory.dtype)
        method = ("approximate" if store.ivf is not None else "exact" if store.device_keys is None
                  else f"exact ({store.device_keys.device.type})")
        found = store.search(queries, k).seqs  # [T, Hq, k]; also the untimed first call
        search_s = median_time(partial(store.search, queries, k), repeats)
        exact, exact_s, ivf_recall = found, search_s, None  # ivf_recall: the IVF lists alone, no hot sets
        if store.ivf is not None or store.device_keys is not None:  # compared with faiss's exact index
            exact_store, _ = _store_of(arrays, chunks, EXACT, config.memory.dtype)
            exact = exact_store.search(queries, k).seqs
            exact_s = median_time(partial(exact_store.search, queries, k), repeats)
            del exact_store
        if store.ivf is not None:
            group = queries.shape[1] // store.num_kv_heads
            ivf_seqs = np.stack([store.seqs[np.maximum(ivf.search(np.ascontiguousarray(
                queries[:, h * group:(h + 1) * group].reshape(-1, queries.shape[-1])), k)[1], 0)].reshape(
                len(queries), group, k) for h, ivf in enumerate(store.ivf)], axis=1)
            ivf_recall = recall(ivf_seqs, exact)
        rows.append({"tokens": n, "chunks": chunks, "method": method, "search_s": search_s, "exact_search_s": exact_s,
                     "fill_s": fill_s, "recall": recall(found, exact), "ivf_recall": ivf_recall,
                     "ivf_lists": store.ivf[0].nlist if store.ivf is not None else 0})
        del store
        gc.collect()
    return {"query_tokens": len(queries), "query_heads": queries.shape[1], "k_chunks": k, "chunk_size": c,
            "approx": asdict(approx), "repeats": repeats, "text": "essays, then Python docs", "rows": rows,
            "largest_over_smallest": rows[-1]["search_s"] / rows[0]["search_s"]}


def table(r: Result) -> str:
    rows = [[tokens_label(x["tokens"]), f"{x['chunks']:,}", x["method"], f"{x['ivf_lists']:,}", f"{x['fill_s']:.1f}",
             f"{1e3 * x['search_s']:,.0f}", f"{1e3 * x['exact_search_s']:,.0f}", f"{x['recall']:.3f}",
             "" if x["ivf_recall"] is None else f"{x['ivf_recall']:.3f}"]
            for x in r["rows"]]
    a = r["approx"]
    title = (f"## Retrieval: one window of {r['query_tokens']:,} query tokens x {r['query_heads']} heads, "
             f"top {r['k_chunks']} chunks, real text ({r['text']}); search device {a['device']}; beside faiss, "
             f"approximate from {a['min_chunks']:,} chunks: IVF probe {a['probe']}, {a['query_clusters']} query "
             f"directions x {a['hot_chunks']:,} hot chunks")
    return "\n".join([title, "", markdown_table(["memory", "chunks", "search", "IVF lists", "fill s", "search ms",
                                          "exact search ms", f"recall@{r['k_chunks']}",
                                          "IVF lists alone"], rows)])


def plot(axes, r: Result) -> None:
    ax = axes[0]
    tokens = [x["tokens"] for x in r["rows"]]
    ax.plot(tokens, [1e3 * x["search_s"] for x in r["rows"]], marker="o", label="as configured")
    ax.plot(tokens, [1e3 * x["exact_search_s"] for x in r["rows"]], marker="o", label="exact")
    for x in r["rows"]:
        ax.annotate(f"recall {x['recall']:.3f}", (x["tokens"], 1e3 * x["search_s"]), fontsize=7,
                    xytext=(3, -10), textcoords="offset points")
    latency_axes(ax, "ms per window's search", "retrieval")
