"""A memory shard: a Ray actor holding chunk stores (ring buffers + faiss indexes) for many memories.

Each memory incarnation striped over S shards has one store on each, holding its chunks with
seq % S == the shard's place in the memory's placement. A shard has a byte budget; a store is
reserved at its full capacity when created, so a shard never grows past its budget later. Every
change goes to the shard's journal before it is acknowledged (longmem/durable.py); a restarted shard
actor (`max_restarts`) reruns __init__, which restores the newest snapshot and replays the log.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

from longmem.durable import StoreSet
from longmem.memory import ApproxSearch, CapacityExceeded
from longmem.storage import Storage
from longmem.v1 import internal_pb2 as ipb
from longmem.wire import from_tensor_proto, to_tensor_proto

from .messages import chunks_from_proto, hits_to_proto, lexical_to_proto, stored_to_proto
from .metrics import metrics


class Shard:
    def __init__(self, name: str, budget_bytes: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                 dtype: str, storage_root: str | None, snapshot_every: int, latency_buckets_s: tuple[float, ...],
                 approx: ApproxSearch):
        """Every setting from the config (services.bank.start_bank passes them all)."""
        self.name = name
        self.metrics = metrics(tuple(latency_buckets_s)) if latency_buckets_s else None
        self.chunk_size = chunk_size
        storage = Storage(f"{storage_root}/shards/{name}") if storage_root else None
        self.stores = StoreSet(chunk_size, num_kv_heads, head_dim, np.dtype(dtype), storage, snapshot_every,
                               budget_bytes, approx)
        self.stores.restore()
        self._record_tokens()
        self.search_cpu_s, self.searches = 0.0, 0  # what a search costs this shard (longmem bench: search)

    def _record_tokens(self) -> None:
        if self.metrics is not None:
            held = sum(s.live for s in self.stores.stores.values()) * self.chunk_size
            self.metrics.memory_tokens.set(held, tags={"shard": self.name})

    def create(self, req: ipb.ShardCreateRequest) -> None:
        try:
            self.stores.create(req.store_id, req.capacity_chunks)
        except CapacityExceeded as e:
            raise CapacityExceeded(f"shard {self.name}: {e}") from None

    def add(self, req: ipb.ShardAddRequest) -> int:
        store = self.stores.get(req.store_id)
        evicted = store.evicted
        live = self.stores.add(req.store_id, chunks_from_proto(req.chunks), req.min_seq)
        if self.metrics is not None:
            if store.evicted > evicted:  # a Ray counter takes only positive increments
                self.metrics.evictions.inc((store.evicted - evicted) * self.chunk_size, tags={"shard": self.name})
            self._record_tokens()
        return live

    def search(self, req: ipb.ShardSearchRequest) -> ipb.Hits:
        start, cpu = time.perf_counter(), time.process_time()  # process: faiss's threads count too
        hits = self.stores.get(req.store_id).search(from_tensor_proto(req.queries), req.k_chunks)
        self.search_cpu_s += time.process_time() - cpu
        self.searches += 1
        if self.metrics is not None:
            self.metrics.search_seconds.observe(time.perf_counter() - start, tags={"component": "shard"})
        return hits_to_proto(hits)

    def stored(self, req: ipb.ShardStoredRequest) -> ipb.StoredTokens:
        return stored_to_proto(self.stores.get(req.store_id).stored(from_tensor_proto(req.seqs)))

    def frequencies(self, req: ipb.ShardFrequenciesRequest) -> ipb.TermFrequencies:
        df, live = self.stores.get(req.store_id).term_frequencies(from_tensor_proto(req.terms))
        return ipb.TermFrequencies(chunks_with_term=to_tensor_proto(df), live_chunks=live)

    def lexical(self, req: ipb.ShardLexicalRequest) -> ipb.LexicalHits:
        store = self.stores.get(req.store_id)
        return lexical_to_proto(store.lexical(from_tensor_proto(req.terms), from_tensor_proto(req.idf), req.k, req.k1))

    def delete(self, store_id: str) -> None:
        self.stores.delete(store_id)
        self._record_tokens()

    def sync(self, req: ipb.ShardSyncRequest) -> ipb.ShardSyncResponse:
        last = self.stores.sync(dict(req.capacity_chunks))
        self._record_tokens()
        return ipb.ShardSyncResponse(last_seq=last)

    def pid(self) -> int:
        """The actor's process id (operators and fault tests use it)."""
        return os.getpid()

    def stats(self) -> ipb.ShardStats:
        stores = self.stores.stores.values()
        return ipb.ShardStats(name=self.name, node_id=ray.get_runtime_context().get_node_id(),
                              budget_bytes=self.stores.budget_bytes, reserved_bytes=self.stores.reserved_bytes,
                              num_stores=len(stores), live_chunks=sum(s.live for s in stores),
                              search_cpu_seconds=self.search_cpu_s, searches=self.searches)


ShardActor = ray.remote(Shard)
