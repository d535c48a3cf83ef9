"""Memory cost: bytes per cached token, build time, search latency and recall@K of storage options
(fp32, fp16, int8 scalar quantizer, product quantizers, IVF-Flat, HNSW-Flat) on real keys and real
SideNet queries. Shapes use N chunks, c chunk size, Hq query heads, Hkv kv heads, d head dim."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, TypedDict

import faiss
import numpy as np

from ..config import LongMemConfig
from ..memory import round_up
from ..model import LongMem
from ..report import markdown_table
from .common import median_time, memory_queries, text_ids, timed

SEARCH_REPEATS = 3  # timed searches per storage option; the median counts
# Index parameters of memory_cost
PQ_SUBQUANTIZERS = (8, 16)
PQ_BITS = 8
IVF_LISTS_PER_SQRT_CHUNKS = 4  # nlist = 4·√N, a common rule of thumb ...
IVF_MIN_POINTS_PER_LIST = 39  # ... capped so that k-means has the 39 points per centroid faiss asks for
IVF_PROBE = 8
HNSW_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64
PANELS = 1  # subplots of this part in bench.png


class Row(TypedDict):
    """One storage option on the same keys, values and queries."""
    name: str
    kv: str
    in_place_eviction: bool
    kv_bytes_per_token: float
    index_bytes_per_token: float
    bytes_per_token: float
    build_s: float
    search_s: float
    search_us_per_query: float
    recall: float  # recall@K against exact float32 search
    key_rel_error: float
    value_rel_error: float


class Result(TypedDict):
    tokens: int
    stored_tokens: int
    chunks: int
    chunk_size: int
    kv_heads: int
    head_dim: int
    query_tokens: int
    query_heads: int
    k_chunks: int
    faiss_threads: int
    options: dict[str, Any]  # IndexOptions
    rows: list[Row]


@dataclass
class IndexOptions:
    """Parameters of the quantized and approximate storage options memory_cost compares."""

    pq_subquantizers: tuple[int, ...] = PQ_SUBQUANTIZERS  # M of each product quantizer tried
    pq_bits: int = PQ_BITS  # bits per sub-quantizer code
    ivf_lists_per_sqrt_chunks: float = IVF_LISTS_PER_SQRT_CHUNKS
    ivf_min_points_per_list: int = IVF_MIN_POINTS_PER_LIST
    ivf_probe: int = IVF_PROBE
    hnsw_neighbors: int = HNSW_NEIGHBORS
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION
    hnsw_ef_search: int = HNSW_EF_SEARCH
    search_repeats: int = SEARCH_REPEATS


@dataclass
class StorageOption:
    """How token keys/values are stored and how chunk keys are searched."""

    name: str
    kv: str  # token key/value storage, in words
    codec: Callable[[int], Any] | None  # d -> faiss ScalarQuantizer / ProductQuantizer; None: fp32 arrays
    index: Callable[[int, int], faiss.Index]  # (d, chunks) -> an inner-product index over chunk keys
    in_place_eviction: bool  # a slot's code can be overwritten in place, as the ring buffer does


def storage_options(options: IndexOptions) -> list[StorageOption]:
    ip, sq = faiss.METRIC_INNER_PRODUCT, faiss.ScalarQuantizer

    def ivf(d: int, chunks: int) -> faiss.Index:
        lists = max(1, min(round(options.ivf_lists_per_sqrt_chunks * math.sqrt(chunks)),
                           chunks // options.ivf_min_points_per_list))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, ip)
        index.nprobe = options.ivf_probe
        return index

    def hnsw(d: int, chunks: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(d, options.hnsw_neighbors, ip)
        index.hnsw.efConstruction = options.hnsw_ef_construction
        index.hnsw.efSearch = options.hnsw_ef_search
        return index

    bits = options.pq_bits
    return [
        StorageOption("fp32 flat", "fp32", None, lambda d, n: faiss.IndexFlatIP(d), True),
        StorageOption("fp16 flat", "fp16", lambda d: sq(d, sq.QT_fp16),
                      lambda d, n: faiss.IndexScalarQuantizer(d, sq.QT_fp16, ip), True),
        StorageOption("int8 SQ", "int8, per-dimension range", lambda d: sq(d, sq.QT_8bit),
                      lambda d, n: faiss.IndexScalarQuantizer(d, sq.QT_8bit, ip), True),
        *[StorageOption(f"PQ M={m}", f"PQ {m}x{bits} bits", lambda d, m=m: faiss.ProductQuantizer(d, m, bits),
                        lambda d, n, m=m: faiss.IndexPQ(d, m, bits, ip), True)
          for m in options.pq_subquantizers],
        StorageOption(f"IVF-Flat (nprobe {options.ivf_probe})", "fp32", None, ivf, False),
        StorageOption(f"HNSW-Flat (M {options.hnsw_neighbors}, ef {options.hnsw_ef_search})", "fp32", None,
                      hnsw, False),
    ]


class StoredVectors:
    """Token keys or values of one kv head, [n, d] float32, as one option stores them."""

    def __init__(self, codec: Any | None, vectors: np.ndarray):
        self.codec = codec
        if codec is not None:
            codec.train(vectors)
        # [n, d] float32, or [n, code size] uint8
        self.codes = vectors.copy() if codec is None else codec.compute_codes(vectors)

    @property
    def nbytes(self) -> int:
        """The codes plus the codec's trained parameters (ranges, codebooks)."""
        if self.codec is None:
            return self.codes.nbytes
        params = self.codec.centroids if isinstance(self.codec, faiss.ProductQuantizer) else self.codec.trained
        return self.codes.nbytes + faiss.vector_to_array(params).nbytes

    def decode(self) -> np.ndarray:
        return self.codes if self.codec is None else self.codec.decode(self.codes)


def _build(option: StorageOption, chunk_keys: list[np.ndarray], token_keys: list[np.ndarray],
           token_values: list[np.ndarray]) -> tuple[list[faiss.Index], list[StoredVectors], list[StoredVectors]]:
    """One option's stores, per kv head: its index over chunk keys [N, d] and its token keys and
    values [N·c, d]."""
    n, d = chunk_keys[0].shape
    indexes = [option.index(d, n) for _ in chunk_keys]
    for index, x in zip(indexes, chunk_keys):
        index.train(x)
        index.add(x)
    codec = option.codec or (lambda _: None)
    return (indexes, [StoredVectors(codec(d), x) for x in token_keys],
            [StoredVectors(codec(d), x) for x in token_values])


def _search_ids(indexes: list[faiss.Index], queries: list[np.ndarray], k: int) -> list[np.ndarray]:
    return [index.search(q, k)[1] for index, q in zip(indexes, queries)]  # per kv head [Q, k]


def recall_at_k(found: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """Share of the exact top-k ids (per query, every kv head) that `found` also holds."""
    hits = sum(int((f[:, :, None] == e[:, None, :]).any(-1).sum()) for f, e in zip(found, exact))
    return hits / sum(e.size for e in exact)


def _relative_error(stored: list[StoredVectors], originals: list[np.ndarray]) -> float:
    err = sum(float(np.square(s.decode() - x).sum()) for s, x in zip(stored, originals))
    return math.sqrt(err / sum(float(np.square(x).sum()) for x in originals))


def run(config: LongMemConfig, tokens: int, query_tokens: int | None = None, *,
                model: LongMem | None = None, options: IndexOptions | None = None) -> Result:
    """Bytes per cached token, build time, search latency and recall@K of each storage option.

    Keys/values: the first `tokens` tokens of the essays appended to a memory (the real ingest path,
    sinks dropped), chunk keys the mean of each chunk's token keys per kv head. Queries: the SideNet
    memory block's pre-rotary queries for the next `query_tokens` tokens (default: one window),
    query head h searching kv head h // (Hq / Hkv) as ChunkStore.search does. Recall@K is measured
    against exact fp32 inner-product search (IndexFlatIP) with K = topk_tokens / chunk_size chunks.
    Bytes per token count token keys + values + the chunk-key index (serialized), not token ids and
    positions (12 bytes per token in every option). `options`: None is IndexOptions().
    """
    options = options or IndexOptions()
    model = model or LongMem(config)
    config = model.config
    c = config.memory.chunk_size
    k = config.memory.topk_tokens // c
    query_tokens = query_tokens or config.read.segment_tokens
    ids = text_ids(model.tokenizer, tokens + query_tokens)
    memory = model.create_memory(capacity_tokens=round_up(tokens, c))
    try:
        model.append(memory, token_ids=ids[:tokens])
        store = model.bank.get(memory).store
        token_keys = store.keys[:store.filled].astype(np.float32)  # [N, Hkv, c, d]
        token_values = store.values[:store.filled].astype(np.float32)
    finally:
        model.delete_memory(memory)
    chunks, hkv, _, d = token_keys.shape
    if chunks < k:
        raise ValueError(f"{tokens} tokens make {chunks} chunks, fewer than the {k} retrieved")
    chunk_keys = token_keys.mean(axis=2)  # [N, Hkv, d]
    queries = memory_queries(model, ids[tokens:])  # [T, Hq, d]
    group = queries.shape[1] // hkv
    per_head = [np.ascontiguousarray(queries[:, h * group:(h + 1) * group].reshape(-1, d)) for h in range(hkv)]
    head_keys = [np.ascontiguousarray(chunk_keys[:, h]) for h in range(hkv)]  # Hkv x [N, d]
    head_tokens = lambda arr: [np.ascontiguousarray(arr[:, h].reshape(-1, d)) for h in range(hkv)]  # Hkv x [N·c, d]
    originals_k, originals_v = head_tokens(token_keys), head_tokens(token_values)

    exact_indexes = [faiss.IndexFlatIP(d) for _ in range(hkv)]
    for index, x in zip(exact_indexes, head_keys):
        index.add(x)
    exact = _search_ids(exact_indexes, per_head, k)

    stored_tokens = chunks * c
    rows = []
    for option in storage_options(options):
        build_s, (indexes, keys, values) = timed(partial(_build, option, head_keys, originals_k, originals_v))
        found = _search_ids(indexes, per_head, k)
        search_s = median_time(partial(_search_ids, indexes, per_head, k), options.search_repeats)
        kv_bytes = sum(s.nbytes for s in keys + values)
        index_bytes = sum(faiss.serialize_index(index).nbytes for index in indexes)
        rows.append({
            "name": option.name, "kv": option.kv, "in_place_eviction": option.in_place_eviction,
            "kv_bytes_per_token": kv_bytes / stored_tokens, "index_bytes_per_token": index_bytes / stored_tokens,
            "bytes_per_token": (kv_bytes + index_bytes) / stored_tokens,
            "build_s": build_s, "search_s": search_s,
            "search_us_per_query": 1e6 * search_s / (len(queries) * queries.shape[1]),
            "recall": recall_at_k(found, exact),
            "key_rel_error": _relative_error(keys, originals_k),
            "value_rel_error": _relative_error(values, originals_v),
        })
    return {"tokens": tokens, "stored_tokens": stored_tokens, "chunks": chunks, "chunk_size": c,
            "kv_heads": hkv, "head_dim": d, "query_tokens": len(queries), "query_heads": queries.shape[1],
            "k_chunks": k, "faiss_threads": faiss.omp_get_max_threads(), "options": asdict(options),
            "rows": rows}


def table(r: Result) -> str:
    rows = [[x["name"], x["kv"], f"{x['kv_bytes_per_token']:,.1f}", f"{x['index_bytes_per_token']:,.1f}",
             f"{x['bytes_per_token']:,.1f}", f"{x['build_s']:.2f}", f"{1e3 * x['search_s']:.1f}",
             f"{x['recall']:.3f}", f"{x['key_rel_error']:.3f}", "yes" if x["in_place_eviction"] else "no"]
            for x in r["rows"]]
    title = (f"## Memory cost: {r['stored_tokens']:,} cached tokens ({r['chunks']:,} chunks x {r['kv_heads']} "
             f"kv heads x {r['head_dim']} dims), {r['query_tokens']} query tokens x {r['query_heads']} heads, "
             f"recall@{r['k_chunks']} chunks vs exact fp32")
    return "\n".join([
        title, "",
        markdown_table(["option", "K/V stored as", "K/V B/token", "index B/token", "total B/token", "build s", "search ms",
                f"recall@{r['k_chunks']}", "key rel. error", "in-place eviction"], rows)])


def plot(axes, r: Result) -> None:
    from matplotlib.ticker import NullFormatter

    ax = axes[0]
    for x in r["rows"]:
        ax.scatter(x["bytes_per_token"], x["recall"])
        ax.annotate(x["name"].split(" (")[0], (x["bytes_per_token"], x["recall"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes per cached token")
    ax.set_ylabel(f"recall@{r['k_chunks']} chunks")
    ax.set_title("memory cost", fontsize=10)
