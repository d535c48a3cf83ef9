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
from dataclasses import dataclass

import numpy as np
import ray
import torch

from longmem.config import LongMemConfig
from longmem.memory import CapacityExceeded, ChunkHits, Chunker, MemoryExists, MemoryNotFound, MemoryStats, merge_hits
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb
from longmem.wire import from_tensor_proto, to_tensor_proto

from .messages import chunks_to_proto, hits_from_proto, hits_to_proto, stats_from_proto, stats_to_proto
from .remote import result
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
    def __init__(self, shard_names: list[str], namespace: str, chunk_size: int, num_kv_heads: int, head_dim: int,
                 default_capacity: int, default_shards: int, dtype: str = "float32"):
        self.shards = {n: ray.get_actor(n, namespace=namespace) for n in shard_names}
        self.chunk_size, self.num_kv_heads, self.head_dim = chunk_size, num_kv_heads, head_dim
        self.default_capacity, self.default_shards = default_capacity, default_shards
        self.dtype = np.dtype(dtype)
        self.memories: dict[str, Placement] = {}

    def _get(self, memory_id: str) -> Placement:
        try:
            return self.memories[memory_id]
        except KeyError:
            raise MemoryNotFound(f"memory '{memory_id}' does not exist") from None

    async def create(self, memory_id: str, capacity_tokens: int = 0, num_shards: int = 0) -> pb.MemoryInfo:
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
        free = sorted(((st.budget_bytes - st.reserved_bytes, st.name) for st in stats), reverse=True)[:s]
        chosen = [name for _, name in free]
        self.memories[memory_id] = Placement(memory_id, capacity, chosen,
                                             Chunker(self.chunk_size, self.num_kv_heads, self.head_dim, self.dtype),
                                             asyncio.Lock())
        request = ipb.ShardCreateRequest(store_id=memory_id, capacity_chunks=per_store)
        results = await asyncio.gather(*(self.shards[n].create.remote(request) for n in chosen),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            del self.memories[memory_id]
            await asyncio.gather(*(self.shards[n].delete.remote(memory_id) for n in chosen))
            cause = getattr(failed[0], "cause", failed[0])
            raise CapacityExceeded(f"memory of {capacity:,} tokens over {s} shard(s) does not fit: {cause}")
        return stats_to_proto(self.memories[memory_id].stats())

    async def stats(self, memory_id: str) -> pb.MemoryInfo:
        return stats_to_proto(self._get(memory_id).stats())

    async def list(self) -> list[pb.MemoryInfo]:
        return [stats_to_proto(p.stats()) for p in self.memories.values()]

    async def delete(self, memory_id: str) -> None:
        placement = self.memories.pop(memory_id, None) or self._get(memory_id)
        await asyncio.gather(*(self.shards[n].delete.remote(memory_id) for n in placement.shards))

    async def reset(self, memory_id: str) -> pb.MemoryInfo:
        placement = self._get(memory_id)
        async with placement.lock:
            await asyncio.gather(*(self.shards[n].reset.remote(memory_id) for n in placement.shards))
            placement.chunker.reset()
        return stats_to_proto(placement.stats())

    async def append(self, req: ipb.BankAppendRequest) -> pb.MemoryInfo:
        placement = self._get(req.memory_id)
        async with placement.lock:
            chunks = placement.chunker.push(from_tensor_proto(req.keys), from_tensor_proto(req.values),
                                            from_tensor_proto(req.token_ids), req.skip_first)
            min_seq = placement.chunker.next_seq - placement.capacity_chunks
            s = len(placement.shards)
            await asyncio.gather(*(
                self.shards[name].add.remote(ipb.ShardAddRequest(
                    store_id=req.memory_id, chunks=chunks_to_proto(chunks.select(chunks.seqs % s == i)),
                    min_seq=min_seq))
                for i, name in enumerate(placement.shards)))
        return stats_to_proto(placement.stats())

    async def search(self, req: ipb.BankSearchRequest) -> ipb.BankSearchResponse:
        queries = from_tensor_proto(req.queries)  # [B, T, Hq, d]
        rows = []
        for b, row in enumerate(req.rows):
            q = to_tensor_proto(queries[b])
            calls = [self.shards[name].search.remote(ipb.ShardSearchRequest(store_id=m, queries=q,
                                                                             k_chunks=req.k_chunks))
                     for m in row.memory_ids for name in self._get(m).shards]
            parts = [hits_from_proto(h) for h in await asyncio.gather(*calls)]
            if not parts:
                t, hq, d = queries.shape[1:]
                parts = [ChunkHits.empty(t, hq, req.k_chunks, self.chunk_size, d, self.dtype)]
            rows.append(hits_to_proto(merge_hits(parts, req.k_chunks)))
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
    for name in names:
        ShardActor.options(name=name, namespace=ns, lifetime="detached", get_if_exists=True,
                           num_cpus=serve_cfg.shard_num_cpus, resources=resources, scheduling_strategy="SPREAD",
                           max_restarts=-1).remote(name, serve_cfg.shard_budget_bytes, config.memory.chunk_size,
                                                   num_kv_heads, head_dim, config.memory.dtype)
    return BankActor.options(name=BANK_NAME, namespace=ns, lifetime="detached", get_if_exists=True,
                             num_cpus=serve_cfg.bank_num_cpus, max_restarts=-1,
                             max_concurrency=serve_cfg.bank_max_concurrency).remote(
        names, ns, config.memory.chunk_size, num_kv_heads, head_dim, config.memory.capacity_tokens,
        serve_cfg.default_memory_shards, config.memory.dtype)


def get_bank(config: LongMemConfig):
    return ray.get_actor(BANK_NAME, namespace=config.serve.namespace)


def stop_bank(config: LongMemConfig) -> None:
    """Kills the detached bank and shard actors (they outlive serve.shutdown())."""
    for name in [BANK_NAME, *shard_names(config)]:
        try:
            ray.kill(ray.get_actor(name, namespace=config.serve.namespace))
        except ValueError:
            continue
