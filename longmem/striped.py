"""The memory bank striped over shards, Ray-free: placement, chunking, the global FIFO, the exact merge
of per-store hits, and durability through a journal. services/bank.py runs it in a Ray actor over
shard actors; the tests run it over in-process shards.

A memory striped over S shards has one store on each; chunk `seq` goes to `shards[seq % S]`. After
each append every store of the memory evicts chunks older than `next_seq - capacity_chunks`, so the
memory holds exactly its newest `capacity_tokens` across its stores. A search asks each store for its
local top-k and merges them: exactly the top-k of one flat index over all the memory's chunks.

The bank places and routes; it does not carry the data of a search. A reader asks it for the memories'
routes (`StripedBank.routes`) and searches their stores itself (`search_routes`), so the retrieved keys
and values go from each shard straight to the reader.

Durability: the bank's journal decides which memories exist and what each holds; shards are brought
to agree with it.
- Every *incarnation* of a memory has a store id of its own (`<memory id>@<random>`): create and
  reset start a new one, so no chunk of a deleted or reset memory can reappear in, or block, a new one.
- A change is checked before it is logged: a refused change is never logged and moves no counter.
  Once logged it is committed and carried to the shards until they hold it (roll forward; adds are
  idempotent by seq, creates and deletes by store id). A memory whose committed change has not yet
  reached every shard is *unsynced*, and every later call on it first finishes carrying it.
- Create asks the shards for its stores first and logs only when all of them have one; the stores of
  a refused or interrupted create, like those of deleted memories, are garbage the bank deletes.
- Restore reads the snapshot and the log without touching a shard, then syncs every shard to the
  result (it keeps exactly the stores of live incarnations and frees the rest) and re-sends the chunks
  logged since the snapshot that a store lacks. Until that completes every call answers
  ShardUnavailable: partial state is never served.
- Snapshots are written only while no change is in flight and every memory is synced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .durable import Journal
from .memory import (CapacityExceeded, ChunkHits, Chunker, Chunks, MemoryExists, MemoryNotFound, MemoryStats,
                     LexicalHits, RecentTokens, RequestWindow, ShardUnavailable, StoredTokens, bm25_idf, merge_hits)
from .storage import Storage, StorageLock, StorageMismatch, pack_arrays, unpack_arrays

log = logging.getLogger("longmem.striped")

SNAPSHOT_FILE = "bank.npz"


class ShardClient(Protocol):
    """One shard as the bank sees it. Calls may block on I/O; an adapter that retries a restarting
    shard raises ShardUnavailable once it gives up."""

    async def create(self, store_id: str, capacity_chunks: int) -> None: ...
    async def add(self, store_id: str, chunks: Chunks, min_seq: int) -> None: ...
    async def delete(self, store_id: str) -> None: ...
    async def sync(self, capacity_chunks: dict[str, int]) -> dict[str, int]: ...
    async def free_bytes(self) -> int: ...


@dataclass(frozen=True)
class Route:
    """Where one memory's chunks are: its current incarnation's store on each of its shards, in stripe
    order. Valid for the search it was asked for: a reset or delete moves a memory to a new store."""
    store_id: str
    shards: tuple[str, ...]


class StoreSearch(Protocol):
    """The reader's side of a search: runs every (shard, store id, queries [T, Hq, d]) search and returns
    their hits in order. Runs where the reader runs, blocks on I/O, and should run the calls concurrently."""

    def __call__(self, calls: list[tuple[str, str, np.ndarray]], k_chunks: int) -> list[ChunkHits]: ...


def search_routes(search: StoreSearch, routes: list[list[Route]], queries: np.ndarray, k_chunks: int,
                  chunk_size: int, dtype) -> list[ChunkHits]:
    """queries: [B, T, Hq, d]; row b searches the union of the memories routed by routes[b]: every store
    of each is searched and the hits merged, exactly the top-k of one flat index over those memories."""
    calls = [(b, shard, route.store_id) for b, row in enumerate(routes) for route in row for shard in route.shards]
    found = search([(shard, store_id, queries[b]) for b, shard, store_id in calls], k_chunks)
    parts: list[list[ChunkHits]] = [[] for _ in routes]
    for (b, _, _), hits in zip(calls, found):
        parts[b].append(hits)
    t, hq, d = queries.shape[1:]
    return [merge_hits(p or [ChunkHits.empty(t, hq, k_chunks, chunk_size, d, dtype)], k_chunks) for p in parts]


class StoreTokens(Protocol):
    """The reader's side of fetching stored token ids: runs every (shard, store id, seqs [n]) lookup
    (ChunkStore.stored) and returns their answers in order."""

    def __call__(self, calls: list[tuple[str, str, np.ndarray]]) -> list[StoredTokens]: ...


def stored_route(fetch: StoreTokens, route: Route, seqs: np.ndarray, chunk_size: int) -> StoredTokens:
    """The token ids a memory holds for chunks `seqs`, each asked of the store its stripe put it on
    (seq % S): exactly what one store holding the whole memory would answer."""
    seqs = np.unique(np.asarray(seqs, np.int64))
    stripes = len(route.shards)
    calls = [(shard, route.store_id, seqs[seqs % stripes == i]) for i, shard in enumerate(route.shards)]
    parts = fetch([c for c in calls if len(c[2])])
    return StoredTokens.cat(parts) if parts else StoredTokens.empty(chunk_size)


class StoreFrequencies(Protocol):
    """The reader's side of a lexical search's first step: runs every (shard, store id, terms)
    ChunkStore.term_frequencies and returns their answers in order."""

    def __call__(self, calls: list[tuple[str, str, np.ndarray]]) -> list[tuple[np.ndarray, int]]: ...


class StoreLexical(Protocol):
    """And its second: runs every (shard, store id, terms, idf) ChunkStore.lexical."""

    def __call__(self, calls: list[tuple[str, str, np.ndarray, np.ndarray]], k: int, k1: float) -> list[LexicalHits]: ...


def lexical_route(frequencies: StoreFrequencies, search: StoreLexical, route: Route, terms: np.ndarray, k: int,
                  k1: float) -> LexicalHits:
    """A memory's k chunks best matching `terms`, with the idf of the whole memory: every store's term
    counts summed, then every store's best k under that idf, merged (what one store would answer)."""
    terms = np.unique(np.asarray(terms, np.int64))
    counts = frequencies([(shard, route.store_id, terms) for shard in route.shards])
    idf = bm25_idf(sum(df for df, _ in counts), sum(n for _, n in counts))
    return LexicalHits.merge(search([(shard, route.store_id, terms, idf) for shard in route.shards], k, k1), k)


def new_store_id(memory_id: str) -> str:
    return f"{memory_id}@{uuid.uuid4().hex[:16]}"


async def gather_all(calls) -> list:
    """Awaits every call, then raises the first error: no call is left running behind a failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


@dataclass
class Placement:
    memory_id: str
    store_id: str  # this incarnation's store on each of its shards
    capacity_tokens: int
    shards: list[str]  # stripe order: chunk seq goes to shards[seq % len(shards)]
    chunker: Chunker
    applied: RequestWindow  # the request ids of its recent appends (logged with them, and snapshotted)
    owner: str | None = None  # a temporary memory's owner: deleted by `reap` once the owner is gone
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What is committed but not yet on every shard (see `StripedBank._carry`):
    stale: list[str] = field(default_factory=list)  # earlier incarnations' stores to delete
    created: bool = True  # this incarnation's stores exist on every shard
    unsent: Chunks | None = None  # logged chunks some stores may lack

    @property
    def capacity_chunks(self) -> int:
        return self.capacity_tokens // self.chunker.chunk_size

    @property
    def per_store(self) -> int:
        return math.ceil(self.capacity_chunks / len(self.shards))

    @property
    def min_seq(self) -> int:
        return self.chunker.next_seq - self.capacity_chunks

    @property
    def synced(self) -> bool:
        return not self.stale and self.created and self.unsent is None

    def stats(self) -> MemoryStats:
        c = self.chunker.chunk_size
        live = min(self.chunker.next_seq, self.capacity_chunks)
        return MemoryStats(self.memory_id, self.capacity_tokens, tokens_held=live * c,
                           tokens_evicted=(self.chunker.next_seq - live) * c,
                           tokens_appended=self.chunker.tokens_offered,
                           pending_tokens=self.chunker.pending_tokens, num_shards=len(self.shards))


class StripedBank:
    """Memories striped over named shards; durable through its journal when given a storage."""

    def __init__(self, shards: dict[str, ShardClient], chunk_size: int, num_kv_heads: int, head_dim: int,
                 default_capacity: int, default_shards: int, dtype="float32", storage: Storage | None = None,
                 snapshot_every: int = 256, lock: StorageLock | None = None, lock_refresh_s: float = 5.0,
                 request_window: int = 0, owner_alive: Callable[[str], Awaitable[bool]] | None = None,
                 recent_tokens: int = 0):
        """owner_alive(owner): whether the owner of a temporary memory may still use it (see `reap`);
        recent_tokens: the newest token ids each memory keeps verbatim (`recent`)."""
        self.shards = shards
        self.request_window = request_window
        self.recent_tokens = recent_tokens
        self.owner_alive = owner_alive
        self.chunk_size, self.num_kv_heads, self.head_dim = chunk_size, num_kv_heads, head_dim
        self.default_capacity, self.default_shards = default_capacity, default_shards
        self.dtype = np.dtype(dtype)
        self.journal = Journal(storage, snapshot_every) if storage else None
        self.lock, self.lock_refresh_s = lock, lock_refresh_s
        self.memories: dict[str, Placement] = {}
        self.creating: set[str] = set()
        self.garbage: set[tuple[str, str]] = set()  # (shard, store id) no live memory owns
        self.in_flight = 0
        self.restored = False
        self.restoring = asyncio.Lock()
        self.heartbeat: asyncio.Task | None = None
        self.refusing: BaseException | None = None

    def _chunker(self) -> Chunker:
        return Chunker(self.chunk_size, self.num_kv_heads, self.head_dim, self.dtype, self.recent_tokens)

    def _window(self, ids=()) -> RequestWindow:
        return RequestWindow(self.request_window, ids)

    def _get(self, memory_id: str) -> Placement:
        try:
            return self.memories[memory_id]
        except KeyError:
            raise MemoryNotFound(f"memory '{memory_id}' does not exist") from None

    def _current(self, placement: Placement) -> None:
        """After waiting for a memory's lock: the memory may have been deleted meanwhile."""
        if self.memories.get(placement.memory_id) is not placement:
            raise MemoryNotFound(f"memory '{placement.memory_id}' does not exist")

    # ---- restore --------------------------------------------------------------------------------
    async def ready(self) -> None:
        """Restores on first use. ShardUnavailable while the restore cannot complete (retried on the
        next call); StorageLocked when another live server holds the storage."""
        if self.refusing is not None:
            raise self.refusing
        if self.restored:
            return
        async with self.restoring:
            if self.restored:
                return
            if self.lock is not None and self.heartbeat is None:
                self.lock.acquire()
                self.heartbeat = asyncio.get_running_loop().create_task(self._beat())
            try:
                await self._restore()
            except StorageMismatch as e:
                self.memories, self.garbage = {}, set()
                self.refusing = e
                log.error("refusing every call: %s", e)
                raise
            except Exception as e:
                self.memories, self.garbage = {}, set()
                log.warning("restore failed, will retry: %r", e)
                raise ShardUnavailable(f"the memory bank is restoring and could not finish yet "
                                       f"({type(e).__name__}: {e}); retry in a few seconds") from None
            self.restored = True

    def close(self) -> None:
        """Stops writing and releases the storage lock."""
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.lock.release()
            self.heartbeat = None
        self.refusing = ShardUnavailable("the memory bank is stopping; retry in a few seconds")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.lock_refresh_s)
            try:
                self.lock.refresh()
            except Exception as e:
                self.refusing = e
                log.error("storage lock lost; refusing every call: %r", e)
                return

    def _replay(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Applies one logged change to the bank's own state (no shard is called)."""
        op, memory_id = meta["op"], meta["memory"]
        if op == "create":
            self.memories[memory_id] = Placement(memory_id, meta["store"], meta["capacity"], meta["shards"],
                                                 self._chunker(), self._window(), meta.get("owner"))
        elif op == "delete":
            self.memories.pop(memory_id)
        elif op == "reset":
            p = self.memories[memory_id]
            p.store_id, p.unsent, p.applied = meta["store"], None, self._window()
            p.chunker.reset()
        elif op == "append":
            p = self.memories[memory_id]
            position = p.chunker.next_position
            chunks = p.chunker.push(arrays["keys"], arrays["values"], arrays["token_ids"], meta["skip_first"])
            p.unsent = chunks if p.unsent is None else Chunks.cat([p.unsent, chunks])
            p.applied.add(meta.get("request"), position)
        else:
            raise ValueError(f"unknown log record {op!r}")

    async def _restore(self) -> None:
        self.memories, self.garbage = {}, set()
        if self.journal is not None:
            if self.journal.open():
                arrays, meta = unpack_arrays(self.journal.read(SNAPSHOT_FILE))
                for i, (memory_id, m) in enumerate(meta["memories"].items()):
                    p = Placement(memory_id, m["store"], m["capacity_tokens"], m["shards"], self._chunker(),
                                  self._window(m.get("applied", ())), m.get("owner"))
                    p.chunker.load_state({k: arrays[f"{i}.{k}"] for k in ("keys", "values", "ids", "positions", "recent")
                                          if f"{i}.{k}" in arrays}, m["chunker"])
                    self.memories[memory_id] = p
            for meta, arrays in self.journal.records():
                self._replay(meta, arrays)
        missing = sorted({n for p in self.memories.values() for n in p.shards} - set(self.shards))
        if missing:
            raise StorageMismatch(f"the storage holds memories striped over shards {', '.join(missing)}, which "
                                  f"this server does not have ({len(self.shards)} shards: {', '.join(self.shards)}); "
                                  f"start it with as many shards as before (serve.num_shards) or another "
                                  f"serve.storage_uri")
        wanted: dict[str, dict[str, int]] = {name: {} for name in self.shards}
        for p in self.memories.values():
            for name in p.shards:
                wanted[name][p.store_id] = p.per_store
        names = list(self.shards)
        held = dict(zip(names, await gather_all(self.shards[n].sync(wanted[n]) for n in names)))
        for p in self.memories.values():
            if p.unsent is not None:
                await self._send(p, p.unsent, {n: held[n][p.store_id] for n in p.shards})
                p.unsent = None
        log.info("restored %d memories (%d log records after snapshot %d)", len(self.memories),
                 self.journal.since_snapshot if self.journal else 0, self.journal.snapshot_lsn if self.journal else 0)

    # ---- carrying committed changes to the shards -------------------------------------------------
    async def _send(self, p: Placement, chunks: Chunks, newer_than: dict[str, int] | None = None) -> None:
        s = len(p.shards)
        calls = []
        for i, name in enumerate(p.shards):
            keep = chunks.seqs % s == i
            if newer_than is not None:
                keep &= chunks.seqs > newer_than[name]
            calls.append(self.shards[name].add(p.store_id, chunks.select(keep), p.min_seq))
        await gather_all(calls)

    async def _carry(self, p: Placement) -> None:
        """Brings p's shards to what the journal holds (idempotent; call with p.lock held)."""
        if p.stale:
            await gather_all(self.shards[n].delete(s) for n in p.shards for s in p.stale)
            p.stale = []
        if not p.created:
            await gather_all(self.shards[n].create(p.store_id, p.per_store) for n in p.shards)
            p.created = True
        if p.unsent is not None:
            await self._send(p, p.unsent)
            p.unsent = None

    async def _collect(self) -> None:
        """Deletes garbage stores; those on an unreachable shard wait for the next try."""
        for name, store_id in list(self.garbage):
            try:
                await self.shards[name].delete(store_id)
                self.garbage.discard((name, store_id))
            except ShardUnavailable:
                continue

    def _log(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        if self.journal is not None:
            self.journal.log(meta, arrays)

    def _snapshot_if_due(self) -> None:
        if (self.journal is None or not self.journal.due or self.in_flight
                or not all(p.synced for p in self.memories.values())):
            return
        meta, arrays = {}, {}
        for i, (memory_id, p) in enumerate(self.memories.items()):
            pending, counters = p.chunker.state()
            meta[memory_id] = {"store": p.store_id, "capacity_tokens": p.capacity_tokens, "shards": p.shards,
                               "chunker": counters, "applied": p.applied.state(), "owner": p.owner}
            arrays.update({f"{i}.{k}": v for k, v in pending.items()})
        self.journal.snapshot({SNAPSHOT_FILE: pack_arrays(arrays, {"memories": meta})})

    # ---- API ------------------------------------------------------------------------------------
    async def create(self, memory_id: str, capacity_tokens: int = 0, num_shards: int = 0,
                     owner: str | None = None) -> MemoryStats:
        """owner: makes the memory temporary, owned by that process. When the shards are full, the
        temporary memories of owners that are gone are deleted (`reap`) and the create tried once more."""
        try:
            return await self._create(memory_id, capacity_tokens, num_shards, owner)
        except CapacityExceeded:
            if not await self.reap():
                raise
        return await self._create(memory_id, capacity_tokens, num_shards, owner)

    async def _create(self, memory_id: str, capacity_tokens: int, num_shards: int, owner: str | None) -> MemoryStats:
        await self.ready()
        capacity = capacity_tokens or self.default_capacity
        s = num_shards or self.default_shards
        if capacity <= 0 or capacity % self.chunk_size:
            raise ValueError(f"capacity_tokens must be a positive multiple of {self.chunk_size}, got {capacity}")
        if not 1 <= s <= len(self.shards):
            raise ValueError(f"num_shards must be between 1 and {len(self.shards)}, got {s}")
        if memory_id in self.memories or memory_id in self.creating:
            raise MemoryExists(f"memory '{memory_id}' already exists")
        self.creating.add(memory_id)
        self.in_flight += 1
        try:
            await self._collect()
            names = list(self.shards)
            free = await gather_all(self.shards[n].free_bytes() for n in names)
            chosen = [n for _, n in sorted(zip(free, names), reverse=True)[:s]]
            p = Placement(memory_id, new_store_id(memory_id), capacity, chosen, self._chunker(), self._window(), owner)
            try:
                await gather_all(self.shards[n].create(p.store_id, p.per_store) for n in chosen)
                self._log({"op": "create", "memory": memory_id, "store": p.store_id, "capacity": capacity,
                           "shards": chosen, "owner": owner})
            except BaseException as e:
                self.garbage.update((n, p.store_id) for n in chosen)
                await self._collect()
                if isinstance(e, CapacityExceeded):
                    raise CapacityExceeded(f"memory of {capacity:,} tokens over {s} shard(s) does not fit: {e}") from None
                raise
            self.memories[memory_id] = p
        finally:
            self.creating.discard(memory_id)
            self.in_flight -= 1
        self._snapshot_if_due()
        return p.stats()

    async def reap(self) -> list[str]:
        """Deletes the temporary memories whose owner is gone (`owner_alive(owner)` is False: a process
        that died before deleting its working memory); returns their ids."""
        await self.ready()
        if self.owner_alive is None:
            return []
        owners = {p.owner for p in self.memories.values() if p.owner is not None}
        gone = {owner for owner in owners if not await self.owner_alive(owner)}
        orphans = [m for m, p in self.memories.items() if p.owner in gone]
        for memory_id in orphans:
            with contextlib.suppress(MemoryNotFound):
                await self.delete(memory_id)
        return orphans

    async def stats(self, memory_id: str) -> MemoryStats:
        await self.ready()
        return self._get(memory_id).stats()

    async def list(self) -> list[MemoryStats]:
        await self.ready()
        return [p.stats() for p in self.memories.values()]

    @contextlib.asynccontextmanager
    async def _changing(self, memory_id: str):
        """One change to one memory: after restore, with the memory's lock held, counted in flight."""
        await self.ready()
        p = self._get(memory_id)
        async with p.lock:
            self._current(p)
            self.in_flight += 1
            try:
                yield p
            finally:
                self.in_flight -= 1
        self._snapshot_if_due()

    async def delete(self, memory_id: str) -> None:
        async with self._changing(memory_id) as p:
            self._log({"op": "delete", "memory": memory_id})
            del self.memories[memory_id]
            self.garbage.update((n, store_id) for n in p.shards for store_id in (p.store_id, *p.stale))
            await self._collect()

    async def reset(self, memory_id: str) -> MemoryStats:
        async with self._changing(memory_id) as p:
            store_id = new_store_id(memory_id)
            self._log({"op": "reset", "memory": memory_id, "store": store_id})
            p.stale.append(p.store_id)
            p.store_id, p.created, p.unsent = store_id, False, None
            p.chunker.reset()
            p.applied = self._window()  # its request ids' positions were in the old stream
            await self._carry(p)
        return p.stats()

    async def append(self, memory_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
                     skip_first: int = 0, request_id: str | None = None) -> MemoryStats:
        """keys, values: [T, Hkv, d]; token_ids: [T]. An append whose request id the memory's window
        holds was applied before (its log record carries the id): it changes nothing, and answers as
        soon as what it appended is on the shards."""
        async with self._changing(memory_id) as p:
            await self._carry(p)  # an earlier change first; nothing new is logged while that fails
            if request_id in p.applied:
                return p.stats()
            before = p.chunker.state()
            position = p.chunker.next_position
            chunks = p.chunker.push(keys, values, token_ids, skip_first)  # checks shapes before any change
            try:
                self._log({"op": "append", "memory": memory_id, "skip_first": int(skip_first), "request": request_id},
                          {"keys": keys, "values": values, "token_ids": np.asarray(token_ids, np.int32)})
            except BaseException:
                p.chunker.load_state(*before)
                raise
            p.unsent = chunks
            p.applied.add(request_id, position)
            try:
                await self._carry(p)
            except ShardUnavailable as e:
                raise ShardUnavailable(f"{e} (this append is recorded and reaches the shard when it is back: "
                                       "resend it with the same request id and it is applied once)") from None
        return p.stats()

    async def recent(self, memory_id: str, request_id: str | None = None) -> RecentTokens:
        """The memory's newest appended tokens, and where the append with request_id began (if it did)."""
        await self.ready()
        p = self._get(memory_id)
        return RecentTokens.of(p.chunker, p.applied, request_id)

    async def routes(self, memory_ids: list[list[str]]) -> list[list[Route]]:
        """Where the memories of each row are, for a reader's `search_routes`. A memory with a committed
        change not yet on every shard is first brought there, so a route leads to what the journal holds."""
        await self.ready()
        rows = []
        for ids in memory_ids:
            placements = [self._get(m) for m in ids]
            for p in placements:
                if not p.synced:
                    async with p.lock:
                        self._current(p)
                        await self._carry(p)
            rows.append([Route(p.store_id, tuple(p.shards)) for p in placements])
        return rows
