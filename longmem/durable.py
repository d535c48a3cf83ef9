"""State that survives a crash: a journal (write-ahead log + snapshots), and the chunk stores a
memory shard holds, kept in one.

`Journal` is the one durability mechanism of the project; the bank (longmem/striped.py) and every
shard keep their state in one each. A change is logged before it is applied and before its caller
hears back; every `snapshot_every` records the owner writes a snapshot and the log is truncated.
`restore` is the owner's: it reads the newest snapshot and replays the records after it.

Layout under a storage root: `wal/<lsn>`, `snapshots/<lsn>/<file>` and `SNAPSHOT` naming the newest
complete snapshot.

`StoreSet` is what a shard holds: chunk stores by id within a byte budget (a store is reserved at its
full capacity when created). Replays are idempotent: creates and deletes by id, adds by chunk seq.
Store ids are never reused (the bank names each incarnation of a memory anew), so a record replayed
twice, or after the store was deleted, changes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import numpy as np

from .memory import CHUNK_FIELDS, EXACT, ApproxSearch, CapacityExceeded, Chunks, ChunkStore, MemoryNotFound
from .storage import Storage, WriteAheadLog, pack_arrays, unpack_arrays

log = logging.getLogger("longmem.durable")


class Journal:
    """A write-ahead log with snapshots on one storage location."""

    def __init__(self, storage: Storage, snapshot_every: int):
        self.storage = storage
        self.snapshot_every = snapshot_every
        self.wal = WriteAheadLog(storage)
        self.snapshot_lsn = 0
        self.since_snapshot = 0

    def log(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Writes one change durably; the caller applies it only after this returns."""
        self.wal.append(pack_arrays(arrays or {}, meta))
        self.since_snapshot += 1

    @property
    def due(self) -> bool:
        return self.since_snapshot >= self.snapshot_every

    def snapshot(self, files: dict[str, bytes]) -> None:
        """Writes the owner's whole state as of the newest record, then truncates the log."""
        lsn = self.wal.next_lsn - 1
        folder = f"snapshots/{lsn:016d}"
        for name, data in files.items():
            self.storage.write(f"{folder}/{name}", data)
        self.storage.write("SNAPSHOT", str(lsn).encode())  # the snapshot counts from here on
        self.wal.truncate(lsn)
        for old in self.storage.list("snapshots"):
            if old.isdigit() and int(old) < lsn:
                self.storage.delete(f"snapshots/{old}")
        self.snapshot_lsn, self.since_snapshot = lsn, 0

    def open(self) -> bool:
        """Finds the newest snapshot; False when there is none. Numbering goes on past a truncation."""
        found = self.storage.exists("SNAPSHOT")
        self.snapshot_lsn = int(self.storage.read("SNAPSHOT")) if found else 0
        self.wal.next_lsn = max(self.wal.next_lsn, self.snapshot_lsn + 1)
        self.since_snapshot = 0
        return found

    def read(self, name: str) -> bytes:
        """A file of the snapshot `open` found."""
        return self.storage.read(f"snapshots/{self.snapshot_lsn:016d}/{name}")

    def records(self) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
        """(meta, arrays) of each logged change after the snapshot, in order."""
        for _, payload in self.wal.records(after=self.snapshot_lsn):
            arrays, meta = unpack_arrays(payload)
            self.since_snapshot += 1
            yield meta, arrays


class StoreSet:
    def __init__(self, chunk_size: int, num_kv_heads: int, head_dim: int, dtype="float32",
                 storage: Storage | None = None, snapshot_every: int = 256, budget_bytes: int | None = None,
                 approx: ApproxSearch = EXACT):
        self.dims = (chunk_size, num_kv_heads, head_dim)
        self.dtype = np.dtype(dtype)
        self.approx = approx
        self.budget_bytes = budget_bytes
        self.stores: dict[str, ChunkStore] = {}
        self.journal = Journal(storage, snapshot_every) if storage else None

    # ---- budget ---------------------------------------------------------------------------------
    def bytes_for(self, capacity_chunks: int) -> int:
        return ChunkStore.bytes_for(capacity_chunks, *self.dims, self.dtype, self.approx)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.nbytes for s in self.stores.values())

    def free_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.reserved_bytes

    # ---- operations (logged, then applied) -------------------------------------------------------
    def get(self, store_id: str) -> ChunkStore:
        try:
            return self.stores[store_id]
        except KeyError:
            raise MemoryNotFound(f"store '{store_id}' does not exist") from None

    def create(self, store_id: str, capacity_chunks: int) -> ChunkStore:
        """Creates a store reserved at its full capacity (CapacityExceeded past the budget); idempotent."""
        if store_id not in self.stores:
            free = self.free_bytes()
            need = self.bytes_for(capacity_chunks)
            if free is not None and need > free:
                raise CapacityExceeded(f"{free:,} bytes free, a store of {capacity_chunks:,} chunks needs {need:,}")
            self._change({"op": "create", "store": store_id, "capacity": capacity_chunks})
        return self.stores[store_id]

    def add(self, store_id: str, chunks: Chunks, min_seq: int) -> int:
        """Adds chunks and evicts those older than min_seq. Returns the store's live chunk count."""
        store = self.get(store_id)
        c, hkv, d = self.dims
        if chunks.keys.shape[1:] != (hkv, c, d) or chunks.values.shape != chunks.keys.shape:
            raise ValueError(f"chunks must be [n, {hkv}, {c}, {d}], got {tuple(chunks.keys.shape)}")
        self._change({"op": "add", "store": store_id, "min_seq": int(min_seq)},
                     {f: getattr(chunks, f) for f in CHUNK_FIELDS})
        return store.live

    def delete(self, store_id: str) -> None:
        if store_id in self.stores:
            self._change({"op": "delete", "store": store_id})

    def sync(self, capacity_chunks: dict[str, int]) -> dict[str, int]:
        """Keeps exactly the stores named (deleting the others first, then creating what is missing).
        Returns each kept store's newest seq."""
        for store_id in [s for s in self.stores if s not in capacity_chunks]:
            self.delete(store_id)
        for store_id, capacity in capacity_chunks.items():
            self.create(store_id, capacity)
        return {store_id: self.stores[store_id].last_seq for store_id in capacity_chunks}

    # ---- applying -------------------------------------------------------------------------------
    def _change(self, meta: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        if self.journal is not None:
            self.journal.log(meta, arrays)
        self._apply(meta, arrays or {})
        if self.journal is not None and self.journal.due:
            self.snapshot()

    def _apply(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        op, store_id = meta["op"], meta["store"]
        if op == "create":
            if store_id not in self.stores:
                self.stores[store_id] = ChunkStore(meta["capacity"], *self.dims, self.dtype, self.approx)
        elif op == "add":
            store = self.stores.get(store_id)
            if store is not None:
                chunks = Chunks(*(arrays[f] for f in CHUNK_FIELDS))
                if len(chunks):
                    store.add(chunks)
                store.evict_before(meta["min_seq"])
        elif op == "delete":
            self.stores.pop(store_id, None)
        else:
            raise ValueError(f"unknown log record {op!r}")

    # ---- durability -----------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Writes every store as of the newest record, then truncates the log."""
        if self.journal is None:
            return
        ids = list(self.stores)
        files = {f"{i}.npz": pack_arrays(*self.stores[store_id].state()) for i, store_id in enumerate(ids)}
        self.journal.snapshot({**files, "stores.json": json.dumps(ids).encode()})

    def restore(self) -> int:
        """Loads the newest snapshot and replays the log after it. Returns records replayed."""
        if self.journal is None:
            return 0
        self.stores = {}
        if self.journal.open():
            for i, store_id in enumerate(json.loads(self.journal.read("stores.json"))):
                self.stores[store_id] = ChunkStore.from_state(*unpack_arrays(self.journal.read(f"{i}.npz")), self.approx)
        for meta, arrays in self.journal.records():
            self._apply(meta, arrays)
        replayed = self.journal.since_snapshot
        log.info("restored %d stores from snapshot %d and %d log records", len(self.stores),
                 self.journal.snapshot_lsn, replayed)
        return replayed
