"""Chunk stores that survive a crash: what a memory shard holds, with its write-ahead log.

Every change (create, add, reset, delete) is written to the log before it is applied and before the
caller hears back, so an acknowledged change is never lost. Every `snapshot_every` records the
stores are snapshotted and the log truncated. `restore` loads the newest snapshot and replays the
log after it; adds are idempotent by chunk seq, so a record replayed twice changes nothing.

Layout under the storage root: `wal/<lsn>`, `snapshots/<lsn>/<i>.npz` (one per store) with
`snapshots/<lsn>/stores.json`, and `SNAPSHOT` naming the newest complete snapshot.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from .memory import Chunks, ChunkStore, MemoryNotFound
from .storage import Storage, WriteAheadLog, pack_arrays, unpack_arrays

log = logging.getLogger("longmem.durable")

CHUNK_FIELDS = ("keys", "values", "token_ids", "positions", "seqs")


class StoreSet:
    def __init__(self, chunk_size: int, num_kv_heads: int, head_dim: int, dtype="float32",
                 storage: Storage | None = None, snapshot_every: int = 256):
        self.dims = (chunk_size, num_kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.storage = storage
        self.snapshot_every = snapshot_every
        self.stores: dict[str, ChunkStore] = {}
        self.wal = WriteAheadLog(storage) if storage else None
        self.snapshot_lsn = 0
        self.since_snapshot = 0

    # ---- operations (logged, then applied) -------------------------------------------------------
    def get(self, store_id: str) -> ChunkStore:
        try:
            return self.stores[store_id]
        except KeyError:
            raise MemoryNotFound(f"store '{store_id}' does not exist") from None

    def create(self, store_id: str, capacity_chunks: int) -> ChunkStore:
        if store_id not in self.stores:
            self._log({"op": "create", "store": store_id, "capacity": capacity_chunks})
            self._apply_create(store_id, capacity_chunks)
            self._snapshot_if_due()
        return self.stores[store_id]

    def add(self, store_id: str, chunks: Chunks, min_seq: int) -> int:
        """Adds chunks and evicts those older than min_seq. Returns the store's live chunk count."""
        store = self.get(store_id)
        self._log({"op": "add", "store": store_id, "min_seq": int(min_seq)},
                  {f: getattr(chunks, f) for f in CHUNK_FIELDS})
        self._apply_add(store, chunks, min_seq)
        self._snapshot_if_due()
        return store.live

    def reset(self, store_id: str) -> None:
        self.get(store_id)
        self._log({"op": "reset", "store": store_id})
        self.stores[store_id].reset()
        self._snapshot_if_due()

    def delete(self, store_id: str) -> None:
        if store_id in self.stores:
            self._log({"op": "delete", "store": store_id})
            del self.stores[store_id]
            self._snapshot_if_due()

    # ---- applying -------------------------------------------------------------------------------
    def _apply_create(self, store_id: str, capacity: int) -> None:
        self.stores[store_id] = ChunkStore(capacity, *self.dims, self.dtype)

    @staticmethod
    def _apply_add(store: ChunkStore, chunks: Chunks, min_seq: int) -> None:
        if len(chunks):
            store.add(chunks)
        store.evict_before(min_seq)

    def _replay(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        op, store_id = meta["op"], meta["store"]
        if op == "create":
            if store_id not in self.stores:
                self._apply_create(store_id, meta["capacity"])
        elif op == "add":
            self._apply_add(self.stores[store_id], Chunks(*(arrays[f] for f in CHUNK_FIELDS)), meta["min_seq"])
        elif op == "reset":
            self.stores[store_id].reset()
        elif op == "delete":
            self.stores.pop(store_id, None)
        else:
            raise ValueError(f"unknown log record {op!r}")

    # ---- durability -----------------------------------------------------------------------------
    def _log(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Writes a change to the log; the caller applies it only after this returns."""
        if self.wal is not None:
            self.wal.append(pack_arrays(arrays or {}, meta))
            self.since_snapshot += 1

    def _snapshot_if_due(self) -> None:
        """After a change is applied: a snapshot then covers every logged change."""
        if self.wal is not None and self.since_snapshot >= self.snapshot_every:
            self.snapshot()

    def snapshot(self, lsn: int | None = None) -> None:
        """Writes every store at log position `lsn` (default: the newest), then truncates the log."""
        if self.storage is None:
            return
        lsn = self.wal.next_lsn - 1 if lsn is None else lsn
        folder = f"snapshots/{lsn:016d}"
        ids = list(self.stores)
        for i, store_id in enumerate(ids):
            self.storage.write(f"{folder}/{i}.npz", pack_arrays(*self.stores[store_id].state()))
        self.storage.write(f"{folder}/stores.json", json.dumps(ids).encode())
        self.storage.write("SNAPSHOT", str(lsn).encode())  # the snapshot counts from here on
        self.wal.truncate(lsn)
        for old in self.storage.list("snapshots"):
            if old.isdigit() and int(old) < lsn:
                self.storage.delete(f"snapshots/{old}")
        self.snapshot_lsn, self.since_snapshot = lsn, 0

    def restore(self) -> int:
        """Loads the newest snapshot and replays the log after it. Returns records replayed."""
        if self.storage is None:
            return 0
        self.stores = {}
        if self.storage.exists("SNAPSHOT"):
            self.snapshot_lsn = int(self.storage.read("SNAPSHOT"))
            folder = f"snapshots/{self.snapshot_lsn:016d}"
            for i, store_id in enumerate(json.loads(self.storage.read(f"{folder}/stores.json"))):
                self.stores[store_id] = ChunkStore.from_state(*unpack_arrays(self.storage.read(f"{folder}/{i}.npz")))
        self.wal.next_lsn = max(self.wal.next_lsn, self.snapshot_lsn + 1)  # numbering goes on past a truncation
        replayed = 0
        for _, payload in self.wal.records(after=self.snapshot_lsn):
            arrays, meta = unpack_arrays(payload)
            self._replay(meta, arrays)
            replayed += 1
        self.since_snapshot = replayed
        log.info("restored %d stores from snapshot %d and %d log records", len(self.stores), self.snapshot_lsn, replayed)
        return replayed
