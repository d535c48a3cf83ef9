"""Re-reading at answer time: the memory's best spans, widened, their stored token ids placed before the
prompt in stream order, within a budget taken from the window (longmem/reader.py, LocalReader.reread)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CHUNK, TEXT, W, tiny_config

from longmem.memory import Chunker, ChunkStore, Memory
from longmem.model import LongMem
from longmem.reader import rank_centers, spans_around
from longmem.roles import Span, reread_prefix, separator_ids, windows
from longmem.striped import Route, lexical_route, stored_route

FACT_TEXT = "Long documents are read in segments. The vault code is zebra quasar. Keys go into a bank. "


def test_windows_score_every_token_of_the_text_once():
    ids = list(range(100, 200))
    plain = windows(ids, 32)
    assert [len(x.ids) for x in plain] == [32, 32, 32, 4] and not any(x.reread for x in plain)
    prefix = [1, 2, 3, 4, 5, 6]
    read = windows(ids, 32, prefix)
    last = read[-1]
    assert last.reread and len(last.ids) == 32 and last.ids[:6] == prefix and last.ids[6:] == ids[-26:]
    assert [t for x in read[:-1] for t in x.ids] == ids[:-26]  # the rest of the text, in order, unchanged
    scored = [t for x in read for t in x.targets[x.scored_from:]]
    assert scored == ids[1:]  # every token after the first is predicted exactly once, re-read ones never
    short = windows(ids[:10], 32, prefix)
    assert len(short) == 1 and short[0].targets[short[0].scored_from:] == ids[1:10]


def _chunks(n: int, c: int = CHUNK):
    chunker = Chunker(c, 1, 2)
    t = n * c
    return chunker.push(np.zeros((t, 1, 2), np.float32), np.zeros((t, 1, 2), np.float32),
                        np.arange(1000, 1000 + t, dtype=np.int32))


@pytest.mark.parametrize("stripes", [1, 3])
def test_a_striped_memory_holds_what_one_store_would(stripes):
    """stored_route over stores striped by seq % S (with the global FIFO) answers as one store does."""
    chunks, capacity = _chunks(40), 24
    flat = ChunkStore(capacity, CHUNK, 1, 2)
    flat.add(chunks)
    stores = {f"s{i}": ChunkStore(capacity // stripes, CHUNK, 1, 2) for i in range(stripes)}
    for i, store in enumerate(stores.values()):
        store.add(chunks.select(chunks.seqs % stripes == i))
        store.evict_before(40 - capacity)
    route = Route("m", tuple(stores))
    asked = np.array([0, 5, 15, 16, 17, 30, 39, 45, 17])
    got = stored_route(lambda calls: [stores[s].stored(q) for s, _, q in calls], route, asked, CHUNK)
    want = flat.stored(asked)
    assert got.seqs.tolist() == want.seqs.tolist() == [16, 17, 30, 39]  # evicted and unknown seqs are skipped
    np.testing.assert_array_equal(got.token_ids, want.token_ids)
    np.testing.assert_array_equal(got.positions, want.positions)
    assert got.token_ids[0].tolist() == list(range(1000 + 16 * CHUNK, 1000 + 17 * CHUNK))


def test_spans_around_centres_are_merged_in_stream_order_and_never_past_the_memory():
    store = ChunkStore(64, CHUNK, 1, 2)
    store.add(_chunks(20))
    dense = (np.array([0, 10, 11, 12, 19]), np.array([5, 9, 1, 3, 2]))
    centres = [(10, 1.0), (0, 0.8), (12, 0.5), (19, 0.2)]  # best first
    out = spans_around(centres, dense, store.stored, most=3, decode=str)
    assert [(s.first_seq, s.last_seq) for s in out] == [(0, 1), (9, 13), (18, 19)]  # 10 and 12 merged
    assert [s.start_position for s in out] == sorted(s.start_position for s in out)
    assert sum(len(s.token_ids) for s in out) <= len(centres) * 3 * CHUNK
    assert out[1].hits == 13 and out[1].score == 1.0
    assert out[0].token_ids == list(range(1000, 1000 + 2 * CHUNK))  # the stored ids, cut at the stream's start
    assert out[2].last_seq == 19  # and at its end: nothing past what the memory holds


def test_rank_centres_mixes_dense_and_lexical_scores():
    dense = (np.array([3, 4, 5, 40]), np.array([4, 4, 4, 10]))  # 3-5 together outweigh 40 within radius 1
    lexical = (np.array([20, 40]), np.array([1.0, 0.1]))
    assert [c for c, _ in rank_centers(dense, lexical, 0.0, 1, 4, 2)] == [4, 40]
    assert [c for c, _ in rank_centers(dense, lexical, 1.0, 1, 4, 2)] == [20, 40]
    mixed = rank_centers(dense, lexical, 0.5, 1, 4, 3)
    assert [c for c, _ in mixed] == [4, 20, 40] and mixed[2][1] == pytest.approx(0.5 * 10 / 12 + 0.5 * 0.1)
    assert [c for c, _ in rank_centers(dense, lexical, 0.0, 1, 100, 3)] == [4]  # centres stay a span apart
    # 40 scores 0.467 against the best's 0.5: below 95% of it, it is not re-read
    assert [c for c, _ in rank_centers(dense, lexical, 0.5, 1, 4, 3, min_ratio=0.95)] == [4, 20]
    assert [c for c, _ in rank_centers(dense, lexical, 0.5, 1, 4, 3, min_ratio=0.9)] == [4, 20, 40]


def test_lexical_search_of_stored_ids_is_bm25_over_chunks_and_striped_alike():
    chunks = _chunks(30)
    flat = Memory("m", 30 * CHUNK, CHUNK, 1, 2)
    flat.store.add(chunks)
    terms = np.array([1000 + 4 * CHUNK, 1000 + 4 * CHUNK + 1, 1000 + 9 * CHUNK, 1000 + 9 * CHUNK, 7])  # chunk 4 holds two
    hits = flat.lexical(terms, 5, 1.2)
    assert hits.seqs.tolist() == [4, 9] and hits.scores[0] > hits.scores[1] > 0
    stores = {f"s{i}": ChunkStore(10, CHUNK, 1, 2) for i in range(3)}
    for i, store in enumerate(stores.values()):
        store.add(chunks.select(chunks.seqs % 3 == i))
    got = lexical_route(lambda calls: [stores[s].term_frequencies(t) for s, _, t in calls],
                        lambda calls, k, k1: [stores[s].lexical(t, idf, k, k1) for s, _, t, idf in calls],
                        Route("m", tuple(stores)), terms, 5, 1.2)
    assert got.seqs.tolist() == [4, 9]
    np.testing.assert_allclose(got.scores, hits.scores, rtol=1e-6)  # the idf of the whole memory, not a store's


@pytest.fixture(scope="module")
def identity(tiny_llama_dir):
    """A tiny LongMem whose reader is exactly the backbone (memory_read added, identity start)."""
    config = tiny_config(tiny_llama_dir, "zero")
    config.sidenet.memory_read = "added"
    config.sidenet.checkpoint = None
    return LongMem(config)


def test_generate_reads_the_reread_tokens_in_its_window(identity, fresh_memory):
    """With the identity reader the memory changes an answer only through what is re-read: generating
    with memory equals generating from the re-read prefix + prompt with no memory."""
    model = identity
    memory_id = fresh_memory(model)
    model.append(memory_id, TEXT + FACT_TEXT + TEXT)
    prompt = model.tokenize("vault code is")
    spans = model.reread(memory_id, token_ids=prompt)
    assert spans and [s.start_position for s in spans] == sorted(s.start_position for s in spans)
    cfg = model.config.read
    prefix = model.reread_prefix(spans)
    assert prefix == reread_prefix(spans, separator_ids(model.tokenizer, cfg.reread_separator))
    assert 0 < len(prefix) <= cfg.reread_budget < W  # the budget, inside the window
    assert len(prefix) + len(prompt) <= W  # so the plain read below has the same one window
    answer = list(model.generate(token_ids=prompt, memory_id=memory_id, max_new_tokens=6))
    assert answer == list(model.generate(token_ids=prefix + prompt, use_memory=False, max_new_tokens=6))
    assert answer == list(model.generate(token_ids=prompt, memory_id=memory_id, max_new_tokens=6, reread=spans))
    question, choices = "code is", [" zebra", " dog"]
    scored = model.score_choices(question, choices, memory_id)
    pre = model.reread_prefix(model.reread(memory_id, question))
    assert pre and len(pre) + len(model.tokenize(question + choices[0])) <= W
    want, _ = model.score_continuations([pre + model.tokenize(question)], [model.tokenize(c) for c in choices],
                                        use_memory=False)
    assert [lp for lp, _ in scored] == pytest.approx(want[0].tolist(), abs=1e-4)


def test_without_memory_the_identity_reader_is_the_backbone(identity):
    r = identity.score(TEXT * 3, use_memory=False)
    np.testing.assert_allclose(r.logprobs, r.backbone_logprobs, atol=1e-5)


def test_reread_off_answers_from_the_memory_read_alone(tiny_llama_dir, fresh_memory):
    config = tiny_config(tiny_llama_dir, "zero", reread=[])
    config.sidenet.memory_read, config.sidenet.checkpoint = "added", None
    model = LongMem(config)
    memory_id = fresh_memory(model)
    model.append(memory_id, TEXT + FACT_TEXT)
    assert model.answer_spans("generate", memory_id, model.tokenize("The vault code is"), True) == []
    with pytest.raises(ValueError, match="reread"):
        tiny_config(tiny_llama_dir, reread=["everything"]).validate()


QUESTION, CHOICES = "code is", [" zebra", " dog"]


def answering(tiny_llama_dir, fresh_memory, memory_read: str):
    """An untrained tiny LongMem answering with read.reread_memory_read=memory_read, a memory holding the
    fact amid text, the question's tokens and the spans it re-reads."""
    config = tiny_config(tiny_llama_dir, "backbone", reread_memory_read=memory_read)
    config.sidenet.checkpoint = None
    model = LongMem(config)
    memory_id = fresh_memory(model)
    model.append(memory_id, TEXT + FACT_TEXT + TEXT)
    prompt = model.tokenize(QUESTION)
    return model, memory_id, prompt, model.reread(memory_id, token_ids=prompt)


def test_without_the_memory_read_an_answer_reads_only_its_window(tiny_llama_dir, fresh_memory):
    """read.reread_memory_read="none": after re-read spans the answer comes from the window alone (re-read
    prefix + prompt), for Generate and ScoreChoices; with the memory read, the answer changes."""
    model, memory_id, prompt, spans = answering(tiny_llama_dir, fresh_memory, "none")
    question, choices = QUESTION, CHOICES
    prefix = model.reread_prefix(spans)
    assert prefix and len(prefix) + len(prompt) + 4 <= W
    plain = list(model.generate(token_ids=prefix + prompt, use_memory=False, max_new_tokens=4))
    assert list(model.generate(token_ids=prompt, memory_id=memory_id, max_new_tokens=4)) == plain
    want, _ = model.score_continuations([prefix + prompt], [model.tokenize(c) for c in choices], use_memory=False)
    scored = [lp for lp, _ in model.score_choices(question, choices, memory_id)]
    assert scored == pytest.approx(want[0].tolist(), abs=1e-4)
    text = prompt + model.tokenize(choices[0])  # a re-read prefix as lm-eval's loglikelihood passes it
    alone = model.score_batch([prefix + text], use_memory=False)[0].logprobs[len(prefix):]
    np.testing.assert_allclose(model.score_batch([text], [memory_id], prefixes=[prefix])[0].logprobs, alone,
                               atol=1e-4)
    model.config.read.reread_memory_read = "memory"
    with_read = [lp for lp, _ in model.score_choices(question, choices, memory_id)]
    assert with_read != pytest.approx(scored, abs=1e-3)


def test_a_memory_read_of_the_spans_reads_the_re_read_tokens_alone(tiny_llama_dir, fresh_memory):
    """read.reread_memory_read="spans": the answer's memory read searches a temporary memory holding the
    re-read tokens alone, for Generate and ScoreChoices: the same answer as re-reading those spans over a
    memory that holds nothing else; the temporary memory is gone afterwards, and the validation names the
    modes."""
    model, memory_id, prompt, spans = answering(tiny_llama_dir, fresh_memory, "spans")
    question, choices = QUESTION, CHOICES
    prefix = model.reread_prefix(spans)
    only = fresh_memory(model)
    model.append(only, token_ids=prefix)  # the re-read tokens and nothing else, encoded as one text
    before = {m.memory_id for m in model.list_memories()}
    focused = list(model.generate(token_ids=prompt, memory_id=memory_id, max_new_tokens=4))
    focused_choices = [lp for lp, _ in model.score_choices(question, choices, memory_id)]
    text = prompt + model.tokenize(choices[0])
    focused_text = model.score_batch([text], [memory_id], prefixes=[prefix])[0].logprobs
    assert {m.memory_id for m in model.list_memories()} == before
    model.config.read.reread_memory_read = "memory"
    assert list(model.generate(token_ids=prompt, memory_id=only, max_new_tokens=4, reread=spans)) == focused
    np.testing.assert_allclose(model.score_batch([text], [only], prefixes=[prefix])[0].logprobs, focused_text,
                               atol=1e-5)
    wide = [lp for lp, _ in model.score_choices(question, choices, memory_id)]
    assert wide != pytest.approx(focused_choices, abs=1e-3)  # the whole memory's read differs
    model.config.read.reread_memory_read = "none"
    assert [lp for lp, _ in model.score_choices(question, choices, memory_id)] != pytest.approx(focused_choices,
                                                                                               abs=1e-3)
    with pytest.raises(ValueError, match="reread_memory_read"):
        tiny_config(tiny_llama_dir, reread_memory_read="all").validate()
