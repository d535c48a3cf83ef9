"""The memory bank over Ray: the core's StripedBank (longmem/striped.py) in a detached actor, over
the shard actors.

This module keeps what is Ray's: finding the shard actors, retrying a restarting shard until
`serve.shard_retry_seconds` (then ShardUnavailable), the single-writer lock of the storage, proto
conversion and metrics. Placement, chunking, the global FIFO, the merge and durability are the core's.

`RemoteBank` gives the reader, encoder and gateway the core's `Bank` interface over this actor. Its
search asks the bank actor only for routes and searches the shard actors itself: the retrieved keys
and values go from the shards to the reader, never through the bank.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import numpy as np
import ray
import torch

from longmem.config import LongMemConfig
from longmem.memory import ChunkHits, Chunks, LexicalHits, MemoryStats, RecentTokens, ShardUnavailable, StoredTokens
from longmem.storage import Storage, StorageLock
from longmem.striped import Route, StripedBank, lexical_route, search_routes, stored_route
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb
from longmem.wire import from_tensor_proto, to_tensor_proto

from .messages import (chunks_to_proto, hits_from_proto, lexical_from_proto, stats_from_proto, stats_to_proto,
                       stored_from_proto)
from .outages import UNAVAILABLE_ERRORS
from .remote import known_cause, result
from .shard import ShardActor

log = logging.getLogger("longmem.bank")

BANK_NAME = "bank"


def unavailable(error: BaseException) -> ShardUnavailable:
    return ShardUnavailable(f"a memory shard is unavailable ({type(error).__name__}); retry in a few seconds")


class RayShard:
    """The core's ShardClient over one shard actor. Changes are retried while the shard restarts
    (re-sending is idempotent); a shard's own error (no capacity, ...) comes back as itself, without
    the Ray traceback around it."""

    def __init__(self, handle, retry_seconds: float):
        self.handle, self.retry_seconds = handle, retry_seconds

    async def _retried(self, call):
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                return await call()
            except UNAVAILABLE_ERRORS as e:
                if time.monotonic() + delay > deadline:
                    raise unavailable(e) from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
            except ray.exceptions.RayTaskError as e:
                cause = known_cause(e)
                if cause is None:
                    raise
                raise cause from None

    async def create(self, store_id: str, capacity_chunks: int) -> None:
        request = ipb.ShardCreateRequest(store_id=store_id, capacity_chunks=capacity_chunks)
        await self._retried(lambda: self.handle.create.remote(request))

    async def add(self, store_id: str, chunks: Chunks, min_seq: int) -> None:
        request = ipb.ShardAddRequest(store_id=store_id, chunks=chunks_to_proto(chunks), min_seq=min_seq)
        await self._retried(lambda: self.handle.add.remote(request))

    async def delete(self, store_id: str) -> None:
        await self._retried(lambda: self.handle.delete.remote(store_id))

    async def sync(self, capacity_chunks: dict[str, int]) -> dict[str, int]:
        request = ipb.ShardSyncRequest(capacity_chunks=capacity_chunks)
        return dict((await self._retried(lambda: self.handle.sync.remote(request))).last_seq)

    async def free_bytes(self) -> int:
        stats = await self._retried(lambda: self.handle.stats.remote())
        return stats.budget_bytes - stats.reserved_bytes


class Bank:
    """The bank actor: the core's StripedBank over RayShard clients, speaking protos."""

    def __init__(self, shard_names: list[str], namespace: str, chunk_size: int, num_kv_heads: int, head_dim: int,
                 default_capacity: int, default_shards: int, dtype: str, storage_root: str | None,
                 snapshot_every: int, retry_seconds: float, server_id: str,
                 lock_stale_seconds: float, lock_refresh_seconds: float, request_window: int, recent_tokens: int):
        """Every setting from the config (start_bank passes them all)."""
        self.handles = {n: ray.get_actor(n, namespace=namespace) for n in shard_names}
        lock = (StorageLock(Storage(storage_root), {"server": server_id}, lock_stale_seconds)
                if storage_root else None)
        self.core = StripedBank({n: RayShard(h, retry_seconds) for n, h in self.handles.items()}, chunk_size,
                                num_kv_heads, head_dim, default_capacity, default_shards, dtype,
                                Storage(f"{storage_root}/bank") if storage_root else None, snapshot_every,
                                lock, lock_refresh_seconds, request_window, actor_alive, recent_tokens)

    async def ready(self) -> None:
        await self.core.ready()

    async def close(self) -> None:
        """Releases the storage for the next server (a killed bank's lock is taken over later anyway)."""
        self.core.close()

    async def create(self, memory_id: str, capacity_tokens: int = 0, num_shards: int = 0,
                     owner: str | None = None) -> pb.MemoryInfo:
        """owner: the Ray actor id of a temporary memory's owner; once that actor is dead (a replica
        killed mid-request) the memory is deleted when its space is needed."""
        return stats_to_proto(await self.core.create(memory_id, capacity_tokens, num_shards, owner))

    async def stats(self, memory_id: str) -> pb.MemoryInfo:
        return stats_to_proto(await self.core.stats(memory_id))

    async def list(self) -> list[pb.MemoryInfo]:
        return [stats_to_proto(m) for m in await self.core.list()]

    async def delete(self, memory_id: str) -> None:
        await self.core.delete(memory_id)

    async def reset(self, memory_id: str) -> pb.MemoryInfo:
        return stats_to_proto(await self.core.reset(memory_id))

    async def append(self, req: ipb.BankAppendRequest) -> pb.MemoryInfo:
        return stats_to_proto(await self.core.append(req.memory_id, from_tensor_proto(req.keys),
                                                     from_tensor_proto(req.values),
                                                     from_tensor_proto(req.token_ids), req.skip_first,
                                                     req.request_id or None))

    async def recent(self, req: ipb.RecentRequest) -> ipb.RecentTokens:
        r = await self.core.recent(req.memory_id, req.request_id or None)
        return ipb.RecentTokens(token_ids=to_tensor_proto(r.token_ids), start_position=r.start_position,
                                request_position=r.request_position, request_applied=r.request_applied)

    async def routes(self, req: ipb.RouteRequest) -> ipb.RouteResponse:
        rows = await self.core.routes([list(row.memory_ids) for row in req.rows])
        return ipb.RouteResponse(rows=[ipb.RouteList(routes=[ipb.Route(store_id=r.store_id, shards=r.shards)
                                                             for r in row]) for row in rows])

    def pid(self) -> int:
        """The actor's process id (operators and fault tests use it)."""
        return os.getpid()

    async def shard_stats(self) -> list[ipb.ShardStats]:
        return list(await asyncio.gather(*(h.stats.remote() for h in self.handles.values())))


async def actor_alive(actor_id: str) -> bool:
    """Whether a Ray actor may still run, from the cluster's state API: False once it is dead or the
    cluster no longer knows it; True when the state API cannot be asked (nothing is deleted then)."""
    from ray.util.state import get_actor

    try:
        state = await asyncio.to_thread(get_actor, actor_id)
    except Exception as e:
        log.warning("cannot ask the state API whether actor %s lives: %r", actor_id, e)
        return True
    return state is not None and state.state != "DEAD"


BankActor = ray.remote(Bank)


class RemoteBank:
    """The core's Bank interface over the bank actor and, for searches, the shard actors (blocking
    calls). `search_metrics`, when given, times each search as component "reader"."""

    def __init__(self, config: LongMemConfig, search_metrics=None):
        self.handle = get_bank(config)
        self.namespace = config.serve.namespace
        self.chunk_size, self.dtype = config.memory.chunk_size, np.dtype(config.memory.dtype)
        self.metrics = search_metrics
        self.shards: dict[str, ray.actor.ActorHandle] = {}

    def create(self, memory_id: str, capacity_tokens: int | None = None, num_shards: int | None = None,
               temporary: bool = False) -> MemoryStats:
        """temporary: owned by the calling actor, and deleted by the bank if that actor dies first."""
        owner = ray.get_runtime_context().get_actor_id() if temporary else None
        return stats_from_proto(result(self.handle.create.remote(memory_id, capacity_tokens or 0, num_shards or 0,
                                                                 owner)))

    def stats(self, memory_id: str) -> MemoryStats:
        return stats_from_proto(result(self.handle.stats.remote(memory_id)))

    def list(self) -> list[MemoryStats]:
        return [stats_from_proto(m) for m in result(self.handle.list.remote())]

    def delete(self, memory_id: str) -> None:
        result(self.handle.delete.remote(memory_id))

    def reset(self, memory_id: str) -> MemoryStats:
        return stats_from_proto(result(self.handle.reset.remote(memory_id)))

    def append(self, memory_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
               skip_first: int = 0, request_id: str | None = None) -> MemoryStats:
        req = ipb.BankAppendRequest(memory_id=memory_id, keys=to_tensor_proto(keys), values=to_tensor_proto(values),
                                    token_ids=to_tensor_proto(np.asarray(token_ids, np.int32)),
                                    skip_first=skip_first, request_id=request_id or "")
        return stats_from_proto(result(self.handle.append.remote(req)))

    def recent(self, memory_id: str, request_id: str | None = None) -> RecentTokens:
        r = result(self.handle.recent.remote(ipb.RecentRequest(memory_id=memory_id, request_id=request_id or "")))
        return RecentTokens(from_tensor_proto(r.token_ids), r.start_position, r.request_position, r.request_applied)

    def search(self, memory_ids: list[list[str]], queries: torch.Tensor, k_chunks: int) -> list[ChunkHits]:
        """queries: [B, T, Hq, d]. The bank routes; the memories' shards are searched from here, all at
        once, and their hits merged here. A shard that is down fails the search at once: UNAVAILABLE."""
        if self.metrics is None:
            return self._search(memory_ids, queries, k_chunks)
        with self.metrics.timed(self.metrics.search_seconds, {"component": "reader"}):
            return self._search(memory_ids, queries, k_chunks)

    def _routes(self, memory_ids: list[list[str]]) -> list[list[Route]]:
        req = ipb.RouteRequest(rows=[ipb.SearchList(memory_ids=row) for row in memory_ids])
        return [[Route(r.store_id, tuple(r.shards)) for r in row.routes]
                for row in result(self.handle.routes.remote(req)).rows]

    def _search(self, memory_ids: list[list[str]], queries: torch.Tensor, k_chunks: int) -> list[ChunkHits]:
        return search_routes(self._search_stores, self._routes(memory_ids), queries.detach().float().cpu().numpy(),
                             k_chunks, self.chunk_size, self.dtype)

    def _search_stores(self, calls: list[tuple[str, str, np.ndarray]], k_chunks: int) -> list[ChunkHits]:
        return self._ask_shards([self._shard(name).search.remote(ipb.ShardSearchRequest(
            store_id=store_id, queries=to_tensor_proto(queries), k_chunks=k_chunks)) for name, store_id, queries in calls],
            hits_from_proto)

    def stored(self, memory_id: str, seqs: np.ndarray) -> StoredTokens:
        """The token ids the memory holds for chunks `seqs`, asked of its shards from here."""
        return stored_route(self._stored_stores, self._routes([[memory_id]])[0][0], seqs, self.chunk_size)

    def _stored_stores(self, calls: list[tuple[str, str, np.ndarray]]) -> list[StoredTokens]:
        return self._ask_shards([self._shard(name).stored.remote(ipb.ShardStoredRequest(
            store_id=store_id, seqs=to_tensor_proto(seqs))) for name, store_id, seqs in calls], stored_from_proto)

    def lexical(self, memory_id: str, terms: np.ndarray, k: int, k1: float) -> LexicalHits:
        """The memory's k chunks whose token ids best match `terms`, every store asked from here."""
        return lexical_route(self._frequencies, self._lexical_stores, self._routes([[memory_id]])[0][0], terms, k, k1)

    def _frequencies(self, calls: list[tuple[str, str, np.ndarray]]) -> list[tuple[np.ndarray, int]]:
        return self._ask_shards([self._shard(name).frequencies.remote(ipb.ShardFrequenciesRequest(
            store_id=store_id, terms=to_tensor_proto(terms))) for name, store_id, terms in calls],
            lambda m: (from_tensor_proto(m.chunks_with_term), m.live_chunks))

    def _lexical_stores(self, calls: list[tuple[str, str, np.ndarray, np.ndarray]], k: int,
                        k1: float) -> list[LexicalHits]:
        return self._ask_shards([self._shard(name).lexical.remote(ipb.ShardLexicalRequest(
            store_id=store_id, terms=to_tensor_proto(terms), idf=to_tensor_proto(idf), k=k, k1=k1))
            for name, store_id, terms, idf in calls], lexical_from_proto)

    @staticmethod
    def _ask_shards(refs: list, decode) -> list:
        """The shards' answers to calls sent at once, decoded; a shard that is down fails them: UNAVAILABLE."""
        try:
            return [decode(result(ref)) for ref in refs]
        except UNAVAILABLE_ERRORS as e:
            raise unavailable(e) from None

    def _shard(self, name: str):
        if name not in self.shards:
            self.shards[name] = ray.get_actor(name, namespace=self.namespace)
        return self.shards[name]


def shard_names(config: LongMemConfig) -> list[str]:
    return [f"shard-{i}" for i in range(config.serve.num_shards)]


def start_bank(config: LongMemConfig, num_kv_heads: int, head_dim: int):
    """Starts (or finds) the shard actors, spread over nodes, and the bank actor, and waits until the
    bank has restored its memories. Returns the bank. StorageLocked when another live server uses
    the storage."""
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
                                                   serve_cfg.snapshot_every, tuple(serve_cfg.latency_buckets_s),
                                                   config.memory.approx_search())
    bank = BankActor.options(name=BANK_NAME, namespace=ns, lifetime="detached", get_if_exists=True,
                             num_cpus=serve_cfg.bank_num_cpus, max_restarts=-1,
                             max_concurrency=serve_cfg.bank_max_concurrency).remote(
        names, ns, config.memory.chunk_size, num_kv_heads, head_dim, config.memory.capacity_tokens,
        serve_cfg.default_memory_shards, config.memory.dtype, root, serve_cfg.snapshot_every,
        serve_cfg.shard_retry_seconds, uuid.uuid4().hex,
        serve_cfg.lock_stale_seconds, serve_cfg.lock_refresh_seconds, config.memory.request_id_window,
        config.memory.recent_tokens)
    result(bank.ready.remote())
    return bank


def get_bank(config: LongMemConfig):
    return ray.get_actor(BANK_NAME, namespace=config.serve.namespace)


def stop_bank(config: LongMemConfig) -> None:
    """Releases the storage and kills the detached bank and shard actors (they outlive serve.shutdown())."""
    try:
        ray.get(get_bank(config).close.remote(), timeout=10)
    except (ValueError, ray.exceptions.RayError):
        pass  # no bank, or a dead one: its lock goes stale
    for name in [BANK_NAME, *shard_names(config)]:
        try:
            ray.kill(ray.get_actor(name, namespace=config.serve.namespace))
        except ValueError:
            continue
