"""A memory shard: a Ray actor holding chunk stores (ring buffers + faiss indexes) for many memories.

Each memory striped over S shards has one store on each, holding its chunks with seq % S == the
shard's place in the memory's placement. A shard has a byte budget; a store is reserved at its full
capacity when created, so a shard never grows past its budget later.
"""

from __future__ import annotations

import numpy as np
import ray

from longmem.memory import CapacityExceeded, ChunkStore, MemoryNotFound
from longmem.v1 import internal_pb2 as ipb
from longmem.wire import from_tensor_proto

from .messages import chunks_from_proto, hits_to_proto


class Shard:
    def __init__(self, name: str, budget_bytes: int, chunk_size: int, num_kv_heads: int, head_dim: int,
                 dtype: str = "float32"):
        self.name = name
        self.budget_bytes = budget_bytes
        self.dims = (chunk_size, num_kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.stores: dict[str, ChunkStore] = {}

    def bytes_for(self, capacity_chunks: int) -> int:
        return capacity_chunks * ChunkStore.bytes_per_chunk(*self.dims, self.dtype)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.nbytes for s in self.stores.values())

    def free_bytes(self) -> int:
        return self.budget_bytes - self.reserved_bytes

    def _store(self, store_id: str) -> ChunkStore:
        try:
            return self.stores[store_id]
        except KeyError:
            raise MemoryNotFound(f"store '{store_id}' is not on shard {self.name}") from None

    def create(self, req: ipb.ShardCreateRequest) -> ipb.ShardStats:
        if req.store_id not in self.stores:
            need = self.bytes_for(req.capacity_chunks)
            if need > self.free_bytes():
                raise CapacityExceeded(f"shard {self.name} has {self.free_bytes():,} bytes free, "
                                       f"a store of {req.capacity_chunks:,} chunks needs {need:,}")
            self.stores[req.store_id] = ChunkStore(req.capacity_chunks, *self.dims, self.dtype)
        return self.stats()

    def add(self, req: ipb.ShardAddRequest) -> int:
        store = self._store(req.store_id)
        chunks = chunks_from_proto(req.chunks)
        if len(chunks):
            store.add(chunks)
        store.evict_before(req.min_seq)
        return store.live

    def search(self, req: ipb.ShardSearchRequest) -> ipb.Hits:
        return hits_to_proto(self._store(req.store_id).search(from_tensor_proto(req.queries), req.k_chunks))

    def reset(self, store_id: str) -> None:
        self._store(store_id).reset()

    def delete(self, store_id: str) -> None:
        self.stores.pop(store_id, None)

    def stats(self) -> ipb.ShardStats:
        return ipb.ShardStats(name=self.name, node_id=ray.get_runtime_context().get_node_id(),
                              budget_bytes=self.budget_bytes, reserved_bytes=self.reserved_bytes,
                              num_stores=len(self.stores),
                              live_chunks=sum(s.live for s in self.stores.values()))


ShardActor = ray.remote(Shard)
