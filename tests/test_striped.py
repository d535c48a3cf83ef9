"""The striped bank's durability, Ray-free: restores converge to the acknowledged state whatever the
interleaving of create, append, reset, delete, snapshots and crashes of the bank and of each shard."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from longmem.durable import StoreSet
from longmem.memory import (NO_POSITION, NO_SEQ, CapacityExceeded, ChunkHits, ChunkStore, Memory, MemoryExists, MemoryNotFound,
                            ShardUnavailable, merge_hits)
from longmem.storage import Storage, StorageConflict, StorageLock, StorageLocked, StorageMismatch, WriteAheadLog
from longmem.striped import StripedBank, search_routes

C, HKV, D, HQ = 2, 1, 4, 2
SHARDS = ("s0", "s1", "s2")


class Crash(Exception):
    """The bank's process dies: the call never returns and the bank object is thrown away."""


class LocalShard:
    """The core's ShardClient over an in-process StoreSet, like RayShard over a shard actor: a shard
    that crashes mid-change is restarted from its storage and the call re-sent (idempotent)."""

    def __init__(self, root, budget_bytes: int, snapshot_every: int):
        self.root, self.budget_bytes, self.snapshot_every = root, budget_bytes, snapshot_every
        self.crash_after_log = False  # the shard dies between its log write and applying it
        self.bank_dies_at: int | None = None  # the bank dies at its n-th call from now
        self.restart()

    def restart(self) -> None:
        self.stores = StoreSet(C, HKV, D, storage=Storage(str(self.root)), snapshot_every=self.snapshot_every,
                               budget_bytes=self.budget_bytes)
        self.stores.restore()

    def _call(self, method, *args):
        if self.bank_dies_at is not None:
            self.bank_dies_at -= 1
            if self.bank_dies_at < 0:
                raise Crash()
        if self.crash_after_log:
            self.crash_after_log = False
            apply = self.stores._apply

            def die(meta, arrays):
                self.stores._apply = apply
                raise Crash()

            self.stores._apply = die
            try:
                return method(*args)
            except Crash:
                self.restart()  # the actor restarts; the bank's adapter re-sends
                method = getattr(self.stores, method.__name__)
            finally:
                if self.stores._apply is die:  # it did not apply anything: no crash to have
                    self.stores._apply = apply
        return method(*args)

    async def create(self, store_id, capacity_chunks):
        self._call(self.stores.create, store_id, capacity_chunks)

    async def add(self, store_id, chunks, min_seq):
        self._call(self.stores.add, store_id, chunks, min_seq)

    async def delete(self, store_id):
        self._call(self.stores.delete, store_id)

    async def sync(self, capacity_chunks):
        return self._call(self.stores.sync, capacity_chunks)

    async def free_bytes(self):
        return self.stores.free_bytes()


def run(coro):
    return asyncio.run(coro)


def search(bank: StripedBank, shards: dict[str, LocalShard], memory_ids: list[list[str]], queries, k):
    """A reader's search: routes from the bank, then every store searched on its shard (search_routes)."""
    def stores(calls, k_chunks):
        return [shards[name].stores.get(store_id).search(q, k_chunks) for name, store_id, q in calls]
    return search_routes(stores, run(bank.routes(memory_ids)), queries, k, C, np.float32)


def make_bank(root, shards, snapshot_every: int, request_window: int = 8) -> StripedBank:
    return StripedBank(shards, C, HKV, D, default_capacity=16, default_shards=1,
                       storage=Storage(str(root / "bank")), snapshot_every=snapshot_every,
                       request_window=request_window)


def live_chunks(store: ChunkStore) -> dict[int, tuple]:
    out = {}
    for i in range(store.live):
        slot = (store.head - 1 - i) % store.capacity
        out[int(store.seqs[slot])] = (store.token_ids[slot].tolist(), store.positions[slot].tolist(),
                                      store.keys[slot].tobytes(), store.values[slot].tobytes())
    return out


def tokens(rng, n):
    keys, values = rng.standard_normal((2, n, HKV, D)).astype(np.float32)
    return keys, values, rng.integers(0, 1000, n).astype(np.int32)


def assert_agrees(bank: StripedBank, shards: dict[str, LocalShard], model: dict[str, Memory]) -> None:
    """The bank holds exactly the model's memories, each with the model's live chunks and counters,
    and every shard holds exactly the stores of live memories (nothing forgotten keeps budget)."""
    assert set(bank.memories) == set(model)
    for memory_id, ref in model.items():
        p = bank.memories[memory_id]
        got = {}
        for name in p.shards:
            got.update(live_chunks(shards[name].stores.stores[p.store_id]))
        assert got == live_chunks(ref.store), memory_id
        stats, want = p.stats(), ref.stats()
        assert (stats.tokens_held, stats.tokens_evicted, stats.tokens_appended, stats.pending_tokens) == \
               (want.tokens_held, want.tokens_evicted, want.tokens_appended, want.pending_tokens)
    for name, shard in shards.items():
        assert set(shard.stores.stores) == {p.store_id for p in bank.memories.values() if name in p.shards}


def test_the_reported_restart_keeps_b_and_forgets_a(tmp_path):
    """Issue 11's reproduction: A with 18 appends (a snapshot at record 16), A deleted, B created with
    5 appends; after a restart B is there with its appends, A is gone and a new memory can be made."""
    rng = np.random.default_rng(0)
    shards = {n: LocalShard(tmp_path / n, 10**6, 16) for n in SHARDS[:2]}
    bank = make_bank(tmp_path, shards, 16)
    model = {}
    run(bank.create("A", 32, 2))
    for _ in range(18):
        run(bank.append("A", *tokens(rng, 5), skip_first=1))
    run(bank.delete("A"))
    run(bank.create("B", 32, 2))
    model["B"] = Memory("B", 32, C, HKV, D)
    for _ in range(5):
        keys, values, ids = tokens(rng, 7)
        run(bank.append("B", keys, values, ids, skip_first=1))
        model["B"].append(keys, values, ids, skip_first=1)
    before = run(bank.stats("B"))

    for shard in shards.values():
        shard.restart()
    bank = make_bank(tmp_path, shards, 16)
    assert [m.memory_id for m in run(bank.list())] == ["B"]
    assert run(bank.stats("B")) == before
    assert_agrees(bank, shards, model)
    run(bank.create("C", 8, 2))
    run(bank.create("A", 8, 1))  # a new incarnation of A: empty, and none of the old chunks
    assert run(bank.stats("A")).tokens_appended == 0


def test_a_memory_recreated_after_delete_holds_only_its_new_chunks(tmp_path):
    rng = np.random.default_rng(1)
    shards = {n: LocalShard(tmp_path / n, 10**6, 100) for n in SHARDS}
    bank = make_bank(tmp_path, shards, 100)
    run(bank.create("m", 16, 3))
    for _ in range(4):
        run(bank.append("m", *tokens(rng, 6)))
    run(bank.delete("m"))
    run(bank.create("m", 16, 3))
    keys, values, ids = tokens(rng, 6)
    run(bank.append("m", keys, values, ids))
    ref = Memory("m", 16, C, HKV, D)
    ref.append(keys, values, ids)
    assert_agrees(bank, shards, {"m": ref})
    queries = rng.standard_normal((1, 3, HQ, D)).astype(np.float32)
    (hits,) = search(bank, shards, [["m"]], queries, 8)
    np.testing.assert_array_equal(np.sort(hits.seqs, axis=2), np.sort(ref.search(queries[0], 8).seqs, axis=2))


def test_a_refused_change_is_not_logged_and_moves_no_counter(tmp_path):
    rng = np.random.default_rng(2)
    shards = {n: LocalShard(tmp_path / n, 10**6, 100) for n in SHARDS}
    bank = make_bank(tmp_path, shards, 100)
    run(bank.create("m", 16, 2))
    records = len(WriteAheadLog(Storage(str(tmp_path / "bank"))).lsns())
    keys, values, ids = tokens(rng, 6)
    with pytest.raises(ValueError):
        run(bank.append("m", keys[:, :, :2], values, ids))  # wrong head dim
    with pytest.raises(MemoryNotFound):
        run(bank.append("gone", keys, values, ids))
    with pytest.raises(MemoryExists):
        run(bank.create("m", 16, 2))
    with pytest.raises(CapacityExceeded):
        run(bank.create("huge", 10**6, 3))
    assert len(WriteAheadLog(Storage(str(tmp_path / "bank"))).lsns()) == records
    assert run(bank.stats("m")).tokens_appended == 0
    for shard in shards.values():  # the refused create's stores are freed
        assert all(not s.startswith("huge@") for s in shard.stores.stores)


def striped_memory(tmp_path, seed: int) -> dict[str, LocalShard]:
    """Shards holding memory "m" of 9 tokens striped over all of them, written by a bank since gone."""
    shards = {n: LocalShard(tmp_path / n, 10**6, 100) for n in SHARDS}
    bank = make_bank(tmp_path, shards, 100)
    run(bank.create("m", 16, len(SHARDS)))
    run(bank.append("m", *tokens(np.random.default_rng(seed), 9)))
    return shards


def test_a_restore_that_cannot_finish_serves_nothing_and_is_retried(tmp_path):
    shards = striped_memory(tmp_path, 3)
    bank = make_bank(tmp_path, shards, 100)
    shards["s1"].sync = _unavailable
    with pytest.raises(ShardUnavailable, match="restoring"):
        run(bank.list())
    assert bank.memories == {} and not bank.restored
    del shards["s1"].sync
    assert [m.memory_id for m in run(bank.list())] == ["m"]


def test_a_storage_striped_over_shards_this_server_lacks_is_refused_for_good(tmp_path):
    shards = striped_memory(tmp_path, 4)
    fewer = make_bank(tmp_path, {n: shards[n] for n in SHARDS[:2]}, 100)
    for _ in range(2):  # not a restore to retry: every call is refused, nothing is lost
        with pytest.raises(StorageMismatch, match="shards s2.*serve.num_shards"):
            run(fewer.list())
    again = make_bank(tmp_path, shards, 100)
    assert run(again.stats("m")).tokens_appended == 9


async def _unavailable(*args):
    raise ShardUnavailable("a memory shard is unavailable; retry in a few seconds")


class BankMachine(RuleBasedStateMachine):
    """Random create/append/reset/delete with small snapshot intervals, bank crashes at any shard call
    of a change (after its log write, or before it for a create), shard crashes between their log
    write and applying it, and restarts of the bank and of each shard, against plain in-process
    memories. After every restart the restored bank must equal the model."""

    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path

        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        self.rng = np.random.default_rng(0)
        self.model: dict[str, Memory] = {}

    @initialize(snapshot_every=st.sampled_from([2, 3, 5, 50]))
    def start(self, snapshot_every):
        self.snapshot_every = snapshot_every
        self.shards = {n: LocalShard(self.root / n, 4_000, snapshot_every) for n in SHARDS}
        self.bank = make_bank(self.root, self.shards, snapshot_every)

    def teardown(self):
        self.tmp.cleanup()

    def _restart_bank(self) -> None:
        for shard in self.shards.values():
            shard.bank_dies_at, shard.crash_after_log = None, False
        self.bank = make_bank(self.root, self.shards, self.snapshot_every)
        run(self.bank.ready())

    def _crashing(self, crash_at, change, resolve) -> None:
        """Runs a change; with crash_at set, the bank dies at that shard call, restarts, and the model
        takes the change if the restored bank shows it (a change whose call never returned may go either
        way, but wholly)."""
        run(self.bank.ready())
        if crash_at is not None:
            for shard in self.shards.values():
                shard.bank_dies_at = crash_at
        try:
            run(change())
        except Crash:
            self._restart_bank()
            resolve(ambiguous=True)
            self._check()
            return
        for shard in self.shards.values():
            shard.bank_dies_at = None
        resolve(ambiguous=False)

    @rule(memory_id=st.sampled_from("abcd"), capacity=st.sampled_from([4, 8, 16]), s=st.integers(1, 3),
          crash_at=st.none() | st.integers(0, 4))
    def create(self, memory_id, capacity, s, crash_at):
        if memory_id in self.model:
            with pytest.raises(MemoryExists):
                run(self.bank.create(memory_id, capacity, s))
            return

        def resolve(ambiguous):
            if not ambiguous or memory_id in self.bank.memories:
                self.model[memory_id] = Memory(memory_id, capacity, C, HKV, D)
        try:
            self._crashing(crash_at, lambda: self.bank.create(memory_id, capacity, s), resolve)
        except CapacityExceeded:
            assert memory_id not in self.bank.memories

    @precondition(lambda self: self.model)
    @rule(data=st.data(), n=st.integers(1, 9), skip=st.integers(0, 2), crash_at=st.none() | st.integers(0, 3),
          shard_dies=st.sampled_from((None, *SHARDS)))
    def append(self, data, n, skip, crash_at, shard_dies):
        memory_id = data.draw(st.sampled_from(sorted(self.model)))
        keys, values, ids = tokens(self.rng, n)
        before = self.model[memory_id].stats().tokens_appended
        if shard_dies is not None:
            self.shards[shard_dies].crash_after_log = True

        def resolve(ambiguous):
            if not ambiguous or self.bank.memories[memory_id].stats().tokens_appended != before:
                self.model[memory_id].append(keys, values, ids, skip)
        self._crashing(crash_at, lambda: self.bank.append(memory_id, keys, values, ids, skip), resolve)
        for shard in self.shards.values():
            shard.crash_after_log = False

    @precondition(lambda self: self.model)
    @rule(data=st.data(), crash_at=st.none() | st.integers(0, 3))
    def reset(self, data, crash_at):
        memory_id = data.draw(st.sampled_from(sorted(self.model)))
        old = self.bank.memories[memory_id].store_id

        def resolve(ambiguous):
            if not ambiguous or self.bank.memories[memory_id].store_id != old:
                self.model[memory_id].reset()
        self._crashing(crash_at, lambda: self.bank.reset(memory_id), resolve)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), crash_at=st.none() | st.integers(0, 3))
    def delete(self, data, crash_at):
        memory_id = data.draw(st.sampled_from(sorted(self.model)))

        def resolve(ambiguous):
            if not ambiguous or memory_id not in self.bank.memories:
                del self.model[memory_id]
        self._crashing(crash_at, lambda: self.bank.delete(memory_id), resolve)

    @rule()
    def restart_bank(self):
        self._restart_bank()
        self._check()

    @rule(name=st.sampled_from(SHARDS), bank_too=st.booleans())
    def restart_shard(self, name, bank_too):
        self.shards[name].restart()
        if bank_too:
            self._restart_bank()
        run(self.bank.list())
        self._check()

    @invariant()
    def striped_search_is_one_flat_index(self):
        """Striped search (the bank's routes, each store searched, hits merged) == one flat index over
        the union of a row's memories; rows: all memories, each one alone, none."""
        if not (hasattr(self, "bank") and self.bank.restored):
            return
        rows = [sorted(self.model), *([m] for m in sorted(self.model)), []]
        queries = self.rng.standard_normal((len(rows), 3, HQ, D)).astype(np.float32)
        k = 5  # more than some memories hold
        for ids, q, got in zip(rows, queries, search(self.bank, self.shards, rows, queries, k)):
            want = merge_hits([self.model[m].search(q, k) for m in ids] or [ChunkHits.empty(3, HQ, k, C, D, np.float32)], k)
            np.testing.assert_array_equal(got.seqs != NO_SEQ, want.seqs != NO_SEQ)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
            if len(ids) == 1:  # one memory: the same chunks (seqs are per memory)
                np.testing.assert_array_equal(np.sort(got.seqs, axis=2), np.sort(want.seqs, axis=2))

    def _check(self):
        assert_agrees(self.bank, self.shards, self.model)

    @invariant()
    def counters_agree(self):
        if hasattr(self, "bank") and self.bank.restored:
            for memory_id, ref in self.model.items():
                assert self.bank.memories[memory_id].stats().tokens_appended == ref.stats().tokens_appended


BankMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_bank_restores_converge = BankMachine.TestCase


def test_a_log_record_is_never_overwritten(tmp_path):
    storage = Storage(str(tmp_path))
    first, second = WriteAheadLog(storage), WriteAheadLog(storage)  # two writers that both think lsn 1 is next
    first.append(b"acknowledged")
    with pytest.raises(StorageConflict):
        second.append(b"would replace it")
    assert [payload for _, payload in WriteAheadLog(storage).records()] == [b"acknowledged"]


def test_one_live_server_per_storage_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys
    import time

    storage = Storage(str(tmp_path))
    holder = StorageLock(storage, {"server": "one"}, stale_after_s=30)
    holder.acquire()
    other = StorageLock(storage, {"server": "two"}, stale_after_s=30)
    with pytest.raises(StorageLocked, match="server one"):
        other.acquire()
    StorageLock(storage, {"server": "one"}, stale_after_s=30).acquire()  # the same server, restarted

    # a crashed holder on this host: its process is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    crashed = StorageLock(storage, {"server": "crashed"}, stale_after_s=30)
    crashed.holder["pid"] = int(dead.stdout)
    storage.write("LOCK", crashed._record())
    other.acquire()
    assert other.current()["server"] == "two"
    # a silent holder on another host: its heartbeat is older than stale_after_s
    remote = StorageLock(storage, {"server": "remote"}, stale_after_s=30)
    remote.holder["host"] = "elsewhere"
    storage.write("LOCK", remote._record())
    with pytest.raises(StorageLocked, match="remote"):
        other.acquire()
    record = remote.current()
    record["beat"] = time.time() - 31
    import json

    storage.write("LOCK", json.dumps(record).encode())
    other.acquire()
    assert other.current()["server"] == "two"
    with pytest.raises(StorageLocked):
        holder.refresh()  # the old holder learns it lost the lock
    other.release()
    assert other.current() is None


@pytest.mark.parametrize("snapshot_every", [1, 100])
def test_a_retried_append_is_applied_once_across_a_crash_after_its_log_write(tmp_path, snapshot_every):
    """The bank dies after logging an append, before any shard has it and before it answers; the
    client resends it with the same request id to the restarted bank: the memory holds it once. Its
    id survives a snapshot too; an id that left the window is an append like any other."""
    rng = np.random.default_rng(5)
    shards = {n: LocalShard(tmp_path / n, 10**6, 100) for n in SHARDS}
    bank = make_bank(tmp_path, shards, snapshot_every, request_window=2)
    run(bank.create("m", 16, 3))
    ref = Memory("m", 16, C, HKV, D)
    first, second = tokens(rng, 6), tokens(rng, 5)
    run(bank.append("m", *first, request_id="r1"))
    ref.append(*first)
    for shard in shards.values():
        shard.bank_dies_at = 0  # the next shard call: after the log write
    with pytest.raises(Crash):
        run(bank.append("m", *second, request_id="r2"))
    for shard in shards.values():
        shard.bank_dies_at = None
    bank = make_bank(tmp_path, shards, snapshot_every, request_window=2)
    run(bank.append("m", *second, request_id="r2"))  # the retry: applied already, now carried to the shards
    run(bank.append("m", *first, request_id="r1"))  # a late duplicate of the first
    ref.append(*second)
    assert_agrees(bank, shards, {"m": ref})
    third = tokens(rng, 3)
    run(bank.append("m", *third, request_id="r3"))  # r1 leaves the window of 2
    ref.append(*third)
    run(bank.append("m", *first, request_id="r1"))
    ref.append(*first)
    bank = make_bank(tmp_path, shards, snapshot_every, request_window=2)
    run(bank.ready())
    assert_agrees(bank, shards, {"m": ref})


@pytest.mark.parametrize("snapshot_every", [1, 100])
def test_temporary_memories_of_a_dead_owner_make_room_across_a_restart(tmp_path, snapshot_every):
    """A replica that dies mid-request leaves its scratch memory behind: when the shards are full, the
    bank deletes temporary memories whose owner is gone (also after a restart: the owner is logged),
    and nothing else, then creates the memory."""
    rng = np.random.default_rng(4)
    budget = 2 * ChunkStore.bytes_per_chunk(C, HKV, D, np.float32) * 8  # per shard: two 8-chunk stores
    shards = {n: LocalShard(tmp_path / n, budget, 100) for n in SHARDS}
    alive = {"replica-a": True, "replica-b": True}

    async def owner_alive(owner: str) -> bool:
        return alive[owner]

    def bank():
        return StripedBank(shards, C, HKV, D, default_capacity=16, default_shards=1,
                           storage=Storage(str(tmp_path / "bank")), snapshot_every=snapshot_every,
                           owner_alive=owner_alive)

    striped = bank()
    run(striped.create("user", 8 * C * len(SHARDS), len(SHARDS)))
    run(striped.create("scratch-a", 8 * C * len(SHARDS), len(SHARDS), owner="replica-a"))
    for memory_id in ("user", "scratch-a"):
        run(striped.append(memory_id, *tokens(rng, 6)))
    with pytest.raises(CapacityExceeded):  # full, and every owner lives
        run(striped.create("next", 8 * C, 1))
    alive["replica-a"] = False
    striped = bank()  # a restart: ownership comes from the log
    run(striped.create("next", 8 * C, 1, owner="replica-b"))
    assert sorted(s.memory_id for s in run(striped.list())) == ["next", "user"]
    assert run(striped.reap()) == []
    assert not any(store_id.startswith("scratch-a") for shard in shards.values() for store_id in shard.stores.stores)


@pytest.mark.parametrize("snapshot_every", [1, 100])
def test_recent_tokens_and_where_requests_began_survive_a_restart(tmp_path, snapshot_every):
    """A memory keeps its newest appended token ids verbatim (sinks included) and where each request's
    append began, as the in-process memory does; a restart from the snapshot or the log keeps both."""
    rng = np.random.default_rng(6)
    shards = {n: LocalShard(tmp_path / n, 10**6, 100) for n in SHARDS}
    bank = StripedBank(shards, C, HKV, D, 16, 1, storage=Storage(str(tmp_path / "bank")),
                       snapshot_every=snapshot_every, request_window=8, recent_tokens=10)
    ref = Memory("m", 16, C, HKV, D, request_window=8, recent_tokens=10)
    run(bank.create("m", 16, 3))
    appended = []
    for i, n in enumerate((6, 5, 3)):
        keys, values, ids = tokens(rng, n)
        run(bank.append("m", keys, values, ids, skip_first=1, request_id=f"r{i}"))
        ref.append(keys, values, ids, skip_first=1, request_id=f"r{i}")
        appended.extend(ids.tolist())
    for restarted in (False, True):
        if restarted:
            bank = StripedBank(shards, C, HKV, D, 16, 1, storage=Storage(str(tmp_path / "bank")),
                               snapshot_every=snapshot_every, request_window=8, recent_tokens=10)
        got, want = run(bank.recent("m", "r2")), ref.recent("r2")
        assert got.token_ids.tolist() == want.token_ids.tolist() == appended[-10:]
        assert got.start_position == want.start_position == len(appended) - 10
        assert got.request_position == want.request_position == 11
        assert run(bank.recent("m", "r0")).request_position == 0
        assert run(bank.recent("m", "never")).request_position == NO_POSITION
        assert got.request_applied and not run(bank.recent("m", "never")).request_applied
    run(bank.reset("m"))  # a new stream: the old request ids' positions mean nothing in it
    ref.reset()
    for after in (run(bank.recent("m", "r2")), ref.recent("r2")):
        assert after.token_ids.tolist() == [] and not after.request_applied and after.request_position == NO_POSITION
