"""Ray-free benchmarks of LongMem: each part measures one question and returns plain, JSON-ready data.

- `roofline`: peak matmul FLOP/s of this machine, the FLOPs per token ingest and score need (counted
  from the model's dimensions), the tokens/s bounds they give, and the tokens/s the in-process core
  really reaches; also encode_memory's early exit against a full backbone pass;
- `eviction`: the ring buffer's in-place overwrite (`ChunkStore`) against the official LongMem
  code's eviction (`remove_ids` of the oldest ids from an IndexFlatIP, arrays shifted) once full;
- `memory_cost`: bytes per cached token, build time, search latency and recall@K of storage options
  (fp32, fp16, int8 scalar quantizer, product quantizers, IVF-Flat, HNSW-Flat) on real keys and
  real SideNet queries;
- `long_context`: LongMem (window W + memory) against the backbone reading the whole text with full
  attention: time and peak memory per token, each measurement in a fresh process.

`format_table` renders whatever parts a results dict holds as text; `plot` draws them in one PNG.
Results are keyed by part name: {"roofline": roofline(...), "eviction": eviction(...), ...}.

FLOPs are forward FLOPs, 2 per multiply-add. Shapes use N chunks, c chunk size, Hq query heads,
Hkv kv heads, d head dim, T tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from . import layers
from .config import LongMemConfig
from .data import essays_document
from .memory import EXACT, ApproxSearch, Chunks, ChunkStore, Retrieved, round_up
from .model import LongMem
from .roles import batches, pad_segments, segments
from .report import markdown_table

# ---- fixed parameters (the sizes of each part are config.bench's) --------------------------------
MATMUL_REPEATS = 5  # timed runs per size; the fastest counts (the machine may be shared)
EARLY_EXIT_REPEATS = 2  # timed encode_memory / encode passes over the same tokens; the fastest counts
EVICTION_BATCH_CHUNKS = 256  # chunks evicted and added per step: one 1,024-token segment
EVICTION_REPEATS = 5  # timed steps per size after one warm-up step; the median counts
SEARCH_REPEATS = 3  # timed searches per storage option; the median counts
CONTEXT_WARMUP_TOKENS = 16  # an untimed read this long before each long-context measurement
PLOT_COLUMNS = 3  # subplots per row of the PNG
CHARS_PER_TOKEN_GUESS = 5  # how much essay text to tokenize first when n tokens are needed
SEED = 0
KIB = 1024  # Linux reports VmHWM and ru_maxrss in KiB
# SmolLM2-135M's memory layer: 3 kv heads of 64 dims; chunks of 4 tokens (config defaults)
STORE_CHUNK_SIZE, STORE_KV_HEADS, STORE_HEAD_DIM = 4, 3, 64
# Index parameters of memory_cost
PQ_SUBQUANTIZERS = (8, 16)
PQ_BITS = 8
IVF_LISTS_PER_SQRT_CHUNKS = 4  # nlist = 4·√N, a common rule of thumb ...
IVF_MIN_POINTS_PER_LIST = 39  # ... capped so that k-means has the 39 points per centroid faiss asks for
IVF_PROBE = 8
HNSW_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 64


# ---- helpers -----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """(seconds, result) of one call; with a device, waiting for it to finish."""
    if device is not None:
        _sync(device)
    start = time.perf_counter()
    out = call()
    if device is not None:
        _sync(device)
    return time.perf_counter() - start, out


def _median_time(call: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_timed(call)[0] for _ in range(repeats))


def text_ids(tokenizer, num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of Paul Graham's essays (longmem.data.essays_document)."""
    text = essays_document()
    chars = num_tokens * CHARS_PER_TOKEN_GUESS
    while True:
        # Cut before a space, so no word is split and the tokens are a prefix of the whole text's.
        cut = len(text) if chars >= len(text) else text.rfind(" ", 0, chars)
        ids = tokenizer.encode(text[:cut], add_special_tokens=False)
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
        if cut == len(text):
            raise ValueError(f"the essays have {len(ids):,} tokens, {num_tokens:,} needed")
        chars *= 2


# ---- 1. roofline -------------------------------------------------------------------------------

def peak_matmul_flops(sizes: Sequence[int], repeats: int, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """FLOP/s of one square [n, n] @ [n, n] matmul per size: the fastest of `repeats`, after one
    untimed matmul of every size (the first calls start thread pools and fault pages in)."""
    generator = torch.Generator(device=device).manual_seed(SEED)
    pairs = {n: [torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2)]
             for n in sizes}
    for a, b in pairs.values():
        _timed(partial(torch.mm, a, b), device)
    return {n: 2 * n**3 / min(_timed(partial(torch.mm, a, b), device)[0] for _ in range(repeats))
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


def roofline(config: LongMemConfig, tokens: int, *, model: LongMem | None = None,
             matmul_sizes: Sequence[int] | None = None, matmul_repeats: int = MATMUL_REPEATS,
             early_exit_repeats: int = EARLY_EXIT_REPEATS) -> dict[str, Any]:
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
        ingest_s, _ = _timed(lambda: model.append(memory, token_ids=append_ids), device)
        held = model.memory_stats(memory).tokens_held
        score_s, _ = _timed(lambda: model.score(token_ids=score_ids, memory_id=memory, append=False), device)
    finally:
        model.delete_memory(memory)

    batch = config.read.batch_segments
    encoder_batches = [pad_segments(g, device) for g in batches(segments(append_ids[:tokens], w), batch)]  # [B, W]
    early, full = [], []
    for _ in range(early_exit_repeats):  # interleaved, so a busy spell of the machine hits both
        early.append(_timed(lambda: [backbone.encode_memory(x) for x in encoder_batches], device)[0])
        full.append(_timed(lambda: [backbone.encode(x) for x in encoder_batches], device)[0])
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


# ---- 2. eviction -------------------------------------------------------------------------------

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


def eviction(sizes: Sequence[int], *, shape: StoreShape | None = None,
             batch_chunks: int = EVICTION_BATCH_CHUNKS, repeats: int = EVICTION_REPEATS,
             seed: int = SEED) -> dict[str, Any]:
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
            ring_s, _ = _timed(partial(ring.add, step_chunks))
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


# ---- 3. memory cost ----------------------------------------------------------------------------

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


def memory_queries(model: LongMem, ids: list[int]) -> np.ndarray:
    """The pre-rotary queries the SideNet's memory block sends to memory for `ids`, [T, Hq, d],
    read segment by segment with an empty memory."""
    captured = []

    def record(queries: torch.Tensor) -> Retrieved:  # [B, T, Hq, d]
        captured.append(queries[0].float().cpu().numpy())
        b, t, h, d = queries.shape
        empty = queries.new_zeros(b, h, t, 1, d)  # one masked slot: the block reads locally only
        return Retrieved(empty, empty, torch.zeros(b, h, t, 1, dtype=torch.bool, device=queries.device))

    w = model.config.read.segment_tokens
    with torch.no_grad():
        for seg in segments(ids, w):
            encoded = model.encoder.encode([seg])
            model.reader.read_state(encoded, record)
    return np.concatenate(captured)


def bench_text_ids(tokenizer, num_tokens: int) -> list[int]:
    """`num_tokens` tokens of real text: the essays, then as many Python documentation sources (in name
    order) as it takes."""
    from .data import named_corpus

    ids = tokenizer.encode(essays_document(), add_special_tokens=False)[:num_tokens]
    for doc in named_corpus("python-docs"):
        if len(ids) >= num_tokens:
            break
        ids += tokenizer.encode("\n\n" + doc.text, add_special_tokens=False)
    if len(ids) < num_tokens:
        raise ValueError(f"the essays and the Python docs have {len(ids):,} tokens, {num_tokens:,} needed")
    return ids[:num_tokens]


def real_memory(model: LongMem, num_tokens: int, query_tokens: int, cache_dir: str | Path) -> dict[str, np.ndarray]:
    """The token keys/values of `num_tokens` tokens of real text (bench_text_ids) as the ingest path
    stores them ([N, Hkv, c, d] float16, sinks dropped: held_chunks), and the memory block's queries for
    the next `query_tokens` tokens ([T, Hq, d] float32). Encoding a million tokens takes ~30 min on 2 cores, so
    the result is kept in `cache_dir` under the backbone, memory layer, checkpoint weights and sizes."""
    import hashlib
    import json

    from .checkpoint import resolve_checkpoint
    from .evaluate import checkpoint_digest

    c = model.config
    checkpoint = resolve_checkpoint(c)
    weights = checkpoint_digest(checkpoint) if checkpoint else None
    digest = hashlib.sha256(json.dumps([c.backbone.name_or_path, model.backbone.memory_layer, weights,
                                        c.memory.chunk_size, c.memory.sink_tokens, c.read.segment_tokens,
                                        num_tokens, query_tokens]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"real-memory-{digest}.npz"
    if path.exists():
        with np.load(path) as saved:
            return dict(saved)
    ids = bench_text_ids(model.tokenizer, num_tokens + query_tokens)
    memory = model.create_memory(capacity_tokens=round_up(num_tokens, c.memory.chunk_size))
    try:
        model.append(memory, token_ids=ids[:num_tokens])
        store = model.bank.get(memory).store
        arrays = {"keys": store.keys[:store.filled].astype(np.float16),
                  "values": store.values[:store.filled].astype(np.float16)}
    finally:
        model.delete_memory(memory)
    arrays["queries"] = memory_queries(model, ids[num_tokens:])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)
    return arrays


def _search_ids(indexes: list[faiss.Index], queries: list[np.ndarray], k: int) -> list[np.ndarray]:
    return [index.search(q, k)[1] for index, q in zip(indexes, queries)]  # per kv head [Q, k]


def recall_at_k(found: list[np.ndarray], exact: list[np.ndarray]) -> float:
    """Share of the exact top-k ids (per query, every kv head) that `found` also holds."""
    hits = sum(int((f[:, :, None] == e[:, None, :]).any(-1).sum()) for f, e in zip(found, exact))
    return hits / sum(e.size for e in exact)


def _relative_error(stored: list[StoredVectors], originals: list[np.ndarray]) -> float:
    err = sum(float(np.square(s.decode() - x).sum()) for s, x in zip(stored, originals))
    return math.sqrt(err / sum(float(np.square(x).sum()) for x in originals))


def memory_cost(config: LongMemConfig, tokens: int, query_tokens: int | None = None, *,
                model: LongMem | None = None, options: IndexOptions | None = None) -> dict[str, Any]:
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
        build_s, (indexes, keys, values) = _timed(partial(_build, option, head_keys, originals_k, originals_v))
        found = _search_ids(indexes, per_head, k)
        search_s = _median_time(partial(_search_ids, indexes, per_head, k), options.search_repeats)
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


# ---- retrieval: approximate search of large memories -------------------------------------------

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


def retrieval(config: LongMemConfig, sizes: Sequence[int], repeats: int, *,
              model: LongMem | None = None, cache_dir: str | Path | None = None) -> dict[str, Any]:
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
        search_s = _median_time(partial(store.search, queries, k), repeats)
        exact, exact_s, ivf_recall = found, search_s, None  # ivf_recall: the IVF lists alone, no hot sets
        if store.ivf is not None or store.device_keys is not None:  # compared with faiss's exact index
            exact_store, _ = _store_of(arrays, chunks, EXACT, config.memory.dtype)
            exact = exact_store.search(queries, k).seqs
            exact_s = _median_time(partial(exact_store.search, queries, k), repeats)
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


# ---- 4. long context ---------------------------------------------------------------------------

def _memory_mark(device: torch.device) -> int:
    """Resets the peak-memory counter; returns the memory in use now, in bytes (CPU: resident set)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS to the RSS now
    return _memory_peak(device)


def _memory_peak(device: torch.device) -> int:
    """Peak memory since the last _memory_mark, in bytes. CPU: VmHWM of /proc/self/status, the high-water
    mark clear_refs resets. Not ru_maxrss: a spawned process inherits its parent's peak through exec
    there, which clear_refs does not reset, so a child of a big process would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB  # "VmHWM:   123456 kB"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def _read_context(config: dict, method: str, ids: list[int], threads: int) -> dict[str, Any]:
    """Runs in a fresh process: loads the model, reads `ids` with `method` ("longmem" or
    "full_attention") after a short warm-up, and reports time and peak memory above the loaded model."""
    torch.set_num_threads(threads)
    model = LongMem(LongMemConfig.from_dict(config))
    device = model.backbone.device
    read = (lambda x: model.score(token_ids=x)) if method == "longmem" else \
        (lambda x: model.backbone.window_logprobs(x, len(x)))
    read(ids[:CONTEXT_WARMUP_TOKENS])
    baseline = _memory_mark(device)
    seconds, _ = _timed(lambda: read(ids), device)
    peak = _memory_peak(device)
    return {"device": str(device), "seconds": seconds, "baseline_bytes": baseline, "peak_bytes": peak,
            "s_per_token": seconds / len(ids), "bytes_per_token": (peak - baseline) / len(ids)}


def _in_fresh_process(fn: Callable, *args) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def long_context(config: LongMemConfig, lengths: Sequence[int]) -> dict[str, Any]:
    """Time and peak memory per token of reading the first n tokens of the essays, for each n:
    LongMem (score with no memory id: W-token windows, earlier windows in a scratch memory) and the
    backbone with full attention over all n tokens (one forward pass; only up to its position
    limit). Both compute the log-probability of every token. Every measurement runs in a fresh
    spawned process with this process's torch thread count; memory is the peak above what the
    loaded model holds: CPU resident set (VmHWM, its high-water mark reset after loading), or
    torch.cuda.max_memory_allocated."""
    from transformers import AutoTokenizer

    from .backbone import model_dims, resolve_backbone_path

    max_positions = model_dims(config.backbone).max_positions
    ids = text_ids(AutoTokenizer.from_pretrained(resolve_backbone_path(config.backbone)), max(lengths))
    threads = torch.get_num_threads()
    rows = []
    for n in lengths:
        row = {"tokens": n}
        for method in ("longmem", "full_attention"):
            fits = method == "longmem" or n <= max_positions
            row[method] = _in_fresh_process(_read_context, config.to_dict(), method, ids[:n], threads) if fits else None
        rows.append(row)
    cuda = rows[0]["longmem"]["device"].startswith("cuda")
    return {"window": config.read.segment_tokens, "max_positions": max_positions, "torch_threads": threads,
            "memory": "CUDA max_memory_allocated" if cuda else "peak RSS above the loaded model", "rows": rows}


# ---- 5. rendering ------------------------------------------------------------------------------

def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _tokens(n: int) -> str:
    for scale, suffix in ((1024**2, "M"), (1024, "k")):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return f"{n:,}"


def _format_roofline(r: dict) -> str:
    f = r["flops_per_token"]
    rows = [[name, _si(f[name], "FLOP"), f"{r[name]['bound_tokens_per_s']:,.0f}", f"{r[name]['tokens_per_s']:,.0f}",
             f"{r[name]['fraction']:.1%}"] for name in ("ingest", "score")]
    e = r["early_exit"]
    title = (f"## Roofline: peak {_si(r['peak_flops'], 'FLOP/s')} ({r['dtype']} matmul, {r['device']}, "
             f"{r['torch_threads']} torch threads); {r['tokens']:,} tokens, window {r['window']}, "
             f"{r['memory_tokens_held']:,} tokens in memory, {r['sidenet_blocks_run']} of {r['sidenet_blocks']} "
             "SideNet blocks run")
    early = (f"ingest early exit (encode_memory vs full encode, same tokens): {e['encode_memory_s']:.2f} s vs "
             f"{e['encode_s']:.2f} s = {e['speedup']:.2f}x (FLOP ratio {e['flop_ratio']:.2f}x)")
    return "\n".join([
        title,
        "", markdown_table(["path", "FLOPs/token", "bound tok/s", "measured tok/s", "of bound"], rows), "",
        "score FLOPs/token: " + ", ".join(f"{k} {_si(v)}" for k, v in f["score_parts"].items()),
        early,
    ])


def _format_eviction(r: dict) -> str:
    rows = [[_tokens(x["tokens"]), f"{x['chunks']:,}", f"{1e3 * x['ring_s']:.3f}", f"{1e3 * x['official_s']:.2f}",
             f"{1e3 * x['official_index_s']:.2f}", f"{x['ratio']:,.0f}x", "yes" if x["ring_evicts_exactly"] else "NO"]
            for x in r["rows"]]
    return "\n".join([
        f"## Eviction: evict + add {r['batch_chunks']} chunks once full (median of {r['repeats']})", "",
        markdown_table(["memory tokens", "chunks", "ring buffer ms", "remove_ids + shift ms", "of which remove_ids + add ms",
                "ratio", "ring exact"], rows)])


def _format_memory_cost(r: dict) -> str:
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


def _format_retrieval(r: dict) -> str:
    rows = [[_tokens(x["tokens"]), f"{x['chunks']:,}", x["method"], f"{x['ivf_lists']:,}", f"{x['fill_s']:.1f}",
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


def _format_long_context(r: dict) -> str:
    def cells(m: dict | None) -> list[str]:
        if m is None:
            return ["-"] * 3
        return [f"{1e3 * m['s_per_token']:.2f}", f"{m['bytes_per_token'] / KIB:,.1f}",
                f"{(m['peak_bytes'] - m['baseline_bytes']) / KIB**2:,.0f}"]

    rows = [[_tokens(x["tokens"]), *cells(x["longmem"]), *cells(x["full_attention"])] for x in r["rows"]]
    title = (f"## Long context: LongMem (window {r['window']} + memory) vs full attention (limit "
             f"{r['max_positions']:,} positions); memory = {r['memory']}")
    return "\n".join([
        title, "",
        markdown_table(["tokens", "LongMem ms/token", "KiB/token", "MiB", "full attention ms/token", "KiB/token", "MiB"],
               rows)])


FORMATTERS = {"roofline": _format_roofline, "eviction": _format_eviction, "memory_cost": _format_memory_cost,
              "long_context": _format_long_context, "retrieval": _format_retrieval}


def format_table(results: dict[str, dict], formatters: dict[str, Callable[[dict], str]] | None = None) -> str:
    """The parts present in `results` (keyed by part name), each as a titled text table.
    `formatters`: part -> function rendering it; None is FORMATTERS (services/bench.py adds its own)."""
    formatters = FORMATTERS if formatters is None else formatters
    return "\n\n".join(formatters[part](r) for part, r in results.items()) + "\n"


def _plot_roofline(axes, r: dict) -> None:
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


def _plot_eviction(axes, r: dict) -> None:
    ax = axes[0]
    tokens = [x["tokens"] for x in r["rows"]]
    ax.loglog(tokens, [1e3 * x["ring_s"] for x in r["rows"]], "o-", label="ring buffer (in place)")
    ax.loglog(tokens, [1e3 * x["official_s"] for x in r["rows"]], "s-", label="remove_ids + shift (official)")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel(f"ms per {r['batch_chunks']}-chunk eviction")
    ax.set_title("eviction", fontsize=10)
    ax.legend(fontsize=7)


def _plot_memory_cost(axes, r: dict) -> None:
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


def latency_axes(ax, ylabel: str, title: str) -> None:
    """Log-log axes of a latency against memory tokens."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def _plot_retrieval(axes, r: dict) -> None:
    ax = axes[0]
    tokens = [x["tokens"] for x in r["rows"]]
    ax.plot(tokens, [1e3 * x["search_s"] for x in r["rows"]], marker="o", label="as configured")
    ax.plot(tokens, [1e3 * x["exact_search_s"] for x in r["rows"]], marker="o", label="exact")
    for x in r["rows"]:
        ax.annotate(f"recall {x['recall']:.3f}", (x["tokens"], 1e3 * x["search_s"]), fontsize=7,
                    xytext=(3, -10), textcoords="offset points")
    latency_axes(ax, "ms per window's search", "retrieval")


def _plot_long_context(axes, r: dict) -> None:
    for ax, key, scale, label in ((axes[0], "s_per_token", 1e3, "ms per token"),
                                  (axes[1], "bytes_per_token", 1 / KIB, "peak KiB per token")):
        for method, name in (("longmem", "LongMem"), ("full_attention", "full attention")):
            points = [(x["tokens"], scale * x[method][key]) for x in r["rows"] if x[method] is not None]
            ax.plot(*zip(*points), "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.set_title("long context", fontsize=10)
        ax.legend(fontsize=7)


# part -> (subplots it takes, function drawing it on them)
PLOTTERS = {"roofline": (1, _plot_roofline), "eviction": (1, _plot_eviction),
            "memory_cost": (1, _plot_memory_cost), "long_context": (2, _plot_long_context),
            "retrieval": (1, _plot_retrieval)}


def plot(results: dict[str, dict], path: str | Path,
         plotters: dict[str, tuple[int, Callable]] | None = None) -> Path:
    """One PNG with a subplot per part present in `results` (two for long_context).
    `plotters`: part -> (subplots it takes, function drawing it); None is PLOTTERS."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plotters = PLOTTERS if plotters is None else plotters
    count = sum(plotters[part][0] for part in results)
    cols = min(count, PLOT_COLUMNS)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = list(np.atleast_1d(fig.subplots(rows, cols)).ravel())
    for part, r in results.items():
        width, draw = plotters[part]
        draw(axes[:width], r)
        axes = axes[width:]
    for ax in axes:  # the grid's unused cells
        fig.delaxes(ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
