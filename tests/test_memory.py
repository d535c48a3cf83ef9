"""The memory bank: exact search against brute force, exact FIFO capacity, sinks, sharded eviction,
per-memory isolation. No model involved: keys and values are random."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longmem.memory import (NO_SEQ, ApproxSearch, Chunker, ChunkStore, Memory, MemoryBank, hits_to_retrieved,
                            merge_hits, merge_hits_with_sources)

HKV, HQ, D, C = 2, 4, 8, 4  # GQA: query head h searches kv head h // 2


class Stream:
    """Brute-force model of a memory: every stored token kept in order, chunks formed by hand."""

    def __init__(self, chunk_size: int = C, num_kv_heads: int = HKV, head_dim: int = D, seed: int = 0):
        self.c, self.hkv, self.d = chunk_size, num_kv_heads, head_dim
        self.rng = np.random.default_rng(seed)
        self.keys, self.values, self.ids, self.positions = [], [], [], []
        self.offered = 0

    def make(self, n: int):
        keys = self.rng.standard_normal((n, self.hkv, self.d)).astype(np.float32)
        values = self.rng.standard_normal((n, self.hkv, self.d)).astype(np.float32)
        ids = (self.offered + np.arange(n)).astype(np.int32) + 1000  # token id = 1000 + stream position
        return keys, values, ids

    def record(self, keys, values, ids, skip_first: int = 0):
        n = len(ids)
        for i in range(min(skip_first, n), n):
            self.keys.append(keys[i])
            self.values.append(values[i])
            self.ids.append(int(ids[i]))
            self.positions.append(self.offered + i)
        self.offered += n

    @property
    def num_chunks(self) -> int:
        return len(self.ids) // self.c

    def chunk(self, seq: int):
        sl = slice(seq * self.c, (seq + 1) * self.c)
        keys = np.stack(self.keys[sl], axis=1)  # [Hkv, c, d]
        values = np.stack(self.values[sl], axis=1)
        return keys, values, self.ids[sl], self.positions[sl]

    def search_key(self, seq: int) -> np.ndarray:
        return self.chunk(seq)[0].mean(axis=1)  # [Hkv, d]

    def topk(self, queries: np.ndarray, k: int, live_seqs: list[int]):
        """Brute force: (seqs, scores) [T, Hq, k], NO_SEQ / -inf past the live chunks."""
        t, hq, _ = queries.shape
        group = hq // self.hkv
        seqs = np.full((t, hq, k), NO_SEQ, np.int64)
        scores = np.full((t, hq, k), -np.inf, np.float32)
        if not live_seqs:
            return seqs, scores
        live = np.array(live_seqs)
        table = np.stack([self.search_key(s) for s in live_seqs]).astype(np.float64)  # [n, Hkv, d]
        for ti in range(t):
            for h in range(hq):
                s = table[:, h // group] @ queries[ti, h].astype(np.float64)
                order = np.argsort(-s, kind="stable")[:k]
                seqs[ti, h, :len(order)] = live[order]
                scores[ti, h, :len(order)] = s[order]
        return seqs, scores


def check_hits(hits, stream: Stream, queries: np.ndarray, k: int, live_seqs: list[int]):
    want_seqs, want_scores = stream.topk(queries, k, live_seqs)
    np.testing.assert_array_equal(hits.seqs, want_seqs)
    np.testing.assert_allclose(hits.scores, want_scores, rtol=1e-5, atol=1e-5)
    t, hq, _ = queries.shape
    group = hq // stream.hkv
    for ti in range(t):
        for h in range(hq):
            for j in range(k):
                seq = want_seqs[ti, h, j]
                if seq == NO_SEQ:
                    assert (hits.positions[ti, h, j] == NO_SEQ).all()
                    assert not hits.keys[ti, h, j].any() and not hits.values[ti, h, j].any()
                    continue
                keys, values, ids, pos = stream.chunk(seq)
                kv = h // group
                np.testing.assert_array_equal(hits.keys[ti, h, j], keys[kv])
                np.testing.assert_array_equal(hits.values[ti, h, j], values[kv])
                assert hits.token_ids[ti, h, j].tolist() == ids
                assert hits.positions[ti, h, j].tolist() == pos


def queries_for(rng, t: int = 5, hq: int = HQ, d: int = D) -> np.ndarray:
    return rng.standard_normal((t, hq, d)).astype(np.float32)


@pytest.mark.parametrize("capacity_chunks", [64, 5])
def test_search_equals_brute_force_topk(capacity_chunks):
    """Several appends, a partial trailing chunk, GQA heads; with and without eviction."""
    memory = Memory("m", capacity_chunks * C, C, HKV, D)
    stream = Stream(seed=capacity_chunks)
    rng = np.random.default_rng(1)
    for n in (7, 13, 5, 10, 3):
        keys, values, ids = stream.make(n)
        memory.append(keys, values, ids)
        stream.record(keys, values, ids)
        total = stream.num_chunks
        live = list(range(max(0, total - capacity_chunks), total))
        for k in (1, 3, capacity_chunks + 2):
            q = queries_for(rng)
            check_hits(memory.search(q, k), stream, q, k, live)
    assert memory.stats().pending_tokens == 38 % C == 2  # a partial trailing chunk, not searchable


def test_search_scores_are_chunk_mean_inner_products():
    """Each returned score is q · mean(chunk token keys of the query head's kv head)."""
    memory = Memory("m", 64, C, HKV, D)
    stream = Stream(seed=3)
    keys, values, ids = stream.make(24)
    memory.append(keys, values, ids)
    stream.record(keys, values, ids)
    q = queries_for(np.random.default_rng(4), t=3)
    hits = memory.search(q, 6)
    for t in range(3):
        for h in range(HQ):
            for j in range(6):
                expect = float(hits.keys[t, h, j].mean(axis=0) @ q[t, h])
                assert hits.scores[t, h, j] == pytest.approx(expect, rel=1e-5, abs=1e-5)
                # and the keys returned belong to kv head h // 2 of that chunk
                seq = hits.seqs[t, h, j]
                np.testing.assert_array_equal(hits.keys[t, h, j], keys[seq * C:(seq + 1) * C, h // 2])
            assert np.all(np.diff(hits.scores[t, h]) <= 1e-6)  # best first


def test_fifo_exact_capacity_and_eviction_order():
    capacity_chunks = 8
    memory = Memory("m", capacity_chunks * C, C, HKV, D)
    stream = Stream(seed=5)
    rng = np.random.default_rng(6)
    total_tokens = 0
    for n in (10, 15, 9, 13, 6, 1):
        keys, values, ids = stream.make(n)
        memory.append(keys, values, ids)
        stream.record(keys, values, ids)
        total_tokens += n
        complete = total_tokens // C
        held = min(complete, capacity_chunks)
        stats = memory.stats()
        assert stats.capacity_tokens == capacity_chunks * C
        assert stats.tokens_held == held * C
        assert stats.tokens_evicted == (complete - held) * C
        assert stats.tokens_appended == total_tokens
        assert stats.pending_tokens == total_tokens % C
        hits = memory.search(queries_for(rng, t=2), capacity_chunks)
        want = set(range(complete - held, complete))
        for row in hits.seqs.reshape(-1, capacity_chunks):
            assert set(row[row != NO_SEQ].tolist()) == want
            assert (row == NO_SEQ).sum() == capacity_chunks - held
        # positions of the held chunks: no sinks, so chunk seq starts at stream position seq * c
        valid = hits.seqs != NO_SEQ
        np.testing.assert_array_equal(hits.positions[valid], hits.seqs[valid][:, None] * C + np.arange(C))
        assert not np.isin(hits.token_ids[valid], np.array(stream.ids[complete * C:])).any()
    assert memory.stats().tokens_held == capacity_chunks * C  # 54 tokens offered: full
    assert memory.stats().tokens_evicted == (54 // C - capacity_chunks) * C


def test_one_append_larger_than_capacity_keeps_the_newest():
    memory = Memory("m", 8 * C, C, HKV, D)
    stream = Stream(seed=7)
    keys, values, ids = stream.make(50)  # 12 chunks + 2 pending
    memory.append(keys, values, ids)
    stream.record(keys, values, ids)
    stats = memory.stats()
    assert (stats.tokens_held, stats.tokens_evicted, stats.pending_tokens) == (32, 16, 2)
    q = queries_for(np.random.default_rng(8))
    check_hits(memory.search(q, 10), stream, q, 10, list(range(4, 12)))


def test_pending_tokens_are_not_searchable_until_completed():
    memory = Memory("m", 64, C, HKV, D)
    stream = Stream(seed=9)
    keys, values, ids = stream.make(6)  # chunk 0 + 2 pending
    memory.append(keys, values, ids)
    stream.record(keys, values, ids)
    assert memory.stats().pending_tokens == 2
    assert memory.stats().tokens_held == 4
    q = queries_for(np.random.default_rng(10))
    hits = memory.search(q, 4)
    assert set(hits.seqs[hits.seqs != NO_SEQ].tolist()) == {0}
    assert not np.isin(hits.token_ids[hits.seqs != NO_SEQ], ids[4:]).any()

    keys2, values2, ids2 = stream.make(3)  # completes chunk 1 with 2 old + 2 new tokens, 1 pending
    memory.append(keys2, values2, ids2)
    stream.record(keys2, values2, ids2)
    assert memory.stats().pending_tokens == 1
    hits = memory.search(q, 4)
    check_hits(hits, stream, q, 4, [0, 1])
    chunk1 = hits.seqs == 1
    assert chunk1.any()
    assert hits.token_ids[chunk1][0].tolist() == [ids[4], ids[5], ids2[0], ids2[1]]
    assert (hits.positions[chunk1] == [4, 5, 6, 7]).all()
    # the completed chunk's keys are the 2 pending keys followed by the 2 new ones (kv head 0 for heads 0, 1)
    t, h, j = np.argwhere(chunk1 & (np.arange(HQ)[None, :, None] < 2))[0]
    np.testing.assert_array_equal(hits.keys[t, h, j], np.concatenate([keys[4:6, 0], keys2[:2, 0]]))


def test_skip_first_takes_positions_but_is_not_stored():
    memory = Memory("m", 64, C, HKV, D)
    stream = Stream(seed=11)
    for _ in range(3):
        keys, values, ids = stream.make(9)  # 1 sink + 8 stored
        memory.append(keys, values, ids, skip_first=1)
        stream.record(keys, values, ids, skip_first=1)
    stats = memory.stats()
    assert stats.tokens_appended == 27
    assert stats.tokens_held == 24 and stats.pending_tokens == 0
    q = queries_for(np.random.default_rng(12))
    hits = memory.search(q, 6)
    check_hits(hits, stream, q, 6, list(range(6)))
    sinks = {1000, 1009, 1018}  # token id = 1000 + position
    assert not np.isin(hits.token_ids, list(sinks)).any()
    assert sorted(set(hits.positions[..., 0].ravel().tolist())) == [1, 5, 10, 14, 19, 23]

    # A sink in the middle of a pending chunk: the chunk holds the tokens around it.
    memory2 = Memory("m2", 64, C, HKV, D)
    s2 = Stream(seed=13)
    for n in (6, 6):
        keys, values, ids = s2.make(n)
        memory2.append(keys, values, ids, skip_first=1)
        s2.record(keys, values, ids, skip_first=1)
    assert memory2.stats().tokens_held == 8 and memory2.stats().pending_tokens == 2
    hits = memory2.search(q, 2)
    check_hits(hits, s2, q, 2, [0, 1])
    chunk1 = hits.token_ids[hits.seqs == 1][0].tolist()
    assert chunk1 == [1005, 1007, 1008, 1009]  # position 6 (a sink) skipped
    assert hits.positions[hits.seqs == 1][0].tolist() == [5, 7, 8, 9]


def _chunks(chunker: Chunker, n: int, rng):
    keys = rng.standard_normal((n, chunker.num_kv_heads, chunker.head_dim)).astype(np.float32)
    values = rng.standard_normal((n, chunker.num_kv_heads, chunker.head_dim)).astype(np.float32)
    ids = np.arange(chunker.next_position, chunker.next_position + n, dtype=np.int32)
    return chunker.push(keys, values, ids)


def _live_seqs(store: ChunkStore, q) -> set[int]:
    hits = store.search(q, store.capacity)
    return set(hits.seqs[hits.seqs != NO_SEQ].tolist())


def test_evict_before():
    rng = np.random.default_rng(14)
    chunker = Chunker(C, HKV, D)
    store = ChunkStore(8, C, HKV, D)
    q = queries_for(rng, t=2)
    store.add(_chunks(chunker, 6 * C, rng))
    assert _live_seqs(store, q) == set(range(6))
    assert store.evict_before(2) == 2
    assert store.evict_before(1) == 0
    assert store.evicted == 2
    assert _live_seqs(store, q) == set(range(2, 6))
    hits = store.search(q, 8)
    assert ((hits.seqs == NO_SEQ).sum(axis=2) == 4).all()  # evicted chunks never come back
    # 4 more chunks wrap around over the logically evicted slots: nothing live is lost
    store.add(_chunks(chunker, 4 * C, rng))
    assert store.evicted == 2
    assert _live_seqs(store, q) == set(range(2, 10))
    store.add(_chunks(chunker, C, rng))  # now full: the oldest live chunk (seq 2) goes
    assert store.evicted == 3
    assert _live_seqs(store, q) == set(range(3, 11))
    assert store.evict_before(100) == 8
    assert _live_seqs(store, q) == set()
    assert (store.search(q, 3).seqs == NO_SEQ).all()


@settings(max_examples=25, deadline=None)
@given(num_stores=st.integers(1, 4), capacity=st.integers(1, 12), chunk_size=st.sampled_from([1, 2, 4]),
       appends=st.lists(st.integers(0, 30), min_size=1, max_size=6), k=st.integers(1, 14),
       seed=st.integers(0, 2**16))
def test_striped_stores_equal_one_store(num_stores, capacity, chunk_size, appends, k, seed):
    """Chunks striped over S stores by seq % S, capacity ceil(C/S) each, evict_before(next_seq - C)
    after every append, then merge_hits of the S searches == one store of capacity C."""
    rng = np.random.default_rng(seed)
    chunker = Chunker(chunk_size, HKV, D)
    single = ChunkStore(capacity, chunk_size, HKV, D)
    stores = [ChunkStore(math.ceil(capacity / num_stores), chunk_size, HKV, D) for _ in range(num_stores)]
    q = queries_for(rng, t=3)
    for n in appends:
        chunks = _chunks(chunker, n, rng)
        single.add(chunks)
        for s, store in enumerate(stores):
            store.add(chunks.select(chunks.seqs % num_stores == s))
            store.evict_before(chunker.next_seq - capacity)
        want = single.search(q, k)
        got = merge_hits([store.search(q, k) for store in stores], k)
        np.testing.assert_array_equal(got.seqs, want.seqs)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got.positions, want.positions)
        valid = want.seqs != NO_SEQ
        np.testing.assert_array_equal(got.token_ids[valid], want.token_ids[valid])
        np.testing.assert_array_equal(got.keys, want.keys)
        np.testing.assert_array_equal(got.values, want.values)
        assert sum(s.live for s in stores) == single.live == min(capacity, chunker.next_seq)
        assert sum(s.evicted for s in stores) == single.evicted == chunker.next_seq - single.live


def test_merge_hits_is_exact_topk_of_the_union():
    rng = np.random.default_rng(15)
    a, b = Memory("a", 64, C, HKV, D), Memory("b", 64, C, HKV, D)
    sa, sb = Stream(seed=16), Stream(seed=17)
    for memory, stream in ((a, sa), (b, sb)):
        keys, values, ids = stream.make(20)
        memory.append(keys, values, ids)
        stream.record(keys, values, ids)
    q = queries_for(rng)
    ha, hb = a.search(q, 3), b.search(q, 3)
    merged = merge_hits([ha, hb], 3)
    both = np.concatenate([ha.scores, hb.scores], axis=2)
    np.testing.assert_allclose(merged.scores, -np.sort(-both, axis=2)[:, :, :3])
    assert (np.diff(merged.scores, axis=2) <= 0).all()


def test_hits_to_retrieved_layout():
    memory = Memory("m", 64, C, HKV, D)
    stream = Stream(seed=18)
    keys, values, ids = stream.make(8)  # 2 chunks; a search for 3 leaves one empty slot
    memory.append(keys, values, ids)
    q = queries_for(np.random.default_rng(19), t=2)
    hits = memory.search(q, 3)
    r = hits_to_retrieved([hits, hits])
    assert r.keys.shape == (2, HQ, 2, 3 * C, D)
    assert r.mask.shape == (2, HQ, 2, 3 * C)
    assert r.mask[:, :, :, :2 * C].all() and not r.mask[:, :, :, 2 * C:].any()
    # entry j*c + i of query t, head h is token i of its j-th chunk
    torch.testing.assert_close(r.keys[0, 3, 1, C + 2], torch.from_numpy(hits.keys[1, 3, 1, 2]))
    torch.testing.assert_close(r.values[1, 0, 0, 1], torch.from_numpy(hits.values[0, 0, 0, 1]))


def _bank_fill(bank: MemoryBank, memory_id: str, first_id: int, n: int, rng):
    keys = rng.standard_normal((n, HKV, D)).astype(np.float32)
    values = rng.standard_normal((n, HKV, D)).astype(np.float32)
    ids = np.arange(first_id, first_id + n, dtype=np.int32)
    bank.get(memory_id).append(keys, values, ids)
    return keys


def test_bank_isolates_memories():
    rng = np.random.default_rng(20)
    bank = MemoryBank(C, HKV, D, default_capacity=64)
    bank.create("a")
    bank.create("b", capacity_tokens=16)
    keys_a = _bank_fill(bank, "a", 0, 40, rng)
    _bank_fill(bank, "b", 5000, 40, rng)
    assert bank.get("a").stats().tokens_held == 40 and bank.get("b").stats().tokens_held == 16
    queries = torch.from_numpy(rng.standard_normal((3, 4, HQ, D)).astype(np.float32))
    rows = bank.search([["a"], ["b"], []], queries, 5)
    a, b, none = rows
    assert (a.seqs != NO_SEQ).all() and (a.token_ids < 5000).all()
    assert (b.seqs[:, :, :4] != NO_SEQ).all() and (b.seqs[:, :, 4] == NO_SEQ).all()  # b holds 4 chunks
    assert (b.token_ids[b.seqs != NO_SEQ] >= 5000).all()
    assert (none.seqs == NO_SEQ).all()
    # the keys in a's hits are a's own keys
    for t in range(4):
        for h in range(HQ):
            seq = a.seqs[t, h, 0]
            np.testing.assert_array_equal(a.keys[t, h, 0], keys_a[seq * C:(seq + 1) * C, h // 2])
    # a row may search several memories: exact top-k over the union, each memory its own
    (union,) = bank.search([["a", "b"]], queries[:1], 5)
    want = merge_hits([bank.get("a").search(queries[0].numpy(), 5), bank.get("b").search(queries[0].numpy(), 5)], 5)
    np.testing.assert_array_equal(union.seqs, want.seqs)
    np.testing.assert_array_equal(union.token_ids, want.token_ids)
    np.testing.assert_array_equal(union.keys, want.keys)

    bank.get("b").reset()
    stats = bank.get("b").stats()
    assert (stats.tokens_held, stats.tokens_appended, stats.tokens_evicted, stats.pending_tokens) == (0, 0, 0, 0)
    assert (bank.search([["b"]], queries[:1], 5)[0].seqs == NO_SEQ).all()
    _bank_fill(bank, "b", 7000, 8, rng)
    (b2,) = bank.search([["b"]], queries[:1], 5)
    assert set(b2.seqs[b2.seqs != NO_SEQ].tolist()) == {0, 1}  # numbering restarts after reset
    assert set(b2.positions[b2.seqs != NO_SEQ][:, 0].tolist()) == {0, 4}
    assert bank.get("a").stats().tokens_held == 40  # untouched

    bank.delete("a")
    with pytest.raises(KeyError):
        bank.get("a")
    with pytest.raises(KeyError):
        bank.search([["a"]], queries[:1], 5)
    with pytest.raises(KeyError):
        bank.delete("a")
    with pytest.raises(KeyError):
        bank.create("b")
    bank.create("a")  # the id can be reused, and the new memory is empty
    assert (bank.search([["a"]], queries[:1], 5)[0].seqs == NO_SEQ).all()


def test_memory_rejects_bad_shapes_and_capacity():
    with pytest.raises(ValueError):
        Memory("m", 10, C, HKV, D)  # not a multiple of the chunk size
    memory = Memory("m", 16, C, HKV, D)
    with pytest.raises(ValueError):
        memory.append(np.zeros((3, HKV + 1, D), np.float32), np.zeros((3, HKV + 1, D), np.float32),
                      np.zeros(3, np.int32))
    with pytest.raises(ValueError):
        memory.search(np.zeros((2, 3, D), np.float32), 2)  # 3 query heads over 2 kv heads


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(1, 40), n_tokens=st.integers(0, 200),
       t=st.integers(1, 6), k=st.integers(1, 12))
def test_hits_hold_each_chunk_head_once_and_point_every_hit_at_its_own(seed, capacity, n_tokens, t, k):
    rng = np.random.default_rng(seed)
    hq = 2 * HKV
    store, chunker = ChunkStore(capacity, C, HKV, D), Chunker(C, HKV, D)
    keys, values = rng.standard_normal((2, n_tokens, HKV, D)).astype(np.float32)
    store.add(chunker.push(keys, values, rng.integers(0, 99, n_tokens).astype(np.int32)))
    hits = store.search(rng.standard_normal((t, hq, D)).astype(np.float32), k)
    valid = hits.seqs >= 0
    np.testing.assert_array_equal(hits.rows >= 0, valid)
    pairs = {(int(s), h // 2) for (_, h, _), s in zip(np.argwhere(valid), hits.seqs[valid])}
    assert len(hits.table_keys) == len(pairs) <= min(valid.sum(), store.live * HKV)
    for (ti, h, j) in np.argwhere(valid):
        slot = int(np.flatnonzero(store.seqs == hits.seqs[ti, h, j])[0])
        np.testing.assert_array_equal(hits.keys[ti, h, j], store.keys[slot, h // 2])
        np.testing.assert_array_equal(hits.values[ti, h, j], store.values[slot, h // 2])
        np.testing.assert_array_equal(hits.token_ids[ti, h, j], store.token_ids[slot])
    assert (hits.keys[~valid] == 0).all() and (hits.positions[~valid] == NO_SEQ).all()


def test_merged_hits_of_two_memories_keep_each_memory_s_chunks_apart():
    """Two memories number their chunks from 0: a merged result must not take one's keys for the
    other's, and its table keeps only the rows a winning hit points at."""
    rng = np.random.default_rng(0)
    stores = []
    for _ in range(2):
        store, chunker = ChunkStore(8, C, HKV, D), Chunker(C, HKV, D)
        keys, values = rng.standard_normal((2, 32, HKV, D)).astype(np.float32)
        store.add(chunker.push(keys, values, rng.integers(0, 99, 32).astype(np.int32)))
        stores.append(store)
    queries = rng.standard_normal((3, HQ, D)).astype(np.float32)
    parts = [s.search(queries, 6) for s in stores]
    merged, sources = merge_hits_with_sources(parts, 6)
    assert set(np.unique(sources)) == {0, 1}
    for (ti, h, j) in np.argwhere(merged.seqs >= 0):
        part = parts[sources[ti, h, j]]
        (same,) = np.flatnonzero(part.seqs[ti, h] == merged.seqs[ti, h, j])
        np.testing.assert_array_equal(merged.keys[ti, h, j], part.keys[ti, h, same])
        np.testing.assert_array_equal(merged.values[ti, h, j], part.values[ti, h, same])
    assert len(merged.table_keys) == len(np.unique(merged.rows[merged.rows >= 0])) < sum(len(p.table_keys) for p in parts)


# ---- approximate search of large stores ------------------------------------------------------------

def clustered_chunks(rng: np.random.Generator, first_seq: int, n: int, centers: np.ndarray):
    """n chunks whose keys lie around a few centers (as real keys do), seqs first_seq.. ."""
    from longmem.memory import Chunks

    keys = (centers[rng.integers(0, len(centers), (n, HKV))][:, :, None, :]
            + 0.5 * rng.standard_normal((n, HKV, C, D))).astype(np.float32)
    return Chunks(keys, rng.standard_normal((n, HKV, C, D)).astype(np.float32),
                  rng.integers(0, 1000, (n, C)).astype(np.int32),
                  np.arange(first_seq * C, (first_seq + n) * C, dtype=np.int64).reshape(n, C),
                  np.arange(first_seq, first_seq + n, dtype=np.int64))


def fill_beside_exact(store: ChunkStore, exact: ChunkStore, rng, queries, k: int, steps: int, batch: int,
                      centers, evict_at: int, keep: int, after_add=lambda: True) -> int:
    """Adds `steps` batches of clustered chunks to both stores, evicting all but the newest `keep` at
    step `evict_at`; after each, `after_add()` must hold and both must answer alike. Returns the next seq."""
    seq = 0
    for step in range(steps):
        chunks = clustered_chunks(rng, seq, batch, centers)
        seq += batch
        store.add(chunks)
        exact.add(chunks)
        assert after_add()
        if step == evict_at:
            store.evict_before(seq - keep)
            exact.evict_before(seq - keep)
        a, b = store.search(queries, k), exact.search(queries, k)
        np.testing.assert_array_equal(a.seqs, b.seqs)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.values, b.values)
    return seq


def approx(min_chunks: int, probe: int, clusters: int = 4, hot: int = 16):
    return ApproxSearch(min_chunks=min_chunks, lists_per_sqrt=2.0, probe=probe, query_clusters=clusters,
                        hot_chunks=hot, kmeans_iterations=5)


def test_approximate_search_starts_at_its_threshold_and_probing_every_list_is_exact():
    """Below min_chunks a store searches exactly; from there on through IVF lists + hot sets. With every
    list probed the result is exactly the exact search's, through ring-buffer overwrites and logical
    eviction alike (the IVF lists follow every overwrite)."""
    rng = np.random.default_rng(0)
    centers = 3 * rng.standard_normal((6, D))
    capacity = 200
    store, exact = ChunkStore(capacity, C, HKV, D, approx=approx(120, probe=10**6)), ChunkStore(capacity, C, HKV, D)
    queries = rng.standard_normal((6, HQ, D)).astype(np.float32)
    # 70 chunks at a time: crosses 120, then wraps the ring twice
    seq = fill_beside_exact(store, exact, rng, queries, 8, 7, 70, centers, evict_at=5, keep=150,
                            after_add=lambda: (store.ivf is not None) == (store.live >= 120))
    assert store.ivf[0].ntotal == store.filled  # one entry per slot: overwrites replaced, not added
    assert (store.search(queries, 8).seqs >= seq - capacity).all()  # overwritten chunks are never found


def test_approximate_search_finds_most_of_the_exact_topk_probing_few_lists():
    rng = np.random.default_rng(1)
    centers = 3 * rng.standard_normal((8, D))
    store, exact = ChunkStore(2000, C, HKV, D, approx=approx(1000, probe=4)), ChunkStore(2000, C, HKV, D)
    for first in range(0, 2000, 250):
        chunks = clustered_chunks(rng, first, 250, centers)
        store.add(chunks)
        exact.add(chunks)
    assert store.ivf[0].nlist == 1000 // 39  # 2·√2000 lists, at most one per 39 chunks held when trained
    queries = (centers[rng.integers(0, 8, 64)][:, None, :] + rng.standard_normal((64, HQ, D))).astype(np.float32)
    found, truth = store.search(queries, 8).seqs, exact.search(queries, 8).seqs
    recall = (found[..., :, None] == truth[..., None, :]).any(-1).mean()
    assert 0.8 <= recall < 1.0, recall  # approximate, and close
    assert (found != NO_SEQ).all() and all(len(set(row)) == 8 for row in found.reshape(-1, 8))


def test_an_approximate_store_restores_to_the_same_answers_and_reset_makes_it_exact_again():
    rng = np.random.default_rng(2)
    centers = 3 * rng.standard_normal((6, D))
    store = ChunkStore(300, C, HKV, D, approx=approx(200, probe=2))
    for first in range(0, 400, 100):  # wraps the ring once
        store.add(clustered_chunks(rng, first, 100, centers))
    queries = rng.standard_normal((16, HQ, D)).astype(np.float32)
    arrays, meta = store.state()
    assert arrays["ivf_centroids"].shape == (HKV, store.ivf[0].nlist, D)
    restored = ChunkStore.from_state(arrays, meta, approx(200, probe=2))
    np.testing.assert_array_equal(restored.search(queries, 8).seqs, store.search(queries, 8).seqs)
    store.reset()
    assert store.ivf is None
    store.add(clustered_chunks(rng, 0, 50, centers))
    np.testing.assert_array_equal(store.search(queries, 8).seqs, ChunkStore.from_state(*store.state()).search(queries, 8).seqs)


def test_approximate_search_settings_are_checked():
    from longmem.config import LongMemConfig

    config = LongMemConfig.from_dict({"memory": {"ann_min_tokens": 4096, "ann_probe": 0}})
    with pytest.raises(ValueError, match="ann_probe"):
        config.validate()
    off = LongMemConfig.from_dict({"memory": {"ann_min_tokens": 0, "ann_probe": 0}}).validate()
    assert not off.memory.approx_search().enabled()


def test_a_store_that_can_grow_into_ivf_lists_reserves_their_bytes():
    small, big = ChunkStore(99, C, HKV, D, approx=approx(100, probe=1)), ChunkStore(100, C, HKV, D, approx=approx(100, probe=1))
    assert small.nbytes == 99 * ChunkStore.bytes_per_chunk(C, HKV, D)  # never reaches the threshold
    assert big.nbytes == 100 * (ChunkStore.bytes_per_chunk(C, HKV, D) + ChunkStore.ivf_bytes_per_chunk(HKV, D))
    assert ChunkStore(100, C, HKV, D).nbytes == 100 * ChunkStore.bytes_per_chunk(C, HKV, D)  # exact only


TORCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_a_store_searching_on_a_torch_device_answers_as_the_faiss_index(device):
    """The GPU index (on CPU here, CUDA where present): the same hits as faiss's flat index through
    ring-buffer overwrites, logical eviction, a restore and a reset; a small block_scores splits the
    queries into blocks without changing the answer; approximate settings are ignored on it."""
    rng = np.random.default_rng(5)
    on_device = ApproxSearch(100, 2.0, 4, 4, 16, 5, device=device, block_scores=64)
    store, exact = ChunkStore(120, C, HKV, D, approx=on_device), ChunkStore(120, C, HKV, D)
    assert store.indexes == [] and store.device_keys.device.type == device and not on_device.enabled()
    queries = queries_for(rng, t=9)
    fill_beside_exact(store, exact, rng, queries, 7, 4, 50, 3 * rng.standard_normal((4, D)), evict_at=2, keep=90)
    assert store.ivf is None  # no IVF lists beside a torch index, whatever its size
    restored = ChunkStore.from_state(*store.state(), on_device)
    np.testing.assert_array_equal(restored.search(queries, 7).seqs, exact.search(queries, 7).seqs)
    store.reset()
    assert (store.search(queries, 7).seqs == NO_SEQ).all() and not store.device_keys.any()


def test_search_device_settings_are_checked():
    from longmem.config import LongMemConfig

    for bad in ({"search_device": "gpu"}, {"search_block_scores": 0}):
        with pytest.raises(ValueError, match="search_device"):
            LongMemConfig.from_dict({"memory": bad}).validate()
    on_cpu = LongMemConfig.from_dict({"memory": {"search_device": "cpu"}}).validate().memory.approx_search()
    assert on_cpu.torch_device() == torch.device("cpu") and not on_cpu.enabled()
    auto = LongMemConfig().memory.approx_search()  # the GPU where there is one, else faiss with the IVF beside it
    assert (auto.torch_device() is None) == (not torch.cuda.is_available()) and auto.enabled() != torch.cuda.is_available()


def test_an_append_with_a_request_id_applies_once_within_the_window():
    rng = np.random.default_rng(3)
    bank = MemoryBank(C, HKV, D, default_capacity=64, request_window=2)
    bank.create("m")
    a, b, c = (tuple(rng.standard_normal((2, 5, HKV, D)).astype(np.float32)) + (np.arange(5, dtype=np.int32),)
               for _ in range(3))
    assert bank.append("m", *a, request_id="a").tokens_appended == 5
    assert bank.append("m", *a, request_id="a").tokens_appended == 5  # the same id: nothing more
    assert bank.append("m", *b).tokens_appended == 10  # no id: always applied
    assert bank.append("m", *b).tokens_appended == 15
    bank.append("m", *b, request_id="b")
    bank.append("m", *c, request_id="c")  # "a" leaves the window of 2
    assert bank.append("m", *a, request_id="a").tokens_appended == 30
