"""The memory bank over Ray: places each memory on S shards, stripes its chunks, merges exact top-k.

The bank actor owns what must be global per memory: its chunker (sequence numbers, stream positions,
pending tokens) and its FIFO. Chunk `seq` goes to the memory's shard `seq % S`; after each append
every shard of the memory evicts chunks older than `next_seq - capacity_chunks`, so the memory holds
exactly its newest `capacity_tokens` across shards. A search asks each shard for its local top-k
and merges them, which is exactly the top-k of one flat index over all the memory's chunks.

`RemoteBank` gives the reader, encoder and gateway the core's `Bank` interface over this actor.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from longmem.config import LongMemConfig
from longmem.memory import (CapacityExceeded, ChunkHits, Chunker, MemoryExists, MemoryNotFound, MemoryStats,
                            ShardUnavailable, merge_hits_with_sources)
from longmem.storage import Storage, WriteAheadLog, pack_arrays, unpack_arrays
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb
from longmem.wire import from_tensor_proto, to_tensor_proto

from .messages import chunks_to_proto, hits_from_proto, hits_to_proto, stats_from_proto, stats_to_proto
from .remote import result
from .metrics import metrics
from .shard import ShardActor

BANK_NAME = "bank"


@dataclass
class Placement:
    memory_id: str
    capacity_tokens: int
    shards: list[str]  # stripe order: chunk seq goes to shards[seq % len(shards)]
    chunker: Chunker
    lock: asyncio.Lock

    @property
    def capacity_chunks(self) -> int:
        return self.capacity_tokens // self.chunker.chunk_size

    def stats(self) -> MemoryStats:
        c = self.chunker.chunk_size
        live = min(self.chunker.next_seq, self.capacity_chunks)
        return MemoryStats(self.memory_id, self.capacity_tokens, tokens_held=live * c,
                           tokens_evicted=(self.chunker.next_seq - live) * c,
                           tokens_appended=self.chunker.tokens_offered,
                           pending_tokens=self.chunker.pending_tokens, num_shards=len(self.shards))


class Bank:
    """Placement, chunking and the global FIFO of every memory; durable through its own log.

    Each change is logged before it is sent to the shards; a restarted bank restores its newest
    snapshot, replays the log and re-sends the logged changes to the shards, which skip what they
    already hold. An append that was logged therefore ends up wholly present, one that was not
    wholly absent. Snapshots are taken only while no change is in flight.
    """

    def __init__(self, shard_names: list[str], namespace: str, chunk_size: int, num_kv_heads: int, head_dim: int,
                 default_capacity: int, default_shards: int, dtype: str = "float32",
                 storage_root: str | None = None, snapshot_every: int = 256, retry_seconds: float = 30.0,
                 latency_buckets_s: tuple[float, ...] = ()):
        self.shards = {n: ray.get_actor(n, namespace=namespace) for n in shard_names}
        self.metrics = metrics(tuple(latency_buckets_s)) if latency_buckets_s else None
        self.chunk_size, self.num_kv_heads, self.head_dim = chunk_size, num_kv_heads, head_dim
        self.default_capacity, self.default_shards = default_capacity, default_shards
        self.dtype = np.dtype(dtype)
        self.memories: dict[str, Placement] = {}
        self.storage = Storage(f"{storage_root}/bank") if storage_root else None
        self.wal = WriteAheadLog(self.storage) if self.storage else None
        self.snapshot_every = snapshot_every
        self.retry_seconds = retry_seconds
        self.since_snapshot = 0
        self.in_flight = 0
        self.restored = asyncio.Event()
        self.restoring = False

    def _get(self, memory_id: str) -> Placement:
        try:
            return self.memories[memory_id]
        except KeyError:
            raise MemoryNotFound(f"memory '{memory_id}' does not exist") from None

    def _placement(self, memory_id: str, capacity: int, shards: list[str]) -> Placement:
        placement = Placement(memory_id, capacity, shards,
                              Chunker(self.chunk_size, self.num_kv_heads, self.head_dim, self.dtype), asyncio.Lock())
        self.memories[memory_id] = placement
        return placement

    # ---- durability -----------------------------------------------------------------------------
    async def _ready(self) -> None:
        if self.restored.is_set():
            return
        if self.restoring:
            await self.restored.wait()
            return
        self.restoring = True
        try:
            await self._restore()
        finally:
            self.restored.set()

    def _log(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        if self.wal is not None:
            self.wal.append(pack_arrays(arrays or {}, meta))
            self.since_snapshot += 1

    def _snapshot_if_due(self) -> None:
        if self.wal is None or self.in_flight or self.since_snapshot < self.snapshot_every:
            return
        lsn = self.wal.next_lsn - 1
        meta, arrays = {}, {}
        for i, (memory_id, p) in enumerate(self.memories.items()):
            c = p.chunker
            meta[memory_id] = {"capacity_tokens": p.capacity_tokens, "shards": p.shards, "index": i,
                               "next_seq": c.next_seq, "next_position": c.next_position,
                               "tokens_offered": c.tokens_offered}
            arrays.update({f"{i}.keys": c.pending_keys, f"{i}.values": c.pending_values,
                           f"{i}.ids": c.pending_ids, f"{i}.positions": c.pending_positions})
        self.storage.write(f"snapshots/{lsn:016d}.npz", pack_arrays(arrays, meta))
        self.storage.write("SNAPSHOT", str(lsn).encode())
        self.wal.truncate(lsn)
        for old in self.storage.list("snapshots"):
            if old != f"{lsn:016d}.npz":
                self.storage.delete(f"snapshots/{old}")
        self.since_snapshot = 0

    async def _restore(self) -> None:
        if self.storage is None:
            return
        after = 0
        if self.storage.exists("SNAPSHOT"):
            after = int(self.storage.read("SNAPSHOT"))
            arrays, meta = unpack_arrays(self.storage.read(f"snapshots/{after:016d}.npz"))
            for memory_id, m in meta.items():
                c = self._placement(memory_id, m["capacity_tokens"], m["shards"]).chunker
                c.next_seq, c.next_position, c.tokens_offered = m["next_seq"], m["next_position"], m["tokens_offered"]
                i = m["index"]
                c.pending_keys, c.pending_values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
                c.pending_ids, c.pending_positions = arrays[f"{i}.ids"], arrays[f"{i}.positions"]
        self.wal.next_lsn = max(self.wal.next_lsn, after + 1)
        for _, payload in self.wal.records(after=after):
            arrays, meta = unpack_arrays(payload)
            try:
                await self._apply(meta, arrays)
            except CapacityExceeded:
                continue  # a create that failed then too; the delete logged after it follows
            self.since_snapshot += 1

    async def _on_shards(self, names: list[str], call) -> list:
        """call(handle, name) on each named shard, retried while a shard restarts (re-sending is idempotent)."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                return await asyncio.gather(*(call(self.shards[n], n) for n in names))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if time.monotonic() + delay > deadline:
                    raise ShardUnavailable(f"a memory shard is unavailable ({type(e).__name__}); "
                                           "retry in a few seconds") from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _apply(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Applies one logged change here and on the shards (idempotent there)."""
        op, memory_id = meta["op"], meta["memory"]
        if op == "create":
            placement = self.memories.get(memory_id) or self._placement(memory_id, meta["capacity"], meta["shards"])
            request = ipb.ShardCreateRequest(store_id=memory_id, capacity_chunks=meta["per_store"])
            await self._on_shards(placement.shards, lambda h, _: h.create.remote(request))
        elif op == "delete":
            placement = self.memories.pop(memory_id, None)
            if placement is not None:
                await self._on_shards(placement.shards, lambda h, _: h.delete.remote(memory_id))
        elif op == "reset":
            placement = self._get(memory_id)
            await self._on_shards(placement.shards, lambda h, _: h.reset.remote(memory_id))
            placement.chunker.reset()
        elif op == "append":
            placement = self._get(memory_id)
            chunks = placement.chunker.push(arrays["keys"], arrays["values"], arrays["token_ids"], meta["skip_first"])
            min_seq = placement.chunker.next_seq - placement.capacity_chunks
            s = len(placement.shards)
            parts = {name: ipb.ShardAddRequest(store_id=memory_id, chunks=chunks_to_proto(chunks.select(chunks.seqs % s == i)),
                                               min_seq=min_seq) for i, name in enumerate(placement.shards)}
            await self._on_shards(placement.shards, lambda h, name: h.add.remote(parts[name]))
        else:
            raise ValueError(f"unknown log record {op!r}")

    async def _change(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Logs a change, then applies it."""
        self.in_flight += 1
        try:
            self._log(meta, arrays)
            await self._apply(meta, arrays or {})
        finally:
            self.in_flight -= 1
        self._snapshot_if_due()

    # ---- API ------------------------------------------------------------------------------------
    async def create(self, memory_id: str, capacity_tokens: int = 0, num_shards: int = 0) -> pb.MemoryInfo:
        await self._ready()
        if memory_id in self.memories:
            raise MemoryExists(f"memory '{memory_id}' already exists")
        capacity = capacity_tokens or self.default_capacity
        s = num_shards or self.default_shards
        if capacity <= 0 or capacity % self.chunk_size:
            raise ValueError(f"capacity_tokens must be a positive multiple of {self.chunk_size}, got {capacity}")
        if not 1 <= s <= len(self.shards):
            raise ValueError(f"num_shards must be between 1 and {len(self.shards)}, got {s}")
        per_store = math.ceil(capacity // self.chunk_size / s)
        stats = await asyncio.gather(*(h.stats.remote() for h in self.shards.values()))
        chosen = [name for _, name in sorted(((st.budget_bytes - st.reserved_bytes, st.name) for st in stats),
                                             reverse=True)[:s]]
        try:
            await self._change({"op": "create", "memory": memory_id, "capacity": capacity, "shards": chosen,
                                "per_store": per_store})
        except Exception as e:
            await self._change({"op": "delete", "memory": memory_id})
            cause = getattr(e, "cause", e)
            raise CapacityExceeded(f"memory of {capacity:,} tokens over {s} shard(s) does not fit: {cause}") from None
        return stats_to_proto(self.memories[memory_id].stats())

    async def stats(self, memory_id: str) -> pb.MemoryInfo:
        await self._ready()
        return stats_to_proto(self._get(memory_id).stats())

    async def list(self) -> list[pb.MemoryInfo]:
        await self._ready()
        return [stats_to_proto(p.stats()) for p in self.memories.values()]

    async def delete(self, memory_id: str) -> None:
        await self._ready()
        async with self._get(memory_id).lock:
            await self._change({"op": "delete", "memory": memory_id})

    async def reset(self, memory_id: str) -> pb.MemoryInfo:
        await self._ready()
        placement = self._get(memory_id)
        async with placement.lock:
            await self._change({"op": "reset", "memory": memory_id})
        return stats_to_proto(placement.stats())

    async def append(self, req: ipb.BankAppendRequest) -> pb.MemoryInfo:
        await self._ready()
        placement = self._get(req.memory_id)
        async with placement.lock:
            await self._change({"op": "append", "memory": req.memory_id, "skip_first": req.skip_first},
                               {"keys": from_tensor_proto(req.keys), "values": from_tensor_proto(req.values),
                                "token_ids": from_tensor_proto(req.token_ids)})
        return stats_to_proto(placement.stats())

    async def search(self, req: ipb.BankSearchRequest) -> ipb.BankSearchResponse:
        if self.metrics is None:
            return await self._search(req)
        with self.metrics.timed(self.metrics.search_seconds, {"component": "bank"}):
            return await self._search(req)

    async def _search(self, req: ipb.BankSearchRequest) -> ipb.BankSearchResponse:
        await self._ready()
        queries = from_tensor_proto(req.queries)  # [B, T, Hq, d]
        rows = []
        for b, row in enumerate(req.rows):
            q = to_tensor_proto(queries[b])
            calls = [self.shards[name].search.remote(ipb.ShardSearchRequest(store_id=m, queries=q,
                                                                             k_chunks=req.k_chunks))
                     for m in row.memory_ids for name in self._get(m).shards]
            try:
                parts = [hits_from_proto(h) for h in await asyncio.gather(*calls)]
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                raise ShardUnavailable(f"a memory shard is unavailable ({type(e).__name__}); "
                                       "retry in a few seconds") from None
            if not parts:
                t, hq, d = queries.shape[1:]
                parts = [ChunkHits.empty(t, hq, req.k_chunks, self.chunk_size, d, self.dtype)]
            merged, sources = merge_hits_with_sources(parts, req.k_chunks)
            rows.append(hits_to_proto(merged, self.num_kv_heads, sources))
        return ipb.BankSearchResponse(rows=rows)

    async def shard_stats(self) -> list[ipb.ShardStats]:
        return list(await asyncio.gather(*(h.stats.remote() for h in self.shards.values())))


BankActor = ray.remote(Bank)


class RemoteBank:
    """The core's Bank interface over the bank actor (blocking calls)."""

    def __init__(self, handle):
        self.handle = handle

    def create(self, memory_id: str, capacity_tokens: int | None = None, num_shards: int | None = None) -> MemoryStats:
        return stats_from_proto(result(self.handle.create.remote(memory_id, capacity_tokens or 0, num_shards or 0)))

    def stats(self, memory_id: str) -> MemoryStats:
        return stats_from_proto(result(self.handle.stats.remote(memory_id)))

    def list(self) -> list[MemoryStats]:
        return [stats_from_proto(m) for m in result(self.handle.list.remote())]

    def delete(self, memory_id: str) -> None:
        result(self.handle.delete.remote(memory_id))

    def reset(self, memory_id: str) -> MemoryStats:
        return stats_from_proto(result(self.handle.reset.remote(memory_id)))

    def append(self, memory_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
               skip_first: int = 0) -> MemoryStats:
        req = ipb.BankAppendRequest(memory_id=memory_id, keys=to_tensor_proto(keys), values=to_tensor_proto(values),
                                    token_ids=to_tensor_proto(np.asarray(token_ids, np.int32)),
                                    skip_first=skip_first)
        return stats_from_proto(result(self.handle.append.remote(req)))

    def search(self, memory_ids: list[list[str]], queries: torch.Tensor, k_chunks: int) -> list[ChunkHits]:
        req = ipb.BankSearchRequest(rows=[ipb.SearchList(memory_ids=row) for row in memory_ids],
                                    queries=to_tensor_proto(queries.detach().float().cpu()), k_chunks=k_chunks)
        return [hits_from_proto(h) for h in result(self.handle.search.remote(req)).rows]


def shard_names(config: LongMemConfig) -> list[str]:
    return [f"shard-{i}" for i in range(config.serve.num_shards)]


def start_bank(config: LongMemConfig, num_kv_heads: int, head_dim: int):
    """Starts (or finds) the shard actors, spread over nodes, and the bank actor. Returns the bank."""
    serve_cfg, ns = config.serve, config.serve.namespace
    has_resource = ray.cluster_resources().get(serve_cfg.shard_resource, 0) > 0
    resources = {serve_cfg.shard_resource: serve_cfg.shard_resource_units} if has_resource else {}
    names = shard_names(config)
    root = config.storage_root()
    for name in names:
        ShardActor.options(name=name, namespace=ns, lifetime="detached", get_if_exists=True,
                           num_cpus=serve_cfg.shard_num_cpus, resources=resources, scheduling_strategy="SPREAD",
                           max_restarts=-1).remote(name, serve_cfg.shard_budget_bytes, config.memory.chunk_size,
                                                   num_kv_heads, head_dim, config.memory.dtype, root,
                                                   serve_cfg.snapshot_every, tuple(serve_cfg.latency_buckets_s))
    return BankActor.options(name=BANK_NAME, namespace=ns, lifetime="detached", get_if_exists=True,
                             num_cpus=serve_cfg.bank_num_cpus, max_restarts=-1,
                             max_concurrency=serve_cfg.bank_max_concurrency).remote(
        names, ns, config.memory.chunk_size, num_kv_heads, head_dim, config.memory.capacity_tokens,
        serve_cfg.default_memory_shards, config.memory.dtype, root, serve_cfg.snapshot_every,
        serve_cfg.shard_retry_seconds, tuple(serve_cfg.latency_buckets_s))


def get_bank(config: LongMemConfig):
    return ray.get_actor(BANK_NAME, namespace=config.serve.namespace)


def stop_bank(config: LongMemConfig) -> None:
    """Kills the detached bank and shard actors (they outlive serve.shutdown())."""
    for name in [BANK_NAME, *shard_names(config)]:
        try:
            ray.kill(ray.get_actor(name, namespace=config.serve.namespace))
        except ValueError:
            continue
