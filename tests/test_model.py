"""LongMem end to end on the tiny backbones: no self-retrieval, batching, greedy generation against a
reference reader, memory bookkeeping, retrieval, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import CAPACITY, CHUNK, TEXT, TOPK, W
from longmem.memory import NO_SEQ, Memory, hits_to_retrieved, merge_hits

FAMILIES = ("llama", "gpt2")
OTHER_TEXT = ("Segments are read one after another. A side network reads each segment and retrieves "
              "chunks of four tokens from the bank, then the keys of the segment are appended. ")


def ids_of(model, text: str, n: int) -> list[int]:
    ids = model.tokenize(text * (1 + n // 20))[:n]
    assert len(ids) == n
    return ids


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# ---- no self-retrieval ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["append", "scratch"])
def test_a_segment_never_retrieves_from_itself(llama_bb, fresh_memory, monkeypatch, mode):
    model = llama_bb
    ids = ids_of(model, TEXT, 4 * W + 10)  # 5 segments
    memory_id = fresh_memory(model) if mode == "append" else None
    calls = []
    search = model.bank.search

    def spy(memory_ids, queries, k_chunks):
        rows = search(memory_ids, queries, k_chunks)
        assert len(rows) == 1
        hits = rows[0]
        valid = hits.seqs != NO_SEQ
        appended = model.memory_stats(memory_id).tokens_appended if memory_id else None
        calls.append((hits.positions[valid], hits.token_ids[valid], appended))
        return rows

    monkeypatch.setattr(model.bank, "search", spy)
    model.score(token_ids=ids, memory_id=memory_id, use_memory=True, append=mode == "append")
    monkeypatch.undo()

    assert len(calls) == 5  # one search per segment
    for s, (positions, token_ids, appended) in enumerate(calls):
        start = s * W
        if s == 0:
            assert positions.size == 0  # nothing in memory while reading the first segment
            continue
        assert positions.size > 0
        # every retrieved chunk's tokens all come before the segment being read
        assert positions.max() < start
        if appended is not None:
            assert appended == start  # exactly the earlier segments have been offered to the memory
    if memory_id:
        assert model.memory_stats(memory_id).tokens_appended == len(ids)


# ---- batching -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_documents_equals_each_alone(tiny_models, fresh_memory, monkeypatch, family):
    model = tiny_models(family, "backbone")
    assert model.config.read.batch_segments == 2
    doc_a = ids_of(model, TEXT, 3 * W + 17)  # 4 segments
    doc_b = ids_of(model, OTHER_TEXT, 2 * W + 5)  # 3 segments: the last batch has one row
    mem_a, mem_b = fresh_memory(model), fresh_memory(model)
    model.append(mem_a, OTHER_TEXT * 2)
    model.append(mem_b, TEXT * 3)
    before = (model.memory_stats(mem_a), model.memory_stats(mem_b))

    batch_sizes = []
    encode = model.backbone.encode

    def spy(input_ids, *args, **kwargs):
        batch_sizes.append(input_ids.shape[0])
        return encode(input_ids, *args, **kwargs)

    monkeypatch.setattr(model.backbone, "encode", spy)
    batch = model.score_batch([doc_a, doc_b], [mem_a, mem_b])
    monkeypatch.undo()
    assert max(batch_sizes) == 2  # the rows really were read together

    alone_a = model.score(token_ids=doc_a, memory_id=mem_a)
    alone_b = model.score(token_ids=doc_b, memory_id=mem_b)
    assert (model.memory_stats(mem_a), model.memory_stats(mem_b)) == before
    for got, want, n in ((batch[0], alone_a, len(doc_a)), (batch[1], alone_b, len(doc_b))):
        assert got.token_ids == want.token_ids
        assert got.logprobs.shape == want.logprobs.shape == (n - 1,)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.backbone_logprobs, want.backbone_logprobs, atol=1e-5, rtol=0)
    # the memories matter, so equality above means rows did not mix
    swapped = model.score(token_ids=doc_a, memory_id=mem_b)
    assert max_diff(swapped.logprobs, alone_a.logprobs) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_append_equals_each_alone(tiny_models, fresh_memory, family):
    model = tiny_models(family, "backbone")
    doc_a, doc_b = ids_of(model, TEXT, 2 * W + 3), ids_of(model, OTHER_TEXT, W + 20)
    mems = [fresh_memory(model) for _ in range(4)]
    for m, text in zip(mems, (OTHER_TEXT, TEXT, OTHER_TEXT, TEXT)):
        model.append(m, text)
    batch = model.score_batch([doc_a, doc_b], mems[:2], append=True)
    alone = [model.score(token_ids=doc_a, memory_id=mems[2], append=True),
             model.score(token_ids=doc_b, memory_id=mems[3], append=True)]
    for got, want in zip(batch, alone):
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5, rtol=0)
    for m_batch, m_alone in ((mems[0], mems[2]), (mems[1], mems[3])):
        s, t = model.memory_stats(m_batch), model.memory_stats(m_alone)
        assert (s.tokens_held, s.tokens_appended, s.tokens_evicted, s.pending_tokens) == \
               (t.tokens_held, t.tokens_appended, t.tokens_evicted, t.pending_tokens)
    # what went into each memory is the same too
    q = torch.randn(1, 3, model.backbone.num_heads, model.backbone.head_dim, generator=torch.Generator().manual_seed(0))
    for m_batch, m_alone in ((mems[0], mems[2]), (mems[1], mems[3])):
        (hb,), (ha,) = model.bank.search([[m_batch]], q, 4), model.bank.search([[m_alone]], q, 4)
        np.testing.assert_array_equal(hb.token_ids, ha.token_ids)
        np.testing.assert_allclose(hb.keys, ha.keys, atol=1e-5)


# ---- greedy generation against a reference reader -------------------------------------------------
def reference_read(model, ids: list[int], memory_id: str | None = None):
    """LongMem read by hand from its components: segments of W, the memory block searching the
    memory and a scratch memory of this text's earlier segments (filled after each segment, minus the
    sink tokens). Returns (target logprobs [N-1], logits of the next token [V])."""
    cfg = model.config
    bb, sidenet = model.backbone, model.sidenet
    w, c = cfg.read.segment_tokens, cfg.memory.chunk_size
    k_chunks = cfg.memory.topk_tokens // c
    scratch = Memory("reference-scratch", cfg.memory.capacity_tokens, c, bb.num_kv_heads, bb.head_dim,
                     np.dtype(cfg.memory.dtype))  # stored as the model's memories are
    logprobs, last = [], None

    def retriever(queries):
        q = queries[0].float().numpy()
        parts = ([model.bank.get(memory_id).search(q, k_chunks)] if memory_id else []) + [scratch.search(q, k_chunks)]
        return hits_to_retrieved([merge_hits(parts, k_chunks)], queries.dtype)

    with torch.no_grad():
        for start in range(0, len(ids), w):
            seg = ids[start:start + w]
            out, _ = bb.encode(torch.tensor([seg]))
            logits = bb.lm_head(sidenet(out.hidden, torch.arange(len(seg))[None], retriever))[0].float()  # [T, V]
            lp = torch.log_softmax(logits, -1)
            targets = ids[start + 1:start + w + 1]
            logprobs.append(lp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)].numpy())
            last = logits[-1]
            scratch.append(out.mem_keys[0].numpy(), out.mem_values[0].numpy(), np.asarray(seg, np.int32),
                           skip_first=cfg.memory.sink_tokens)
    return np.concatenate(logprobs), last


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_memory", [False, True])
def test_reference_reader_equals_score(tiny_models, fresh_memory, family, with_memory):
    model = tiny_models(family, "backbone")
    memory_id = None
    if with_memory:
        memory_id = fresh_memory(model)
        model.append(memory_id, OTHER_TEXT * 2)
    ids = ids_of(model, TEXT, 3 * W + 7)
    want, _ = reference_read(model, ids, memory_id)
    got = model.score(token_ids=ids, memory_id=memory_id)
    np.testing.assert_allclose(got.logprobs, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family, with_memory, prompt_len", [
    ("llama", False, 50), ("llama", True, 50), ("gpt2", False, 50), ("gpt2", True, 50),
    ("llama", True, 2 * W), ("gpt2", True, W - 1)])
def test_greedy_generate_is_argmax_of_the_reader(tiny_models, fresh_memory, monkeypatch, family, with_memory,
                                                 prompt_len):
    """generate(temperature=0) with KV caches == the argmax of a full re-read of prompt + generated
    so far, at every step, across segment boundaries (the logits themselves match too)."""
    model = tiny_models(family, "backbone")
    memory_id = None
    if with_memory:
        memory_id = fresh_memory(model)
        model.append(memory_id, OTHER_TEXT * 2)
    before = model.memory_stats(memory_id) if memory_id else None
    prompt = ids_of(model, TEXT, prompt_len)

    heads = []  # what the LM head computes while generating: the last row of each call is a next-token logit
    lm_head = model.backbone.lm_head

    def spy(normed):
        logits = lm_head(normed)
        heads.append(logits.detach().reshape(-1, logits.shape[-1])[-1].float())
        return logits

    monkeypatch.setattr(model.backbone, "lm_head", spy)
    generated = list(model.generate(token_ids=prompt, memory_id=memory_id, max_new_tokens=40, temperature=0,
                                    reread=[]))  # the memory read alone: re-reading is tested on its own
    monkeypatch.undo()

    eos = model.tokenizer.eos_token_id
    assert len(generated) == 40 or generated[-1] == eos
    boundary = (len(prompt) // W + 1) * W
    assert len(prompt) + len(generated) > boundary + 2  # generation crossed a segment boundary
    assert len(set(generated)) > 3  # not a degenerate repetition: each step is a real check
    assert len(heads) >= len(generated)
    for j, (token, seen) in enumerate(zip(generated, heads[-len(generated):])):
        _, logits = reference_read(model, prompt + generated[:j], memory_id)
        assert logits[token] >= logits.max() - 1e-4, f"step {j}: {token} vs argmax {int(logits.argmax())}"
        torch.testing.assert_close(seen, logits, atol=1e-4, rtol=1e-4, msg=f"step {j}")
    if memory_id:
        assert model.memory_stats(memory_id) == before  # generate does not modify the memory
    again = list(model.generate(token_ids=prompt, memory_id=memory_id, max_new_tokens=len(generated), temperature=0,
                                reread=[]))
    assert again == generated


def test_sampled_generate_is_seeded(llama_bb):
    prompt = ids_of(llama_bb, TEXT, 20)
    a = list(llama_bb.generate(token_ids=prompt, max_new_tokens=10, temperature=1.0, top_k=5, seed=3))
    b = list(llama_bb.generate(token_ids=prompt, max_new_tokens=10, temperature=1.0, top_k=5, seed=3))
    assert a == b and len(a) >= 1
    assert all(0 <= t < llama_bb.backbone.vocab_size for t in a)


# ---- memory bookkeeping through the model ---------------------------------------------------------
def _stats_tuple(s):
    return (s.tokens_held, s.tokens_evicted, s.tokens_appended, s.pending_tokens)


def test_append_and_score_bookkeeping(llama_bb, fresh_memory):
    model = llama_bb
    memory_id = fresh_memory(model)
    n = model.append(memory_id, TEXT)
    ids = model.tokenize(TEXT)
    assert n == len(ids)
    stats = model.memory_stats(memory_id)
    stored = sum(len(ids[i:i + W]) - model.config.memory.sink_tokens for i in range(0, len(ids), W))
    assert stats.tokens_appended == n
    assert stats.tokens_held == stored // CHUNK * CHUNK and stats.pending_tokens == stored % CHUNK

    text = OTHER_TEXT * 2
    text_ids = model.tokenize(text)
    q = torch.randn(1, 4, model.backbone.num_heads, model.backbone.head_dim, generator=torch.Generator().manual_seed(1))
    (hits_before,) = model.bank.search([[memory_id]], q, 8)
    model.score(text, memory_id, append=False)
    assert model.memory_stats(memory_id) == stats  # untouched
    (hits_after,) = model.bank.search([[memory_id]], q, 8)
    np.testing.assert_array_equal(hits_before.seqs, hits_after.seqs)

    model.score(text, memory_id, append=True)
    grown = model.memory_stats(memory_id)
    assert grown.tokens_appended == n + len(text_ids)
    assert grown.tokens_held > stats.tokens_held


def test_use_memory_false_ignores_memory(llama_bb, fresh_memory):
    model = llama_bb
    full, empty = fresh_memory(model), fresh_memory(model)
    model.append(full, OTHER_TEXT * 3)
    ids = ids_of(model, TEXT, 2 * W + 9)
    plain = model.score(token_ids=ids, use_memory=False)
    for memory_id in (full, empty):
        r = model.score(token_ids=ids, memory_id=memory_id, use_memory=False)
        np.testing.assert_array_equal(r.logprobs, plain.logprobs)
    # one segment and no memory: the same as reading with (empty) memory
    short = ids[:W]
    np.testing.assert_allclose(model.score(token_ids=short, use_memory=True).logprobs,
                               model.score(token_ids=short, use_memory=False).logprobs, atol=1e-6)
    np.testing.assert_allclose(model.score(token_ids=short, memory_id=empty).logprobs,
                               model.score(token_ids=short, use_memory=False).logprobs, atol=1e-6)
    # with content (and backbone init, gates at 0.5) memory changes the reading
    with_memory = model.score(token_ids=short, memory_id=full)
    assert max_diff(with_memory.logprobs, plain.logprobs[:W - 1]) > 1e-3
    # the baseline is the same whatever the memory
    np.testing.assert_allclose(with_memory.backbone_logprobs, plain.backbone_logprobs[:W - 1], atol=1e-6)
    assert with_memory.perplexity == pytest.approx(math.exp(-with_memory.logprobs.mean()))
    assert plain.backbone_perplexity == pytest.approx(math.exp(-plain.backbone_logprobs.mean()))
    # without the baseline: the same reading, no backbone log-probs
    alone = model.score(token_ids=short, memory_id=full, backbone_logprobs=False)
    np.testing.assert_array_equal(alone.logprobs, with_memory.logprobs)
    assert len(alone.backbone_logprobs) == 0 and math.isnan(alone.backbone_perplexity)


def test_gate_closed_means_memory_has_no_effect(tiny_dirs, llama_bb, fresh_memory):
    from conftest import tiny_config
    from longmem.model import LongMem

    config = tiny_config(tiny_dirs["llama"], "backbone")
    config.sidenet.gate_init = -100.0
    closed = LongMem(config, backbone=llama_bb.backbone)
    memory_id = closed.create_memory("m")
    closed.append(memory_id, OTHER_TEXT * 3)
    ids = ids_of(closed, TEXT, 2 * W)
    np.testing.assert_allclose(closed.score(token_ids=ids, memory_id=memory_id).logprobs,
                               closed.score(token_ids=ids, use_memory=False).logprobs, atol=1e-5)
    # same weights with the gate open: memory matters
    np.testing.assert_allclose(closed.score(token_ids=ids, use_memory=False).logprobs,
                               llama_bb.score(token_ids=ids, use_memory=False).logprobs, atol=1e-6)
    open_id = fresh_memory(llama_bb)
    llama_bb.append(open_id, OTHER_TEXT * 3)
    assert max_diff(llama_bb.score(token_ids=ids, memory_id=open_id).logprobs,
                    llama_bb.score(token_ids=ids, use_memory=False).logprobs) > 1e-3


def test_fifo_capacity_through_the_model(llama_zero, fresh_memory):
    model = llama_zero
    memory_id = fresh_memory(model)
    assert model.memory_stats(memory_id).capacity_tokens == CAPACITY
    ids = ids_of(model, TEXT, 9 * W + 13)
    total_stored = 0
    for part in (ids[:100], ids[100:]):
        model.append(memory_id, token_ids=part)
        total_stored += sum(len(part[i:i + W]) - 1 for i in range(0, len(part), W))
    stats = model.memory_stats(memory_id)
    complete = total_stored // CHUNK
    assert total_stored > CAPACITY
    assert stats.tokens_held == CAPACITY
    assert stats.tokens_evicted == (complete - CAPACITY // CHUNK) * CHUNK
    assert stats.pending_tokens == total_stored % CHUNK
    assert stats.tokens_appended == len(ids)
    small = fresh_memory(model, capacity_tokens=16)
    model.append(small, token_ids=ids[:W])
    assert model.memory_stats(small).tokens_held == 16


def test_memory_lifecycle(llama_bb, fresh_memory):
    model = llama_bb
    memory_id = fresh_memory(model)
    ids = ids_of(model, TEXT, W)
    empty_reading = model.score(token_ids=ids, memory_id=memory_id).logprobs
    model.append(memory_id, OTHER_TEXT * 2)
    assert max_diff(model.score(token_ids=ids, memory_id=memory_id).logprobs, empty_reading) > 1e-3
    model.reset_memory(memory_id)
    assert _stats_tuple(model.memory_stats(memory_id)) == (0, 0, 0, 0)
    np.testing.assert_allclose(model.score(token_ids=ids, memory_id=memory_id).logprobs, empty_reading, atol=1e-6)
    model.delete_memory(memory_id)
    with pytest.raises(KeyError):
        model.memory_stats(memory_id)
    auto = model.create_memory()
    assert isinstance(auto, str) and auto
    model.delete_memory(auto)


def test_score_leaves_no_scratch_memories(llama_bb, fresh_memory):
    model = llama_bb
    memory_id = fresh_memory(model)
    before = dict(model.bank.memories)
    ids = ids_of(model, TEXT, 2 * W + 3)
    model.score(token_ids=ids)
    model.score(token_ids=ids, memory_id=memory_id)
    model.score_batch([ids, ids[:10]], [memory_id, None])
    list(model.generate(token_ids=ids, max_new_tokens=3))
    assert dict(model.bank.memories) == before


def test_score_choices_equals_scoring_each_continuation(llama_bb):
    model = llama_bb
    prefix = TEXT * 2
    choices = [" The quick brown fox", " keys and values", " bank"]
    out = model.score_choices(prefix, choices)
    prefix_ids = model.tokenize(prefix)
    for (total, count), choice in zip(out, choices):
        c = model.tokenize(choice)
        assert count == len(c)
        r = model.score(token_ids=prefix_ids + c)
        assert total == pytest.approx(float(r.logprobs[-len(c):].sum()), abs=1e-4)


# ---- retrieval ------------------------------------------------------------------------------------
def test_retrieve_spans_come_from_the_memory_stream(llama_bb, fresh_memory):
    model = llama_bb
    memory_id = fresh_memory(model)
    phrase = " zebra quasar xylophone nebula"
    text = OTHER_TEXT + phrase * 3  # ~200 tokens: under the capacity, nothing evicted
    stream = model.tokenize(text)
    model.append(memory_id, token_ids=stream)
    stats = model.memory_stats(memory_id)
    sink = model.config.memory.sink_tokens
    stored = [p for p in range(len(stream)) if p % W >= sink]  # positions that entered the memory
    assert stats.tokens_held == len(stored) // CHUNK * CHUNK and stats.tokens_evicted == 0

    query = phrase * 2
    q_ids = model.tokenize(query)
    spans = model.retrieve(memory_id, query, max_spans=10_000)
    assert spans  # something is retrieved
    assert model.memory_stats(memory_id) == stats  # retrieval does not modify the memory
    k_chunks = TOPK // CHUNK
    hq = model.backbone.num_heads
    assert sum(s.hits for s in spans) == min(len(q_ids), W) * hq * k_chunks  # every hit is in a span
    assert [s.hits for s in spans] == sorted((s.hits for s in spans), reverse=True)
    seen = set()
    for span in spans:
        assert span.text == model.tokenizer.decode(span.token_ids)
        assert 0 <= span.start_position < span.end_position <= len(stream) + W
        assert len(span.token_ids) % CHUNK == 0 and span.token_ids
        i = stored.index(span.start_position)
        positions = stored[i:i + len(span.token_ids)]
        assert span.token_ids == [stream[p] for p in positions]  # the memory's own tokens, in order
        assert not seen & set(positions)  # spans do not overlap
        seen |= set(positions)
    # only the text's last W tokens query the memory
    assert len(q_ids) > W
    tail = model.retrieve(memory_id, token_ids=q_ids[-W:], max_spans=10_000)
    assert [(s.start_position, s.hits, s.score) for s in tail] == [(s.start_position, s.hits, s.score) for s in spans]
    head = model.retrieve(memory_id, token_ids=q_ids[:W], max_spans=10_000)
    assert [(s.start_position, s.hits) for s in head] != [(s.start_position, s.hits) for s in spans]
    top = model.retrieve(memory_id, query, max_spans=2)
    assert len(top) <= 2
    assert [(s.start_position, s.token_ids) for s in top] == [(s.start_position, s.token_ids) for s in spans[:2]]
    assert model.retrieve(fresh_memory(model), query) == []  # an empty memory retrieves nothing


# ---- errors ---------------------------------------------------------------------------------------
def test_clear_errors(llama_zero, fresh_memory):
    model = llama_zero
    vocab = model.backbone.vocab_size
    memory_id = fresh_memory(model)
    for call in (lambda: model.score(""), lambda: model.score(token_ids=[]),
                 lambda: model.score(token_ids=[1, vocab]), lambda: model.score(token_ids=[-1, 2]),
                 lambda: model.score("abc", token_ids=[1, 2]), lambda: model.score(),
                 lambda: model.append(memory_id, ""), lambda: model.append(memory_id),
                 lambda: model.append(memory_id, token_ids=[vocab + 5]),
                 lambda: model.retrieve(memory_id), lambda: model.score_choices("abc", []),
                 lambda: next(model.generate(""))):
        with pytest.raises(ValueError):
            call()
    assert _stats_tuple(model.memory_stats(memory_id)) == (0, 0, 0, 0)
    for call in (lambda: model.score("abc", "no-such-memory"), lambda: model.append("no-such-memory", "abc"),
                 lambda: model.retrieve("no-such-memory", "abc"), lambda: model.memory_stats("no-such-memory"),
                 lambda: model.delete_memory("no-such-memory"), lambda: model.reset_memory("no-such-memory"),
                 lambda: model.score_batch([[1, 2]], ["no-such-memory"]),
                 lambda: next(model.generate("abc", "no-such-memory")),
                 lambda: model.create_memory(memory_id)):
        with pytest.raises(KeyError):
            call()


# ---- regressions of bugs found while writing these tests ----------------------------------------
def test_score_batch_rejects_mismatched_memory_ids(llama_zero):
    docs = [ids_of(llama_zero, TEXT, 10), ids_of(llama_zero, OTHER_TEXT, 10)]
    with pytest.raises(ValueError, match="memory ids"):
        llama_zero.score_batch(docs, [None])


def test_score_batch_validates_token_ids(llama_zero):
    vocab = llama_zero.backbone.vocab_size
    with pytest.raises(ValueError, match="vocabulary"):
        llama_zero.score_batch([[1, 2, vocab]])
    with pytest.raises(ValueError, match="no tokens"):
        llama_zero.score_batch([[]])
    with pytest.raises(ValueError, match="docs"):
        llama_zero.score_batch([])


def test_span_positions_cover_exactly_its_tokens(llama_bb, fresh_memory):
    """A span is a stream range; its tokens are the stored ones in it (segment sinks are never stored)."""
    model = llama_bb
    memory_id = fresh_memory(model)
    stream = ids_of(model, TEXT, 3 * W)
    model.append(memory_id, token_ids=stream)
    spans = model.retrieve(memory_id, token_ids=stream, max_spans=10_000)
    assert spans
    sink = model.config.memory.sink_tokens
    for span in spans:
        stored = [t for p, t in enumerate(stream[span.start_position:span.end_position], span.start_position)
                  if p % W >= sink]
        assert span.token_ids == stored, span
        assert span.text == model.decode(span.token_ids)
    assert any(span.end_position - span.start_position > len(span.token_ids) for span in spans)
