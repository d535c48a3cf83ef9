"""longmem.evaluate on the tiny random llama backbone with tiny sizes: the whole evaluation writes its
report, results and plots with sane numbers; the cached-filler passkey memory equals appending the
whole text; ICL demonstrations and test words are disjoint; ChapterBreak candidates hold the true
opening exactly once. The held-out documents are a reStructuredText corpus the tests generate from the
essays (conftest.rst_corpus), standing in for the Python docs `longmem eval` holds out."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import W
from longmem.config import LongMemConfig
from longmem.data import passkey_prompt_parts, sentiment_lexicon
from longmem.evaluate.chapter import chapter_items, section_breaks
from longmem.evaluate.common import heldout_documents
from longmem.evaluate.harness import FillerMemory, passkey_filler_ids
from longmem.evaluate.icl import icl_split
from longmem.evaluate.ppl import position_buckets
from longmem.evaluate.run import PARTS, evaluate

TINY_EVAL = {
    "ppl_docs": 2, "ppl_doc_tokens": 5 * W, "position_buckets": 4, "full_window_tokens": 3 * W,
    "chapter_items": 3, "chapter_prefix_tokens": 3 * W, "chapter_candidates": 3, "chapter_opening_tokens": 8,
    "icl_memory_demos": 24, "icl_local_demos": 2, "icl_test_items": 6,
    "passkey_lengths": [2 * W - 7, 4 * W + 5, 12 * W], "passkey_trials": 2, "unseen_corpora": ["essays"],
    "filler_tokens": 6 * W, "recall_lengths": [3 * W], "recall_facts": 3, "unseen_phrasing_lengths": [2 * W],
    "person_lengths": [2 * W], "updated_lengths": [3 * W], "updated_gap_tokens": W // 2, "recall_trials": 3, "seed": 0,
}


@pytest.fixture(scope="module")
def eval_config(rst_corpus):
    """The model's config with the tiny evaluation sizes, holding out every document of rst_corpus."""
    def make(model, **changes) -> LongMemConfig:
        data = model.config.to_dict()
        data["eval"] = {**data["eval"], **TINY_EVAL, "corpus": rst_corpus, **changes}
        data["train"] = {**data["train"], "heldout_fraction": 1.0}
        return LongMemConfig.from_dict(data)
    return make


@pytest.fixture(scope="module")
def heldout(llama_bb, eval_config):
    docs = heldout_documents(eval_config(llama_bb))
    assert len(docs) >= TINY_EVAL["chapter_items"], "too few held-out documents"
    return docs


def test_evaluate_writes_report_results_and_plots(llama_bb, tmp_path, eval_config):
    model = llama_bb
    config = eval_config(model)
    memories_before = {m.memory_id for m in model.list_memories()}
    parts = [p for p in PARTS if p != "conversation"]  # a chat turn needs a larger window: tests/test_chat.py
    results = evaluate(model, config, tmp_path, parts, progress=False)

    report = (tmp_path / "report.md").read_text()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == results
    for part in parts:
        assert results[part]["seconds"] > 0
        for plot in results[part]["plots"]:
            assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({plot})" in report
    assert {m.memory_id for m in model.list_memories()} == memories_before  # every memory deleted
    for heading in ("## Setup", "## Long-document perplexity", "## ChapterBreak", "## Many-shot", "## Passkey",
                    "## Recall of facts"):
        assert heading in report
    assert "untrained" in report and str(model.backbone.path) in report

    ppl = results["ppl"]["corpora"]["essays"]
    assert ppl["items"] == TINY_EVAL["ppl_docs"] and ppl["doc_tokens"] == TINY_EVAL["ppl_doc_tokens"]
    assert ppl["full_window_tokens"] == TINY_EVAL["full_window_tokens"]
    assert len(ppl["buckets"]) == TINY_EVAL["position_buckets"]
    assert set(ppl["methods"]) == {"backbone_w", "backbone_full", "sidenet", "longmem"}
    for m in ppl["methods"].values():
        for value in [m["ppl"], m["after_first_segment"], *m["per_doc"], *m["by_position"]]:
            assert math.isfinite(value) and value > 1

    chapter = results["chapter"]
    assert chapter["items"] == TINY_EVAL["chapter_items"]
    assert chapter["chance"] == pytest.approx(1 / TINY_EVAL["chapter_candidates"])
    icl = results["icl"]
    assert icl["items"] == TINY_EVAL["icl_test_items"] and icl["memory_demos"] == TINY_EVAL["icl_memory_demos"]
    assert icl["majority_baseline"] == pytest.approx(0.5)  # balanced test labels
    for part in (chapter, icl):
        for a in part["accuracy"].values():
            assert 0 <= a["accuracy"] <= 1
            assert a["accuracy"] == pytest.approx(a["correct"] / part["items"])

    passkey = results["passkey"]
    assert passkey["items"] == len(TINY_EVAL["passkey_lengths"]) * TINY_EVAL["passkey_trials"]
    assert [b["filler_tokens"] for b in passkey["by_length"]] == sorted(TINY_EVAL["passkey_lengths"])
    for b in passkey["by_length"]:
        assert 0 <= b["accuracy"] <= 1 and b["trials"] == TINY_EVAL["passkey_trials"]
        assert 0 <= b["control_accuracy"] <= 1
        assert b["evicted"] == 0  # every trial's memory holds its whole document
    for t in passkey["trials"]:
        assert len(t["key"]) == 5 and t["key"].isdigit()
        assert t["memory_capacity"] >= t["document_tokens"] - passkey["question_tokens"]
    # The filler was encoded once (one phase), not once per trial, and only up to eval.filler_tokens.
    assert len(passkey["filler_phases"]) == 1 and passkey["filler_tokens"] == TINY_EVAL["filler_tokens"]
    assert passkey["filler_segments_encoded"] <= math.ceil(TINY_EVAL["filler_tokens"] / W)
    assert any("repeat" in n for n in passkey["notes"])

    recall = results["recall"]
    assert [(b["set"], b["filler_tokens"]) for b in recall["by_set"]] == [
        ("facts8", 3 * W), ("person", 2 * W), ("unseen_phrasing", 2 * W), ("updated", 3 * W)]
    assert sum(t["facts"] == TINY_EVAL["recall_facts"] for t in recall["trials"] if t["set"] == "facts8") == 3
    assert {t["kind"] for t in recall["trials"] if t["set"] == "unseen_phrasing"} == {"passkey", "words", "person"}
    for t in recall["trials"]:
        assert t["answer"] not in passkey_filler_text(model, eval_config)  # answers occur only where stated
        assert (t["replaced"] is not None) == (t["set"] == "updated")
        assert t["reread_top1_hit"] <= t["reread_hit"] and (t["reread_rank"] is None) != t["reread_hit"]
        assert len(t["reread_scores"]) == len(t["reread"])
    updated = [t for t in recall["trials"] if t["set"] == "updated"]
    assert {t["kind"] for t in updated} == {"passkey", "words", "person"} and recall["updated_trials"] == len(updated)
    assert all(len(t["statements"]) == 2 and t["replaced"] != t["answer"] for t in updated)
    headline = results["headline"]
    assert list(on_disk)[0] == "headline"
    assert set(headline["passkey"]) == {str(n) for n in TINY_EVAL["passkey_lengths"]}
    assert set(headline["facts8"]) == {str(3 * W)} and set(headline["unseen_phrasing"]) == {str(2 * W)}
    for name in ("passkey", "facts8", "person", "unseen_phrasing", "updated"):  # the baselines and span recall, per length
        for column in ("_bm25", "_full", "_span_recall_at_1", "_span_recall_at_k"):
            assert set(headline[name + column]) == set(headline[name])
        for n, at_1 in headline[f"{name}_span_recall_at_1"].items():
            assert 0 <= at_1 <= headline[f"{name}_span_recall_at_k"][n] <= 1
    assert "BM25 prompt (backbone)" in report and "whole text in window (backbone)" in report
    for t in passkey["trials"] + recall["trials"]:
        assert isinstance(t["bm25_match"], bool) and isinstance(t["bm25_hit"], bool)
        if t["document_tokens"] > TINY_EVAL["full_window_tokens"]:  # the whole text does not fit: n/a
            assert t["full_match"] is None
    assert all(v is None for v in headline["passkey_full"].values())  # no passkey document fits in 3 W tokens
    assert set(headline["ppl_after_first_segment"]["essays"]) >= {"longmem", "sidenet", "backbone_w", "longmem_vs_sidenet"}


def passkey_filler_text(model, eval_config) -> str:
    from longmem.evaluate.common import eval_data

    config = eval_config(model)
    return model.decode(passkey_filler_ids(model, eval_data(config).unseen_documents, TINY_EVAL["filler_tokens"],
                                           random.Random(config.eval.seed)))


def test_evaluate_runs_selected_parts_only(llama_bb, tmp_path, eval_config):
    results = evaluate(llama_bb, eval_config(llama_bb, ppl_docs=1, position_buckets=2), tmp_path,
                       parts=("ppl",), progress=False)
    assert set(results) == {"headline", "setup", "ppl"}
    assert not (tmp_path / "passkey.png").exists()
    with pytest.raises(ValueError, match="unknown evaluation parts"):
        evaluate(llama_bb, eval_config(llama_bb), tmp_path, parts=("ppl", "squad"))


def test_parts_run_separately_accumulate_in_one_report_of_the_same_setup(llama_bb, tmp_path, eval_config):
    config = eval_config(llama_bb, ppl_docs=1, position_buckets=2)
    first = evaluate(llama_bb, config, tmp_path, parts=("ppl",), progress=False)
    both = evaluate(llama_bb, config, tmp_path, parts=("icl",), progress=False)
    assert set(both) == {"headline", "setup", "ppl", "icl"}
    assert both["ppl"] == first["ppl"] and set(both["headline"]) >= {"ppl", "icl"}
    report = (tmp_path / "report.md").read_text()
    assert "## Long-document perplexity" in report and "## Many-shot" in report
    # another setup (here: other eval sizes) starts a new report instead of mixing results
    other = evaluate(llama_bb, eval_config(llama_bb, ppl_docs=1, position_buckets=2, icl_test_items=4), tmp_path,
                     parts=("icl",), progress=False)
    assert set(other) == {"headline", "setup", "icl"}
    assert json.loads((tmp_path / "results.json").read_text()) == other


def test_a_setting_added_since_an_earlier_run_keeps_that_runs_setup():
    from longmem.evaluate.run import same_setup

    earlier = {"backbone": "x", "torch_threads": 2, "eval_config": {"ppl_docs": 1}}
    assert same_setup(earlier, {"backbone": "x", "torch_threads": 1,
                                "eval_config": {"ppl_docs": 1, "conversation_trials": 20}})
    assert not same_setup(earlier, {"backbone": "x", "eval_config": {"ppl_docs": 2, "conversation_trials": 20}})
    assert not same_setup(earlier, {"backbone": "y", "eval_config": {"ppl_docs": 1}})


def _search_rows(model, memory_id, queries):
    return model.bank.search([[memory_id]], queries, 4)[0]


@pytest.mark.parametrize("intro_kind", ["key", "short"])
def test_cached_filler_memory_equals_appending_the_whole_text(llama_bb, heldout, fresh_memory, intro_kind):
    model = llama_bb
    rng = random.Random(1)
    n_max = 5 * W + 3
    filler = FillerMemory(model, passkey_filler_ids(model, heldout, n_max, rng))
    intro = passkey_prompt_parts("48213")[0] if intro_kind == "key" else "Key 7.\n"
    intro_ids = model.tokenize(intro)
    if intro_kind == "key":
        assert len(intro_ids) > W  # the intro spans two segments with the tiny tokenizer
    else:
        assert len(intro_ids) < W
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 6, model.backbone.num_heads, model.backbone.head_dim, generator=generator)
    for n in (n_max, 2 * W, W - len(intro_ids) % W - 1, 3):
        cached, full = fresh_memory(model, 512), fresh_memory(model, 512)
        stats_cached = filler.fill(cached, intro_ids, n)
        stats_full = model.bank.stats(full)
        model.append(full, token_ids=intro_ids + filler.ids[:n])
        stats_full = model.memory_stats(full)
        assert dataclasses.replace(stats_cached, memory_id="") == dataclasses.replace(stats_full, memory_id="")
        a, b = model.bank.get(cached), model.bank.get(full)
        live = a.store.live
        assert live == b.store.live and live > 0
        np.testing.assert_array_equal(a.store.token_ids[:live], b.store.token_ids[:live])
        np.testing.assert_array_equal(a.store.positions[:live], b.store.positions[:live])
        rtol = max(1e-5, 2 * np.finfo(a.store.dtype).eps)  # float16 storage: one rounding step apart at most
        np.testing.assert_allclose(a.store.keys[:live], b.store.keys[:live], rtol=rtol, atol=1e-5)
        np.testing.assert_allclose(a.store.values[:live], b.store.values[:live], rtol=rtol, atol=1e-5)
        np.testing.assert_array_equal(a.chunker.pending_ids, b.chunker.pending_ids)
        hits_a, hits_b = _search_rows(model, cached, queries), _search_rows(model, full, queries)
        np.testing.assert_array_equal(hits_a.seqs, hits_b.seqs)
        np.testing.assert_array_equal(hits_a.positions, hits_b.positions)
        np.testing.assert_array_equal(hits_a.token_ids, hits_b.token_ids)
        np.testing.assert_allclose(hits_a.scores, hits_b.scores, rtol=1e-5, atol=1e-5)
    assert filler.segments_encoded <= math.ceil(n_max / W)  # encoded once, reused for every n


def test_icl_split_is_disjoint_balanced_and_deterministic():
    lexicon = sentiment_lexicon()
    memory, local, test = icl_split(lexicon, 101, 4, 20, random.Random(0))
    assert (len(memory), len(local), len(test)) == (101, 4, 20)
    words = [w for w, _ in memory + local + test]
    assert len(set(words)) == len(words)  # disjoint, no repeats
    assert sum(label for _, label in test) == 10 and sum(label for _, label in local) == 2
    assert abs(sum(label for _, label in memory) - 50.5) == 0.5
    assert dict(lexicon)[test[0][0]] == test[0][1]
    assert icl_split(lexicon, 101, 4, 20, random.Random(0)) == (memory, local, test)
    with pytest.raises(ValueError, match="too few"):
        icl_split(lexicon[:50], 40, 4, 20, random.Random(0))


def test_chapter_candidates_include_the_true_opening_exactly_once(llama_bb, heldout, eval_config):
    model = llama_bb
    config = eval_config(model, chapter_items=6, chapter_candidates=4)
    ev = config.eval
    items = chapter_items(model, config, heldout, random.Random(3))
    assert len(items) == 6
    texts = {d.name: d.text for d in heldout}
    for item in items:
        text = texts[item.doc]
        assert len(section_breaks(text)) >= 6
        true = model.tokenize(text[item.offset:item.offset + 2000])[:ev.chapter_opening_tokens]
        assert sum(c == true for c in item.candidates) == 1
        assert item.candidates[item.answer] == true
        assert len(item.candidates) == ev.chapter_candidates
        assert all(len(c) == ev.chapter_opening_tokens for c in item.candidates)
        assert item.heading in text[item.offset:item.offset + 400].splitlines()[:2]
        before = model.tokenize(text[:item.offset])
        context = item.memory_ids + item.local_ids
        assert context == before[-len(context):] and len(context) <= ev.chapter_prefix_tokens
        assert len(item.memory_ids) >= W and len(item.local_ids) + ev.chapter_opening_tokens <= W


def test_section_breaks_find_rest_headings_only():
    text = ("Title\n=====\n\nIntro text.\n\n--------------\n\nFirst\n-----\n\nBody\nnot a heading\n"
            "-------------\n\n    indented\n    ~~~~~~~~\n\n*****\nOver\n*****\n\nShort underline\n---\n\n"
            "Last one\n^^^^^^^^^^^^\n")
    breaks = section_breaks(text)
    assert [t for _, t in breaks] == ["Title", "First", "Over", "Last one"]
    assert [text[o:].split("\n", 1)[0] for o, _ in breaks] == ["Title", "First", "*****", "Last one"]


def test_position_buckets_cover_every_position():
    ranges = position_buckets(100, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_filler_longer_than_encoded_repeats_its_segments(llama_bb, heldout, fresh_memory):
    """n beyond the encoded filler: the memory equals appending the text whose filler segments cycle."""
    model = llama_bb
    filler = FillerMemory(model, passkey_filler_ids(model, heldout, 4 * W, random.Random(2)))
    intro_ids = model.tokenize("Key 7.\n")
    n = 11 * W  # almost three times the 4 W encoded tokens
    cached, full = fresh_memory(model, 1024), fresh_memory(model, 1024)
    stats = filler.fill(cached, intro_ids, n)
    assert stats.tokens_appended == len(intro_ids) + n and filler.repeats(n) == n / (4 * W)
    assert filler.segments_encoded <= 4  # nothing encoded beyond the filler
    phase = W - len(intro_ids)
    period = (4 * W - phase) // W * W
    cycled = (filler.ids[phase:phase + period] * 4)[:n - phase]
    model.append(full, token_ids=intro_ids + filler.ids[:phase] + cycled)
    a, b = model.bank.get(cached).store, model.bank.get(full).store
    assert a.live == b.live > 0
    np.testing.assert_array_equal(a.token_ids[:a.live], b.token_ids[:b.live])
    np.testing.assert_allclose(a.keys[:a.live], b.keys[:b.live], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.values[:a.live], b.values[:b.live], rtol=1e-5, atol=1e-5)
