"""Write-ahead log, snapshots and restore of chunk stores (no Ray): a restored store set answers
every search exactly as the one that crashed, and a torn log record is as if never written."""

from __future__ import annotations

import numpy as np
import pytest

from longmem.durable import StoreSet
from longmem.memory import Chunker, ChunkStore
from longmem.storage import HEADER, Storage, WriteAheadLog

C, HKV, D, HQ = 4, 2, 8, 4


def make_chunks(chunker: Chunker, n: int, rng):
    keys, values = rng.standard_normal((2, n, HKV, D)).astype(np.float32)
    return chunker.push(keys, values, rng.integers(0, 100, n).astype(np.int32), skip_first=1)


def assert_same_answers(a: StoreSet, b: StoreSet, rng) -> None:
    assert set(a.stores) == set(b.stores)
    queries = rng.standard_normal((3, HQ, D)).astype(np.float32)
    for store_id, store in a.stores.items():
        other = b.stores[store_id]
        assert (store.live, store.evicted, store.head, store.filled, store.last_seq) == \
               (other.live, other.evicted, other.head, other.filled, other.last_seq)
        for k in (1, 5, store.capacity):
            x, y = store.search(queries, k), other.search(queries, k)
            np.testing.assert_array_equal(x.seqs, y.seqs)
            np.testing.assert_array_equal(x.scores, y.scores)
            np.testing.assert_array_equal(x.keys, y.keys)
            np.testing.assert_array_equal(x.positions, y.positions)


def fill(stores: StoreSet, rng, rounds: int = 12) -> None:
    chunkers = {}
    for i in range(rounds):
        store_id = f"m{i % 3}"
        if store_id not in stores.stores:
            stores.create(store_id, 6 + i)
            chunkers[store_id] = Chunker(C, HKV, D)
        chunker = chunkers.setdefault(store_id, Chunker(C, HKV, D))
        stores.add(store_id, make_chunks(chunker, int(rng.integers(3, 30)), rng), chunker.next_seq - 10)
    stores.delete("m1")  # a memory's next incarnation is a new store
    stores.create("m1@2", 9)
    stores.add("m1@2", make_chunks(Chunker(C, HKV, D), 9, rng), 0)


@pytest.mark.parametrize("snapshot_every", [1000, 5, 1])
def test_restore_answers_exactly_as_before_the_crash(tmp_path, snapshot_every):
    rng = np.random.default_rng(snapshot_every)
    live = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)), snapshot_every=snapshot_every)
    fill(live, rng)
    live.delete("m2")
    restored = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)), snapshot_every=snapshot_every)
    replayed = restored.restore()
    assert replayed < snapshot_every
    assert_same_answers(live, restored, rng)
    # numbering and logging go on after a restore, and a second restore still agrees
    chunker = Chunker(C, HKV, D)
    chunker.next_seq = restored.stores["m0"].last_seq + 1
    restored.add("m0", make_chunks(chunker, 11, rng), chunker.next_seq - 8)
    assert restored.stores["m0"].last_seq == chunker.next_seq - 1
    again = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)), snapshot_every=snapshot_every)
    again.restore()
    assert_same_answers(restored, again, rng)


@pytest.mark.parametrize("snapshot_every", [1000, 3])
def test_a_restored_approximate_store_answers_exactly_as_before_the_crash(tmp_path, snapshot_every):
    """Stores past ApproxSearch.min_chunks search through IVF lists and hot sets: after a restore (from
    a snapshot holding the IVF centroids, or by replaying the log across the threshold, which trains
    the same centroids) every search gives the same hits."""
    from longmem.memory import ApproxSearch

    approx = ApproxSearch(min_chunks=40, lists_per_sqrt=1.0, probe=2, query_clusters=2, hot_chunks=8,
                          kmeans_iterations=4)
    rng = np.random.default_rng(snapshot_every)
    live = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)), snapshot_every=snapshot_every, approx=approx)
    live.create("big", 200)
    chunker = Chunker(C, HKV, D)
    for _ in range(12):  # ~60 chunks at a time: crosses 40, then wraps the ring
        live.add("big", make_chunks(chunker, int(rng.integers(200, 280)), rng), chunker.next_seq - 200)
    assert live.stores["big"].ivf is not None and live.stores["big"].evicted > 0
    restored = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)), snapshot_every=snapshot_every, approx=approx)
    restored.restore()
    assert restored.stores["big"].ivf is not None
    assert_same_answers(live, restored, rng)


def test_replaying_an_add_twice_changes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    store = ChunkStore(8, C, HKV, D)
    chunker = Chunker(C, HKV, D)
    chunks = make_chunks(chunker, 20, rng)
    store.add(chunks)
    state = [a.copy() for a in store.state()[0].values()]
    store.add(chunks)
    store.add(chunks.select(slice(2, None)))
    assert all(np.array_equal(a, b) for a, b in zip(state, store.state()[0].values()))
    assert store.last_seq == chunks.seqs[-1]


def test_store_state_round_trip_rebuilds_an_identical_index():
    rng = np.random.default_rng(4)
    store = ChunkStore(7, C, HKV, D, dtype=np.float16)
    chunker = Chunker(C, HKV, D, np.float16)
    for n in (9, 17, 23):
        store.add(make_chunks(chunker, n, rng))
    store.evict_before(chunker.next_seq - 5)
    copy = ChunkStore.from_state(*store.state())
    q = rng.standard_normal((2, HQ, D)).astype(np.float32)
    a, b = store.search(q, 7), copy.search(q, 7)
    np.testing.assert_array_equal(a.seqs, b.seqs)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_torn_or_missing_log_records_stop_the_replay(tmp_path):
    storage = Storage(str(tmp_path))
    wal = WriteAheadLog(storage)
    for i in range(5):
        wal.append(f"record {i}".encode())
    assert [p for _, p in wal.records()] == [f"record {i}".encode() for i in range(5)]
    data = storage.read("wal/0000000000000004")
    storage.write("wal/0000000000000004", data[:-2])  # torn: shorter than its header says
    assert [lsn for lsn, _ in wal.records()] == [1, 2, 3]
    storage.write("wal/0000000000000004", HEADER.pack(len(data) - HEADER.size, 0) + data[HEADER.size:])
    assert [lsn for lsn, _ in wal.records()] == [1, 2, 3]  # bad checksum
    storage.delete("wal/0000000000000002")
    assert [lsn for lsn, _ in wal.records()] == [1]  # a gap ends the log
    wal.truncate(3)
    assert wal.lsns() == [4, 5]
    assert WriteAheadLog(storage).next_lsn == 6


def test_an_unlogged_change_is_wholly_absent_after_restore(tmp_path):
    rng = np.random.default_rng(5)
    live = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)))
    live.create("m", 16)
    chunker = Chunker(C, HKV, D)
    live.add("m", make_chunks(chunker, 21, rng), 0)
    acknowledged = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)))
    acknowledged.restore()
    # a crash while writing the next record: its file is torn, so the whole add is absent
    live.add("m", make_chunks(chunker, 13, rng), 0)
    storage = live.journal.storage
    last = max(live.journal.wal.lsns())
    torn = storage.read(f"wal/{last:016d}")
    storage.write(f"wal/{last:016d}", torn[: len(torn) // 2])
    restored = StoreSet(C, HKV, D, storage=Storage(str(tmp_path)))
    restored.restore()
    assert_same_answers(acknowledged, restored, rng)
