"""The memory bank: chunked key/value ring buffers searched with one exact faiss index per kv head.

Vocabulary (shapes use T query tokens, Hq query heads, Hkv key/value heads, d head dim, c = chunk size):
- a *memory* is the cached past of one document or session: the token keys/values the frozen
  backbone produced at the memory layer, in the order they were appended (its *stream*);
- tokens are grouped into *chunks* of c consecutive tokens; a chunk's search key is the mean of its
  token keys; every chunk gets a sequence number `seq` (0, 1, 2, ... per memory);
- a `ChunkStore` holds chunks in a ring buffer of fixed capacity and answers inner-product searches.
  When full, a new chunk overwrites the oldest one in place, in the arrays and in the faiss index
  alike: eviction is O(1) per chunk, never a `remove_ids` over the whole index;
- a `Chunker` turns a token stream into chunks. Tokens that do not fill a chunk wait as *pending*
  tokens, which are not searchable, until the next append completes the chunk;
- a `Memory` is a chunker plus one store; a `MemoryBank` holds many memories side by side.

Large stores search approximately (`ApproxSearch`, MemoryConfig.ann_*): once a store holds
`min_chunks` chunks it also keeps an inverted-file index (IVF) over the same search keys, and a search
takes, per query, the best of two candidate sets searched exactly:
- the IVF lists nearest the query (`probe` of ~`lists_per_sqrt`·√capacity lists);
- a *hot set* chosen with the search's own queries: they are grouped into `query_clusters` directions
  and, for each direction, the `hot_chunks` chunks scoring highest along it; a query searches its
  direction's hot set. The memory block's queries share a strong common direction that an index
  built from keys alone does not know, and a few chunks score high for most of them: at 1M tokens of
  real text, with the reader's real queries, IVF alone finds 48% of the exact top-16 and the hot sets
  bring it to 95% (longmem bench, part retrieval).
The IVF index is trained once, on the chunks the store holds when it crosses `min_chunks`; its
centroids are part of the store's state, so a restored store answers as before. A ring-buffer
overwrite replaces the slot in the IVF lists too (a hash-table direct map: O(1) per chunk).

The striped bank (longmem/striped.py, run over Ray by services/bank.py) reuses the chunker and stores
unchanged: it stripes chunks over several stores by `seq % num_shards`, keeps the global FIFO by
telling every store the oldest live seq, and merges their hits with `merge_hits` — which gives
exactly what a single store would.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import faiss
import numpy as np
import torch

NO_SEQ = -1  # seq of an empty hit slot (fewer chunks in memory than asked for)
NO_POSITION = -1  # stream position of an append the memory does not know
CHUNK_FIELDS = ("keys", "values", "token_ids", "positions", "seqs")


class MemoryNotFound(KeyError):
    """No memory with that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "memory not found"


class MemoryExists(KeyError):
    """A memory with that id exists already."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "memory exists"


class CapacityExceeded(RuntimeError):
    """The memory does not fit in the byte budget left."""


class ShardUnavailable(RuntimeError):
    """A memory shard is down or restarting; the call may be retried."""


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a positive multiple of `multiple` (e.g. a capacity in whole chunks holding n tokens)."""
    return max(multiple, math.ceil(n / multiple) * multiple)


@dataclass
class Chunks:
    """Complete chunks, ready to store. n chunks."""

    keys: np.ndarray  # [n, Hkv, c, d]
    values: np.ndarray  # [n, Hkv, c, d]
    token_ids: np.ndarray  # [n, c] int32
    positions: np.ndarray  # [n, c] int64, stream position of each token (sinks leave gaps)
    seqs: np.ndarray  # [n] int64

    def __len__(self) -> int:
        return len(self.seqs)

    def select(self, index: np.ndarray | slice) -> "Chunks":
        return Chunks(self.keys[index], self.values[index], self.token_ids[index],
                      self.positions[index], self.seqs[index])

    @staticmethod
    def cat(parts: list["Chunks"]) -> "Chunks":
        """Chunks of several pushes, in order, as one batch."""
        return Chunks(*(np.concatenate([getattr(p, f) for p in parts]) for f in CHUNK_FIELDS))


@dataclass
class ChunkHits:
    """The top chunks of a search, per query token and query head, best first (k each).

    The query tokens of a segment, and the query heads sharing a kv head (GQA), retrieve many of the
    same chunks: each retrieved (chunk, kv head) pair's tokens are held once, in a table of U rows,
    and each hit points at its row. A search's keys/values take [U, c, d] instead of [T, Hq, k, c, d];
    this is also what crosses the network (services/messages.py). `keys`, `values`, `positions` and
    `token_ids` give the per-hit view (expanded on first use)."""

    scores: np.ndarray  # [T, Hq, k] float32; -inf where empty
    seqs: np.ndarray  # [T, Hq, k] int64; NO_SEQ where empty
    rows: np.ndarray  # [T, Hq, k] int32: the hit's row in the table; -1 where empty
    table_positions: np.ndarray  # [U, c] int64
    table_token_ids: np.ndarray  # [U, c] int32
    table_keys: np.ndarray  # [U, c, d]
    table_values: np.ndarray  # [U, c, d]

    @staticmethod
    def empty(num_tokens: int, num_heads: int, k: int, chunk_size: int, head_dim: int,
              dtype=np.float32) -> "ChunkHits":
        shape = (num_tokens, num_heads, k)
        return ChunkHits(np.full(shape, -np.inf, np.float32), np.full(shape, NO_SEQ, np.int64),
                         np.full(shape, -1, np.int32), np.zeros((0, chunk_size), np.int64),
                         np.zeros((0, chunk_size), np.int32), np.zeros((0, chunk_size, head_dim), dtype),
                         np.zeros((0, chunk_size, head_dim), dtype))

    def _per_hit(self, table: np.ndarray, fill) -> np.ndarray:
        """table [U, ...] -> [T, Hq, k, ...], `fill` where a hit is empty."""
        out = np.full(self.rows.shape + table.shape[1:], fill, table.dtype)
        valid = self.rows >= 0
        out[valid] = table[self.rows[valid]]
        return out

    @cached_property
    def keys(self) -> np.ndarray:  # [T, Hq, k, c, d]
        return self._per_hit(self.table_keys, 0)

    @cached_property
    def values(self) -> np.ndarray:  # [T, Hq, k, c, d]
        return self._per_hit(self.table_values, 0)

    @cached_property
    def positions(self) -> np.ndarray:  # [T, Hq, k, c]
        return self._per_hit(self.table_positions, NO_SEQ)

    @cached_property
    def token_ids(self) -> np.ndarray:  # [T, Hq, k, c]
        return self._per_hit(self.table_token_ids, 0)


TABLE_FIELDS = ("table_positions", "table_token_ids", "table_keys", "table_values")


def bm25_idf(df: np.ndarray, n: int) -> np.ndarray:
    """BM25's idf of terms found in df [Q] of n chunks."""
    return np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)


@dataclass
class LexicalHits:
    """The chunks whose stored token ids best match a text's (ChunkStore.lexical), best first."""

    seqs: np.ndarray  # [m] int64
    scores: np.ndarray  # [m] float32, > 0

    @staticmethod
    def merge(parts: list["LexicalHits"], k: int) -> "LexicalHits":
        """The best k over several stores (a striped memory)."""
        seqs, scores = np.concatenate([p.seqs for p in parts]), np.concatenate([p.scores for p in parts])
        top = np.argsort(-scores, kind="stable")[:k]
        return LexicalHits(seqs[top], scores[top])


@dataclass
class StoredTokens:
    """The token ids a memory holds for some of its chunks (those still live), in seq order: n chunks.
    What re-reading places in the reader's window (longmem/reader.py, `Reread`)."""

    seqs: np.ndarray  # [n] int64, ascending
    token_ids: np.ndarray  # [n, c] int32
    positions: np.ndarray  # [n, c] int64

    @staticmethod
    def empty(chunk_size: int) -> "StoredTokens":
        return StoredTokens(np.zeros(0, np.int64), np.zeros((0, chunk_size), np.int32),
                            np.zeros((0, chunk_size), np.int64))

    @staticmethod
    def cat(parts: list["StoredTokens"]) -> "StoredTokens":
        """Several stores' answers (a striped memory) as one, in seq order."""
        seqs = np.concatenate([p.seqs for p in parts])
        order = np.argsort(seqs, kind="stable")
        return StoredTokens(seqs[order], np.concatenate([p.token_ids for p in parts])[order],
                            np.concatenate([p.positions for p in parts])[order])


def merge_hits(parts: list[ChunkHits], k: int) -> ChunkHits:
    """Exact top-k over the union of several searches (shards, or a memory plus a scratch memory).

    Ties keep the order of `parts`, then each part's own order, so the result is deterministic.
    """
    return merge_hits_with_sources(parts, k)[0]


def merge_hits_with_sources(parts: list[ChunkHits], k: int) -> tuple[ChunkHits, np.ndarray]:
    """merge_hits, and for each hit the index of the part it came from: [T, Hq, k]. The merged table
    keeps only the rows some winning hit points at."""
    if len(parts) == 1:
        return parts[0], np.zeros(parts[0].seqs.shape, np.int64)
    offsets = np.cumsum([0] + [len(p.table_keys) for p in parts[:-1]])
    scores = np.concatenate([p.scores for p in parts], axis=2)
    seqs = np.concatenate([p.seqs for p in parts], axis=2)
    rows = np.concatenate([np.where(p.rows >= 0, p.rows + o, -1) for p, o in zip(parts, offsets)], axis=2)
    sources = np.concatenate([np.full(p.seqs.shape, i, np.int64) for i, p in enumerate(parts)], axis=2)
    order = np.argsort(-scores, axis=2, kind="stable")[:, :, :k]  # [T, Hq, k]
    scores, seqs, rows, sources = (np.take_along_axis(a, order, axis=2) for a in (scores, seqs, rows, sources))
    used, inverse = np.unique(rows[rows >= 0], return_inverse=True)
    rows[rows >= 0] = inverse
    tables = [np.concatenate([getattr(p, name) for p in parts])[used] for name in TABLE_FIELDS]
    return ChunkHits(scores, seqs, rows.astype(np.int32), *tables), sources


@dataclass
class Retrieved:
    """Token-level memory for joint attention: K = k_chunks * c entries per query token and head."""

    keys: torch.Tensor  # [B, Hq, T, K, d]
    values: torch.Tensor  # [B, Hq, T, K, d]
    mask: torch.Tensor  # [B, Hq, T, K] bool, True where the entry holds a real token


def hits_to_retrieved(rows: list[ChunkHits], dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> Retrieved:
    """Per-row chunk hits as token-level keys/values laid out for attention: each row's table goes to
    `device` as it is ([U, c, d]) and is gathered there into its hits."""
    keys, values, masks = [], [], []
    for hits in rows:
        t, hq, k = hits.rows.shape
        c, d = hits.table_keys.shape[1:]
        index = torch.from_numpy(hits.rows).to(device=device, dtype=torch.long).transpose(0, 1)  # [Hq, T, k]
        valid = index >= 0
        index = torch.where(valid, index, len(hits.table_keys))  # empty hits read the zero row added below

        def gather(table: np.ndarray) -> torch.Tensor:  # [U, c, d] -> [Hq, T, K, d]
            table = torch.from_numpy(table).to(device=device, dtype=dtype)
            return torch.cat([table, table.new_zeros(1, c, d)])[index].reshape(hq, t, k * c, d)

        keys.append(gather(hits.table_keys))
        values.append(gather(hits.table_values))
        masks.append(valid.repeat_interleave(c, dim=2))  # [Hq, T, K]
    stack = (lambda parts: parts[0][None]) if len(rows) == 1 else torch.stack
    return Retrieved(keys=stack(keys), values=stack(values), mask=stack(masks))


class Chunker:
    """Groups a memory's token stream into chunks of c tokens and numbers them.

    An append whose tokens do not fill the last chunk leaves the rest pending; pending tokens are
    not searchable and are completed by the next append. `flush` is deliberately absent: a partial
    chunk would have a mean key over fewer tokens than every other chunk.
    """

    def __init__(self, chunk_size: int, num_kv_heads: int, head_dim: int, dtype=np.float32, recent_tokens: int = 0):
        """recent_tokens: how many of the newest offered token ids to keep verbatim (`recent`), sinks included."""
        self.chunk_size = chunk_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        self.recent_tokens = recent_tokens
        self.recent_ids = np.zeros((0,), np.int32)
        self.next_seq = 0
        self.next_position = 0  # stream position of the next offered token
        self.tokens_offered = 0
        self._clear_pending()

    def _clear_pending(self) -> None:
        self.pending_keys = np.zeros((0, self.num_kv_heads, self.head_dim), self.dtype)
        self.pending_values = np.zeros((0, self.num_kv_heads, self.head_dim), self.dtype)
        self.pending_ids = np.zeros((0,), np.int32)
        self.pending_positions = np.zeros((0,), np.int64)

    @property
    def pending_tokens(self) -> int:
        return len(self.pending_ids)

    def push(self, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
             skip_first: int = 0) -> Chunks:
        """Offers T tokens to the stream; the first `skip_first` take positions but are not stored.

        keys, values: [T, Hkv, d]; token_ids: [T]. Returns the chunks completed by this push.
        """
        t = len(token_ids)
        if keys.shape != (t, self.num_kv_heads, self.head_dim) or values.shape != keys.shape:
            raise ValueError(f"keys/values must be [{t}, {self.num_kv_heads}, {self.head_dim}], "
                             f"got {tuple(keys.shape)} and {tuple(values.shape)}")
        positions = self.next_position + np.arange(t, dtype=np.int64)
        self.next_position += t
        recent = np.concatenate([self.recent_ids, np.asarray(token_ids, np.int32)])
        self.recent_ids = recent[len(recent) - min(len(recent), self.recent_tokens):]
        self.tokens_offered += t
        keep = slice(min(skip_first, t), t)
        k = np.concatenate([self.pending_keys, keys[keep].astype(self.dtype, copy=False)])
        v = np.concatenate([self.pending_values, values[keep].astype(self.dtype, copy=False)])
        ids = np.concatenate([self.pending_ids, np.asarray(token_ids, np.int32)[keep]])
        pos = np.concatenate([self.pending_positions, positions[keep]])
        c = self.chunk_size
        n = len(ids) // c
        full = n * c
        self.pending_keys, self.pending_values = k[full:], v[full:]
        self.pending_ids, self.pending_positions = ids[full:], pos[full:]
        seqs = self.next_seq + np.arange(n, dtype=np.int64)
        self.next_seq += n
        # [n*c, Hkv, d] -> [n, Hkv, c, d]
        to_chunks = lambda x: x[:full].reshape(n, c, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        return Chunks(keys=np.ascontiguousarray(to_chunks(k)), values=np.ascontiguousarray(to_chunks(v)),
                      token_ids=ids[:full].reshape(n, c), positions=pos[:full].reshape(n, c),
                      seqs=seqs)

    def recent(self) -> tuple[np.ndarray, int]:
        """(the newest offered token ids, up to recent_tokens of them [n] int32, the position of the first)."""
        return self.recent_ids, self.next_position - len(self.recent_ids)

    def reset(self) -> None:
        self.next_seq = 0
        self.next_position = 0
        self.tokens_offered = 0
        self.recent_ids = np.zeros((0,), np.int32)
        self._clear_pending()

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Counters, pending and recent tokens: everything `load_state` needs to continue the stream exactly."""
        arrays = {"keys": self.pending_keys, "values": self.pending_values, "ids": self.pending_ids,
                  "positions": self.pending_positions, "recent": self.recent_ids}
        return arrays, {"next_seq": self.next_seq, "next_position": self.next_position,
                        "tokens_offered": self.tokens_offered}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.next_seq, self.next_position = int(meta["next_seq"]), int(meta["next_position"])
        self.tokens_offered = int(meta["tokens_offered"])
        self.pending_keys, self.pending_values = arrays["keys"], arrays["values"]
        self.pending_ids, self.pending_positions = arrays["ids"], arrays["positions"]
        self.recent_ids = arrays.get("recent", np.zeros((0,), np.int32))  # a snapshot from before it kept none


@dataclass(frozen=True)
class ApproxSearch:
    """How a store searches (see the module docstring); the values come from MemoryConfig.ann_* and
    MemoryConfig.search_*."""

    min_chunks: int  # a store searches approximately once it holds this many chunks; 0: always exact
    lists_per_sqrt: float  # IVF lists: lists_per_sqrt x sqrt(capacity), at most one per 39 chunks held
    probe: int  # IVF lists searched per query
    query_clusters: int  # directions a search's queries are grouped into for the hot sets
    hot_chunks: int  # chunks per direction in its hot set
    kmeans_iterations: int  # of the spherical k-means that groups a search's queries
    device: str = "faiss"  # exact search: "faiss" (a CPU flat index), a torch device, or "auto"
    block_scores: int = 1 << 27  # query x chunk scores a torch search holds at once (bounds its memory)

    def torch_device(self) -> torch.device | None:
        """Where exact search runs as a torch matmul + top-k, or None for faiss's CPU flat index.
        "auto": CUDA when present (the GPU index), else faiss."""
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else None
        return None if self.device == "faiss" else torch.device(self.device)

    def enabled(self) -> bool:
        """Whether a store can switch to the approximate search: only beside faiss's exact index (on a
        GPU the exact search is fast enough at any size one store holds)."""
        return self.min_chunks > 0 and self.torch_device() is None


EXACT = ApproxSearch(0, 0.0, 0, 0, 0, 0)
MIN_POINTS_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid


def _dedupe_top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score, id) pairs with each id once: scores/ids [n, m] -> [n, k] each,
    best first (-inf / -1 where fewer)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    by_id = np.argsort(ids, axis=1, kind="stable")  # equal ids stay in score order
    sorted_ids = np.take_along_axis(ids, by_id, 1)
    repeat = np.zeros(ids.shape, bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    duplicate = np.zeros(ids.shape, bool)
    np.put_along_axis(duplicate, by_id, repeat, 1)
    scores = np.where(duplicate | (ids < 0), -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return scores, np.where(np.isfinite(scores), ids, -1)


class ChunkStore:
    """A fixed-capacity ring buffer of chunks with one exact inner-product index per kv head: a faiss
    IndexFlatIP, or with `approx.device` a torch device, a [capacity, Hkv, d] tensor of search keys
    there that a search multiplies with its queries (on CUDA: the GPU index).

    Slots fill 0, 1, 2, ... and then wrap: slot `head` always holds the oldest chunk once full, and a
    new chunk overwrites it in place in the arrays and in every head's IndexFlatIP. Chunks can also
    be evicted logically (`evict_before`), which the sharded bank uses for a FIFO that is global
    across stores; logically evicted slots stay in the index until overwritten and are filtered out
    of search results.
    """

    def __init__(self, capacity_chunks: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                 dtype=np.float32, approx: ApproxSearch = EXACT):
        if capacity_chunks <= 0:
            raise ValueError("capacity_chunks must be positive")
        self.capacity = capacity_chunks
        self.chunk_size = chunk_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = np.dtype(dtype)
        shape = (capacity_chunks, num_kv_heads, chunk_size, head_dim)
        self.keys = np.zeros(shape, self.dtype)
        self.values = np.zeros(shape, self.dtype)
        self.token_ids = np.zeros((capacity_chunks, chunk_size), np.int32)
        self.positions = np.zeros((capacity_chunks, chunk_size), np.int64)
        self.seqs = np.full(capacity_chunks, NO_SEQ, np.int64)
        device = approx.torch_device()
        self.indexes = [faiss.IndexFlatIP(head_dim) for _ in range(num_kv_heads)] if device is None else []
        self.device_keys = None if device is None else torch.zeros(
            (capacity_chunks, num_kv_heads, head_dim), dtype=torch.float32, device=device)  # [N, Hkv, d]
        self.head = 0  # next slot to write
        self.filled = 0  # slots written to the search index, faiss or device_keys (<= capacity)
        self.live = 0  # newest `live` slots before `head` are searchable
        self.evicted = 0  # chunks dropped, by overwrite or by evict_before
        self.last_seq = NO_SEQ  # newest seq stored: adding a seq again is a no-op (replays are idempotent)
        self.approx = approx
        self.ivf: list[faiss.IndexIVFFlat] | None = None  # per kv head, once trained (ApproxSearch)

    @staticmethod
    def bytes_per_chunk(chunk_size: int, num_kv_heads: int, head_dim: int, dtype=np.float32) -> int:
        """Bytes one chunk slot costs: token keys and values, ids, position, seq, and its index vectors."""
        kv = 2 * num_kv_heads * chunk_size * head_dim * np.dtype(dtype).itemsize
        return kv + chunk_size * (4 + 8) + 8 + num_kv_heads * head_dim * 4

    @staticmethod
    def ivf_bytes_per_chunk(num_kv_heads: int, head_dim: int) -> int:
        """What the IVF lists add per chunk once a store searches approximately: per kv head, a copy
        of the search key, its id and its direct-map entry (hash table, ~2 x 8 bytes)."""
        return num_kv_heads * (head_dim * 4 + 8 + 16)

    @staticmethod
    def bytes_for(capacity_chunks: int, chunk_size: int, num_kv_heads: int, head_dim: int, dtype=np.float32,
                  approx: ApproxSearch = EXACT) -> int:
        """Bytes a store of this capacity reserves: its slots, and the IVF lists if it can grow into them."""
        per_chunk = ChunkStore.bytes_per_chunk(chunk_size, num_kv_heads, head_dim, dtype)
        if approx.enabled() and capacity_chunks >= approx.min_chunks:
            per_chunk += ChunkStore.ivf_bytes_per_chunk(num_kv_heads, head_dim)
        return capacity_chunks * per_chunk

    @property
    def nbytes(self) -> int:
        return self.bytes_for(self.capacity, self.chunk_size, self.num_kv_heads, self.head_dim, self.dtype,
                              self.approx)

    def _write_index(self, slot: int, count: int, search_keys: np.ndarray) -> None:
        """search_keys: [count, Hkv, d] for slots slot..slot+count-1 (no wrap)."""
        if self.device_keys is not None:
            self.device_keys[slot:slot + count] = torch.from_numpy(search_keys).to(self.device_keys.device)
        for h, index in enumerate(self.indexes):
            vectors = np.ascontiguousarray(search_keys[:, h], dtype=np.float32)
            overwrite = max(0, min(count, self.filled - slot))
            if overwrite:
                view = faiss.rev_swig_ptr(index.get_xb(), self.filled * self.head_dim)
                view = view.reshape(self.filled, self.head_dim)
                view[slot:slot + overwrite] = vectors[:overwrite]
            if overwrite < count:
                index.add(vectors[overwrite:])
            if self.ivf is not None:
                ivf, ids = self.ivf[h], np.arange(slot, slot + count, dtype=np.int64)
                if overwrite:
                    ivf.remove_ids(faiss.IDSelectorArray(ids[:overwrite]))
                ivf.add_with_ids(vectors, ids)
        self.filled = max(self.filled, slot + count)

    def add(self, chunks: Chunks) -> None:
        """Stores chunks in seq order; when full, each overwrites the oldest slot. Chunks whose seq is
        not newer than the newest stored one are skipped, so replaying an add changes nothing."""
        if len(chunks) and chunks.seqs[0] <= self.last_seq:
            chunks = chunks.select(chunks.seqs > self.last_seq)
        if not len(chunks):
            return
        self.last_seq = int(chunks.seqs[-1])
        if len(chunks) > self.capacity:
            self.evicted += len(chunks) - self.capacity
            chunks = chunks.select(slice(len(chunks) - self.capacity, None))
        n = len(chunks)
        done = 0
        while done < n:
            count = min(n - done, self.capacity - self.head)
            s, part = self.head, slice(done, done + count)
            self.keys[s:s + count] = chunks.keys[part]
            self.values[s:s + count] = chunks.values[part]
            self.token_ids[s:s + count] = chunks.token_ids[part]
            self.positions[s:s + count] = chunks.positions[part]
            self.seqs[s:s + count] = chunks.seqs[part]
            self._write_index(s, count, self._search_keys(slice(s, s + count)))
            self.head = (self.head + count) % self.capacity
            done += count
        overflow = max(0, self.live + n - self.capacity)
        self.evicted += overflow
        self.live = min(self.capacity, self.live + n)
        if self.ivf is None and self.approx.enabled() and self.live >= self.approx.min_chunks:
            self._build_ivf()

    def _flat(self, kv: int) -> np.ndarray:
        """The search keys of kv head `kv` as stored in its exact index, [filled, d] (a view)."""
        index = self.indexes[kv]
        return faiss.rev_swig_ptr(index.get_xb(), self.filled * self.head_dim).reshape(self.filled, self.head_dim)

    def _build_ivf(self, centroids: np.ndarray | None = None) -> None:
        """The IVF indexes over every filled slot (ids = slots): centroids [Hkv, lists, d] given (a
        restore), or trained on the search keys held now."""
        if centroids is None:
            lists = int(min(self.approx.lists_per_sqrt * np.sqrt(self.capacity), self.filled // MIN_POINTS_PER_LIST))
            centroids = np.stack([self._train_centroids(self._flat(h), max(1, lists))
                                  for h in range(self.num_kv_heads)])
        self.ivf = []
        for h in range(self.num_kv_heads):
            quantizer = faiss.IndexFlatIP(self.head_dim)
            quantizer.add(np.ascontiguousarray(centroids[h], dtype=np.float32))
            ivf = faiss.IndexIVFFlat(quantizer, self.head_dim, len(centroids[h]), faiss.METRIC_INNER_PRODUCT)
            ivf.own_fields = True
            quantizer.this.disown()
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            ivf.add_with_ids(np.ascontiguousarray(self._flat(h)), np.arange(self.filled, dtype=np.int64))
            self.ivf.append(ivf)

    def _train_centroids(self, vectors: np.ndarray, lists: int) -> np.ndarray:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.head_dim), self.head_dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
        return index.quantizer.reconstruct_n(0, lists)

    def _search_keys(self, slots: slice) -> np.ndarray:
        """A chunk's search key: the mean of its stored token keys, [n, Hkv, d]."""
        return self.keys[slots].astype(np.float32).mean(axis=2)

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Everything needed to rebuild this store exactly (the index is derived from the keys)."""
        n = self.filled
        arrays = {"keys": self.keys[:n], "values": self.values[:n], "token_ids": self.token_ids[:n],
                  "positions": self.positions[:n], "seqs": self.seqs[:n]}
        if self.ivf is not None:  # [Hkv, lists, d]: the IVF lists are rebuilt from them and the keys
            arrays["ivf_centroids"] = np.stack([ivf.quantizer.reconstruct_n(0, ivf.nlist) for ivf in self.ivf])
        meta = {"capacity": self.capacity, "chunk_size": self.chunk_size, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype.name, "head": self.head, "filled": self.filled,
                "live": self.live, "evicted": self.evicted, "last_seq": self.last_seq}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, approx: ApproxSearch = EXACT) -> "ChunkStore":
        store = cls(meta["capacity"], meta["chunk_size"], meta["num_kv_heads"], meta["head_dim"], meta["dtype"], approx)
        n = meta["filled"]
        for name in ("keys", "values", "token_ids", "positions", "seqs"):
            getattr(store, name)[:n] = arrays[name]
        store._write_index(0, n, store._search_keys(slice(0, n)))
        store.head, store.live, store.evicted, store.last_seq = meta["head"], meta["live"], meta["evicted"], meta["last_seq"]
        if "ivf_centroids" in arrays:
            store._build_ivf(arrays["ivf_centroids"])
        elif approx.enabled() and store.live >= approx.min_chunks:
            store._build_ivf()
        return store

    def oldest_slot(self) -> int:
        return (self.head - self.live) % self.capacity

    def live_slots(self) -> np.ndarray:
        """The live slots, oldest first (their seqs ascend): [live]."""
        return (self.oldest_slot() + np.arange(self.live)) % self.capacity

    def evict_before(self, min_seq: int) -> int:
        """Drops live chunks with seq < min_seq (they are the oldest). Returns how many."""
        dropped = 0
        while self.live and self.seqs[self.oldest_slot()] < min_seq:
            self.live -= 1
            dropped += 1
        self.evicted += dropped
        return dropped

    def is_live(self, slots: np.ndarray) -> np.ndarray:
        """Whether each slot (>= 0) is among the newest `live` written slots."""
        age = (self.head - 1 - slots) % self.capacity  # 0 for the newest
        return (slots >= 0) & (slots < self.filled) & (age < self.live)

    def stored(self, seqs: np.ndarray) -> StoredTokens:
        """The token ids of those of `seqs` this store holds live (others are skipped): the live slots,
        oldest first, hold ascending seqs, so each is found by binary search."""
        order = self.live_slots()
        live_seqs = self.seqs[order]
        wanted = np.unique(np.asarray(seqs, np.int64))
        at = np.searchsorted(live_seqs, wanted)
        hit = at < self.live
        hit[hit] = live_seqs[at[hit]] == wanted[hit]
        slots = order[at[hit]]
        return StoredTokens(wanted[hit], self.token_ids[slots], self.positions[slots])

    def _term_counts(self, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(live slots oldest first [live], how often each term occurs in each of their chunks [live, Q])."""
        order = self.live_slots()
        return order, (self.token_ids[order][:, :, None] == np.asarray(terms)[None, None, :]).sum(1)

    def term_frequencies(self, terms: np.ndarray) -> tuple[np.ndarray, int]:
        """(chunks holding each term [Q], live chunks): what the idf of a lexical search counts."""
        return (self._term_counts(terms)[1] > 0).sum(0).astype(np.int64), self.live

    def lexical(self, terms: np.ndarray, idf: np.ndarray, k: int, k1: float) -> LexicalHits:
        """The k live chunks whose stored token ids best match `terms` (distinct token ids, weights idf
        [Q], `bm25_idf`): BM25 over chunks, sum over terms of idf tf (k1 + 1) / (tf + k1). A scan of the
        stored ids, so it needs no index of its own: it is as durable and as striped as they are."""
        if not self.live or not len(terms):
            return LexicalHits(np.zeros(0, np.int64), np.zeros(0, np.float32))
        order, tf = self._term_counts(terms)  # [live], [live, Q]
        scores = ((tf * (k1 + 1) / (tf + k1)) * idf).sum(1).astype(np.float32)  # [live]
        top = np.argsort(-scores, kind="stable")[:k]
        top = top[scores[top] > 0]
        return LexicalHits(self.seqs[order[top]], scores[top])

    def search(self, queries: np.ndarray, k: int) -> ChunkHits:
        """queries: [T, Hq, d] with Hq a multiple of Hkv; query head h searches kv head h // (Hq/Hkv)."""
        t, hq, d = queries.shape
        if hq % self.num_kv_heads or d != self.head_dim:
            raise ValueError(f"queries must be [T, a multiple of {self.num_kv_heads}, {self.head_dim}],"
                             f" got {tuple(queries.shape)}")
        hits = ChunkHits.empty(t, hq, k, self.chunk_size, self.head_dim, self.dtype)
        if self.live == 0:
            return hits
        group = hq // self.num_kv_heads
        fetch = min(self.filled, k + self.filled - self.live)  # room for dead slots to be filtered
        slots = np.empty((t, hq, fetch), np.int64)
        scores = np.empty((t, hq, fetch), np.float32)
        for kv in range(self.num_kv_heads):
            heads = slice(kv * group, (kv + 1) * group)
            q = np.ascontiguousarray(queries[:, heads].reshape(t * group, d), dtype=np.float32)
            if self.ivf is not None:
                dist, ids = self._approx_search(kv, q, fetch)
            elif self.device_keys is not None:
                dist, ids = self._torch_search(kv, q, fetch)
            else:
                dist, ids = self.indexes[kv].search(q, fetch)
            scores[:, heads] = dist.reshape(t, group, fetch)
            slots[:, heads] = ids.reshape(t, group, fetch)
        live = self.is_live(slots)
        # Stable-sort live hits first, keeping faiss's descending score order among them.
        order = np.argsort(~live, axis=2, kind="stable")[:, :, :k]
        slots = np.take_along_axis(slots, order, axis=2)
        valid = np.take_along_axis(live, order, axis=2)
        kept = order.shape[2]
        hits.scores[:, :, :kept] = np.where(valid, np.take_along_axis(scores, order, axis=2), -np.inf)
        hits.seqs[:, :, :kept] = np.where(valid, self.seqs[np.where(valid, slots, 0)], NO_SEQ)
        kv_of_head = np.arange(hq) // group  # [Hq]
        pair = (slots * self.num_kv_heads + kv_of_head[None, :, None])[valid]  # each hit's (slot, kv head)
        uniq, inverse = np.unique(pair, return_inverse=True)
        hits.rows[:, :, :kept][valid] = inverse
        slot, kv = np.divmod(uniq, self.num_kv_heads)
        hits.table_positions, hits.table_token_ids = self.positions[slot], self.token_ids[slot]
        hits.table_keys, hits.table_values = self.keys[slot, kv], self.values[slot, kv]
        return hits

    def _torch_search(self, kv: int, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of kv head `kv` on the search keys' device: q [n, d] -> scores, slots [n, fetch]."""
        keys = self.device_keys[:self.filled, kv]  # [filled, d]
        q_t = torch.from_numpy(q).to(keys.device)
        rows = max(1, self.approx.block_scores // self.filled)
        best = [(q_t[i:i + rows] @ keys.T).topk(fetch, dim=1) for i in range(0, len(q), rows)]
        return (torch.cat([b.values for b in best]).cpu().numpy(),
                torch.cat([b.indices for b in best]).cpu().numpy())

    def _approx_search(self, kv: int, q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The two-tier search of kv head `kv` (module docstring): q [n, d] -> scores, slots [n, fetch]."""
        a, n = self.approx, len(q)
        ivf = self.ivf[kv]
        ivf.nprobe = min(a.probe, ivf.nlist)
        ivf_scores, ivf_ids = ivf.search(q, fetch)
        keys = self._flat(kv)  # [filled, d]
        unit = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        if n > a.query_clusters:
            kmeans = faiss.Kmeans(self.head_dim, a.query_clusters, niter=a.kmeans_iterations, seed=0,
                                  spherical=True, min_points_per_centroid=1)
            kmeans.train(unit)
            directions = kmeans.centroids  # [m, d]
            cluster = (unit @ directions.T).argmax(axis=1)  # [n]
        else:
            directions, cluster = unit, np.arange(n)
        keys_t = torch.from_numpy(keys)
        along = torch.from_numpy(directions) @ keys_t.T  # [m, filled]
        if self.live < self.filled:  # logically evicted slots are never hot
            along[:, torch.from_numpy(~self.is_live(np.arange(self.filled)))] = -torch.inf
        hot_n = min(a.hot_chunks, self.live)
        hot = along.topk(hot_n, dim=1, sorted=False).indices  # [m, hot_n] slots
        hot_scores = np.full((n, fetch), -np.inf, np.float32)
        hot_ids = np.full((n, fetch), -1, np.int64)
        take = min(fetch, hot_n)
        q_t = torch.from_numpy(q)
        for j in np.unique(cluster):
            rows = np.flatnonzero(cluster == j)
            best = (q_t[rows] @ keys_t[hot[j]].T).topk(take, dim=1)  # over [rows, hot_n]
            hot_scores[rows, :take] = best.values.numpy()
            hot_ids[rows, :take] = hot[j][best.indices].numpy()
        return _dedupe_top(np.concatenate([ivf_scores, hot_scores], 1), np.concatenate([ivf_ids, hot_ids], 1), fetch)

    def reset(self) -> None:
        for index in self.indexes:
            index.reset()
        if self.device_keys is not None:
            self.device_keys.zero_()
        self.ivf = None
        self.seqs[:] = NO_SEQ
        self.head = self.filled = self.live = self.evicted = 0
        self.last_seq = NO_SEQ


@dataclass
class MemoryStats:
    memory_id: str
    capacity_tokens: int
    tokens_held: int  # searchable tokens (whole chunks); never more than capacity_tokens
    tokens_evicted: int
    tokens_appended: int  # tokens offered, including segment sinks that are never stored
    pending_tokens: int  # tokens waiting for their chunk to fill; not searchable yet
    num_shards: int = 1


class RequestWindow:
    """The request ids of a memory's most recent appends (at most `size`; 0 keeps none), each with the
    stream position its append began at. An append whose id is here was applied already and is skipped,
    so a client that retries an append it heard no answer to (with the same id) changes the memory once."""

    def __init__(self, size: int, ids=()):
        """ids: a `state()`: [request id, position] pairs (or bare ids, whose positions are unknown)."""
        self.size = size
        pairs = [(i, NO_POSITION) if isinstance(i, str) else (i[0], int(i[1])) for i in ids]
        self.ids: OrderedDict[str, int] = OrderedDict(pairs[-size:] if size else [])

    def __contains__(self, request_id: str | None) -> bool:
        return request_id is not None and request_id in self.ids

    def add(self, request_id: str | None, position: int = NO_POSITION) -> None:
        if request_id is None or not self.size:
            return
        self.ids[request_id] = position
        while len(self.ids) > self.size:
            self.ids.popitem(last=False)

    def position(self, request_id: str | None) -> int:
        """Where the append with this id began; NO_POSITION if the window does not hold it (or holds it
        from a snapshot that kept no positions)."""
        return self.ids.get(request_id, NO_POSITION) if request_id is not None else NO_POSITION

    def state(self) -> list[list]:
        return [[i, p] for i, p in self.ids.items()]


@dataclass
class RecentTokens:
    """A memory's newest appended token ids, verbatim (memory.recent_tokens of them, segment sinks
    included), and where an append with an asked request id began. What a conversation keeps in its
    window (longmem/chat.py)."""

    token_ids: np.ndarray  # [n] int32: stream positions start_position .. start_position + n - 1
    start_position: int
    request_position: int = NO_POSITION  # where the asked request id's append began; NO_POSITION: not known
    request_applied: bool = False  # the asked request id was applied (its position may still be unknown)

    @staticmethod
    def of(chunker: "Chunker", applied: "RequestWindow", request_id: str | None) -> "RecentTokens":
        """What a memory of this chunker and request window answers (in process and striped alike)."""
        return RecentTokens(*chunker.recent(), applied.position(request_id), request_id in applied)


class Memory:
    """One document's or session's memory: a chunker and one ring-buffer store, FIFO of exact capacity,
    and the ids of its recent appends (`RequestWindow`)."""

    def __init__(self, memory_id: str, capacity_tokens: int, chunk_size: int, num_kv_heads: int,
                 head_dim: int, dtype=np.float32, approx: ApproxSearch = EXACT, request_window: int = 0,
                 recent_tokens: int = 0):
        if capacity_tokens <= 0 or capacity_tokens % chunk_size:
            raise ValueError(f"capacity_tokens must be a positive multiple of the chunk size {chunk_size}")
        self.memory_id = memory_id
        self.capacity_tokens = capacity_tokens
        self.chunker = Chunker(chunk_size, num_kv_heads, head_dim, dtype, recent_tokens)
        self.store = ChunkStore(capacity_tokens // chunk_size, chunk_size, num_kv_heads, head_dim, dtype, approx)
        self.applied = RequestWindow(request_window)

    def append(self, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray, skip_first: int = 0,
               request_id: str | None = None) -> int:
        """Returns the chunks completed (0 for a request id applied before: nothing changes)."""
        if request_id in self.applied:
            return 0
        position = self.chunker.next_position
        chunks = self.chunker.push(keys, values, token_ids, skip_first)
        self.store.add(chunks)
        self.applied.add(request_id, position)
        return len(chunks)

    def recent(self, request_id: str | None = None) -> RecentTokens:
        return RecentTokens.of(self.chunker, self.applied, request_id)

    def search(self, queries: np.ndarray, k_chunks: int) -> ChunkHits:
        return self.store.search(queries, k_chunks)

    def stored(self, seqs: np.ndarray) -> StoredTokens:
        return self.store.stored(seqs)

    def lexical(self, terms: np.ndarray, k: int, k1: float) -> LexicalHits:
        terms = np.unique(np.asarray(terms, np.int64))
        return self.store.lexical(terms, bm25_idf(*self.store.term_frequencies(terms)), k, k1)

    def reset(self) -> None:
        """Empties the stream, and forgets its request ids: their positions were in the old stream."""
        self.chunker.reset()
        self.store.reset()
        self.applied = RequestWindow(self.applied.size)

    def stats(self) -> MemoryStats:
        c = self.chunker.chunk_size
        return MemoryStats(
            memory_id=self.memory_id, capacity_tokens=self.capacity_tokens,
            tokens_held=self.store.live * c,
            tokens_evicted=self.store.evicted * c, tokens_appended=self.chunker.tokens_offered,
            pending_tokens=self.chunker.pending_tokens)


class MemoryBank:
    """Many memories side by side, in one process. services/bank.py offers the same methods over
    memories striped across Ray shard actors."""

    def __init__(self, chunk_size: int, num_kv_heads: int, head_dim: int, default_capacity: int,
                 dtype=np.float32, approx: ApproxSearch = EXACT, request_window: int = 0, recent_tokens: int = 0):
        self.request_window = request_window
        self.recent_tokens = recent_tokens
        self.chunk_size = chunk_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.default_capacity = default_capacity
        self.dtype = dtype
        self.approx = approx
        self.memories: dict[str, Memory] = {}

    def create(self, memory_id: str, capacity_tokens: int | None = None, num_shards: int | None = None,
               temporary: bool = False) -> MemoryStats:
        """temporary: the caller's working memory; here it lives and dies with the caller's process."""
        if memory_id in self.memories:
            raise MemoryExists(f"memory '{memory_id}' already exists")
        if num_shards not in (None, 0, 1):
            raise ValueError("the in-process bank holds every memory in one shard")
        memory = Memory(memory_id, capacity_tokens or self.default_capacity, self.chunk_size,
                        self.num_kv_heads, self.head_dim, self.dtype, self.approx, self.request_window,
                        self.recent_tokens)
        self.memories[memory_id] = memory
        return memory.stats()

    def get(self, memory_id: str) -> Memory:
        try:
            return self.memories[memory_id]
        except KeyError:
            raise MemoryNotFound(f"memory '{memory_id}' does not exist") from None

    def stats(self, memory_id: str) -> MemoryStats:
        return self.get(memory_id).stats()

    def list(self) -> list[MemoryStats]:
        return [m.stats() for m in self.memories.values()]

    def delete(self, memory_id: str) -> None:
        self.get(memory_id)
        del self.memories[memory_id]

    def reset(self, memory_id: str) -> MemoryStats:
        memory = self.get(memory_id)
        memory.reset()
        return memory.stats()

    def append(self, memory_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
               skip_first: int = 0, request_id: str | None = None) -> MemoryStats:
        memory = self.get(memory_id)
        memory.append(keys, values, token_ids, skip_first, request_id)
        return memory.stats()

    def recent(self, memory_id: str, request_id: str | None = None) -> RecentTokens:
        """The memory's newest appended tokens, and where the append with request_id began (if it did)."""
        return self.get(memory_id).recent(request_id)

    def stored(self, memory_id: str, seqs: np.ndarray) -> StoredTokens:
        """The token ids the memory holds for chunks `seqs` (those it still holds, in seq order)."""
        return self.get(memory_id).stored(seqs)

    def lexical(self, memory_id: str, terms: np.ndarray, k: int, k1: float) -> LexicalHits:
        """The memory's k chunks whose token ids best match `terms` (ChunkStore.lexical)."""
        return self.get(memory_id).lexical(terms, k, k1)

    def search(self, memory_ids: list[list[str]], queries: torch.Tensor, k_chunks: int,
               sources: list[np.ndarray] | None = None) -> list[ChunkHits]:
        """queries: [B, T, Hq, d]; row b searches the union of memories memory_ids[b] (may be empty).
        sources, when given, receives for each row which of its memories each hit came from
        ([T, Hq, k], an index into memory_ids[b])."""
        rows = []
        for b, ids in enumerate(memory_ids):
            q = queries[b].detach().float().cpu().numpy()
            parts = [self.get(i).search(q, k_chunks) for i in ids]
            if not parts:
                t, hq, d = q.shape
                parts = [ChunkHits.empty(t, hq, k_chunks, self.chunk_size, d, self.dtype)]
            hits, source = merge_hits_with_sources(parts, k_chunks)
            rows.append(hits)
            if sources is not None:
                sources.append(source)
        return rows
