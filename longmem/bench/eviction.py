"""Eviction: the ring buffer's in-place overwrite (`ChunkStore`) against the official LongMem code's
eviction (`remove_ids` of the oldest ids from an IndexFlatIP, arrays shifted) once full."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import TypedDict

import faiss
import numpy as np

from ..memory import Chunks, ChunkStore
from ..report import markdown_table
from .common import SEED, timed, tokens_label

EVICTION_BATCH_CHUNKS = 256  # chunks evicted and added per step: one 1,024-token segment
EVICTION_REPEATS = 5  # timed steps per size after one warm-up step; the median counts
# SmolLM2-135M's memory layer: 3 kv heads of 64 dims; chunks of 4 tokens (config defaults)
STORE_CHUNK_SIZE, STORE_KV_HEADS, STORE_HEAD_DIM = 4, 3, 64
PANELS = 1  # subplots of this part in bench.png


class Row(TypedDict):
    tokens: int
    chunks: int
    ring_s: float  # one batch evicted and added by the ring buffer
    official_s: float  # the same by remove_ids + shifting the arrays
    official_index_s: float
    official_array_s: float
    ratio: float  # official_s / ring_s
    ring_evicts_exactly: bool
    official_holds: int


class Result(TypedDict):
    batch_chunks: int
    repeats: int
    shape: dict[str, int]
    rows: list[Row]


@dataclass
class StoreShape:
    """The memory layer's key/value geometry (default: SmolLM2-135M)."""

    chunk_size: int = STORE_CHUNK_SIZE
    kv_heads: int = STORE_KV_HEADS
    head_dim: int = STORE_HEAD_DIM


def random_chunks(count: int, shape: StoreShape, rng: np.random.Generator) -> Chunks:
    dims = (count, shape.kv_heads, shape.chunk_size, shape.head_dim)
    return Chunks(keys=rng.standard_normal(dims, dtype=np.float32),  # [n, Hkv, c, d]
                  values=rng.standard_normal(dims, dtype=np.float32),
                  token_ids=np.zeros((count, shape.chunk_size), np.int32),
                  positions=np.zeros((count, shape.chunk_size), np.int64),
                  seqs=np.arange(count, dtype=np.int64))


def _renumbered(chunks: Chunks, first_seq: int, count: int) -> Chunks:
    part = chunks.select(slice(0, count))
    part.seqs = first_seq + np.arange(count, dtype=np.int64)
    return part


class OfficialMemory:
    """The official LongMem code's memory (fairseq/modules/dynamic_memory_with_chunk.py): per kv head an
    IndexFlatIP of chunk mean keys and arrays of token keys/values; eviction `remove_ids` the oldest
    ids from every index and shifts the arrays (there: torch.cat; here: np.concatenate). The official
    code evicts two segments' worth when full; here exactly as many chunks as are added, to compare
    per chunk."""

    def __init__(self, chunks: Chunks, copies: int, count: int):
        """Holds `count` chunks: `chunks` repeated `copies` times, cut to `count`."""
        self.indexes, self.keys, self.values = [], [], []
        means = chunks.keys.mean(axis=2)  # [n, Hkv, d]
        for h in range(chunks.keys.shape[1]):
            index = faiss.IndexFlatIP(chunks.keys.shape[3])
            index.add(np.ascontiguousarray(np.tile(means[:, h], (copies, 1))[:count]))
            self.indexes.append(index)
            self.keys.append(np.tile(chunks.keys[:, h], (copies, 1, 1))[:count])  # [N, c, d]
            self.values.append(np.tile(chunks.values[:, h], (copies, 1, 1))[:count])

    def evict_and_add(self, chunks: Chunks) -> tuple[float, float]:
        """Drops the len(chunks) oldest chunks and appends these; (index seconds, array seconds)."""
        n = len(chunks)
        start = time.perf_counter()
        means = chunks.keys.mean(axis=2)  # [n, Hkv, d], as ChunkStore.add computes them too
        index_s, array_s = time.perf_counter() - start, 0.0
        for h, index in enumerate(self.indexes):
            start = time.perf_counter()
            index.remove_ids(np.arange(n, dtype=np.int64))
            index.add(np.ascontiguousarray(means[:, h]))
            middle = time.perf_counter()
            self.keys[h] = np.concatenate([self.keys[h][n:], chunks.keys[:, h]])
            self.values[h] = np.concatenate([self.values[h][n:], chunks.values[:, h]])
            index_s += middle - start
            array_s += time.perf_counter() - middle
        return index_s, array_s


def run(sizes: Sequence[int], *, shape: StoreShape | None = None,
             batch_chunks: int = EVICTION_BATCH_CHUNKS, repeats: int = EVICTION_REPEATS,
             seed: int = SEED) -> Result:
    """Time to evict the oldest `batch_chunks` chunks and add as many new ones, once memory is full.

    For each size (tokens; size / chunk_size chunks) both memories are filled with random chunks,
    then `repeats` steps are timed after one warm-up step. The ring buffer (`ChunkStore.add` when
    full) overwrites slots in place: flat in N. `remove_ids` passes over the whole index and
    compacts it, and the official code shifts its arrays: both linear in N. `shape`: None is
    SmolLM2-135M's (StoreShape()).
    """
    shape = shape or StoreShape()
    rng = np.random.default_rng(seed)
    piece = random_chunks(batch_chunks, shape, rng)
    fresh = random_chunks(batch_chunks, shape, rng)  # what each timed step adds
    rows = []
    for size in sizes:
        chunks = size // shape.chunk_size
        if chunks < batch_chunks:
            raise ValueError(f"a memory of {size} tokens holds fewer than {batch_chunks} chunks")
        ring = ChunkStore(chunks, shape.chunk_size, shape.kv_heads, shape.head_dim)
        for start in range(0, chunks, batch_chunks):
            ring.add(_renumbered(piece, start, min(batch_chunks, chunks - start)))
        official = OfficialMemory(piece, math.ceil(chunks / batch_chunks), chunks)
        ring_times, index_times, array_times = [], [], []
        for step in range(repeats + 1):
            step_chunks = _renumbered(fresh, chunks + step * batch_chunks, batch_chunks)
            ring_s, _ = timed(partial(ring.add, step_chunks))
            index_s, array_s = official.evict_and_add(step_chunks)
            if step:  # step 0 warms up
                ring_times.append(ring_s)
                index_times.append(index_s)
                array_times.append(array_s)
        evicted = (repeats + 1) * batch_chunks
        ring_s, index_s = statistics.median(ring_times), statistics.median(index_times)
        official_s = index_s + statistics.median(array_times)
        rows.append({
            "tokens": size, "chunks": chunks,
            "ring_s": ring_s, "official_s": official_s, "official_index_s": index_s,
            "official_array_s": official_s - index_s, "ratio": official_s / ring_s,
            # exactly the oldest chunks went: `evicted` of them, the oldest live one is seq `evicted`
            "ring_evicts_exactly": bool(ring.evicted == evicted and ring.live == chunks
                                        and ring.seqs[ring.oldest_slot()] == evicted),
            "official_holds": int(official.indexes[0].ntotal),
        })
        del ring, official
        gc.collect()
    return {"batch_chunks": batch_chunks, "repeats": repeats, "shape": asdict(shape), "rows": rows}


def table(r: Result) -> str:
    rows = [[tokens_label(x["tokens"]), f"{x['chunks']:,}", f"{1e3 * x['ring_s']:.3f}", f"{1e3 * x['official_s']:.2f}",
             f"{1e3 * x['official_index_s']:.2f}", f"{x['ratio']:,.0f}x", "yes" if x["ring_evicts_exactly"] else "NO"]
            for x in r["rows"]]
    return "\n".join([
        f"## Eviction: evict + add {r['batch_chunks']} chunks once full (median of {r['repeats']})", "",
        markdown_table(["memory tokens", "chunks", "ring buffer ms", "remove_ids + shift ms", "of which remove_ids + add ms",
                "ratio", "ring exact"], rows)])


def plot(axes, r: Result) -> None:
    ax = axes[0]
    tokens = [x["tokens"] for x in r["rows"]]
    ax.loglog(tokens, [1e3 * x["ring_s"] for x in r["rows"]], "o-", label="ring buffer (in place)")
    ax.loglog(tokens, [1e3 * x["official_s"] for x in r["rows"]], "s-", label="remove_ids + shift (official)")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel(f"ms per {r['batch_chunks']}-chunk eviction")
    ax.set_title("eviction", fontsize=10)
    ax.legend(fontsize=7)
