"""The recall curriculum and the frozen-backbone cache: answers only where stated, held-out phrasings
never in training, a cached training step equal to an uncached one."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch

from longmem.curriculum import KINDS, QUESTIONS, STATEMENTS, UPDATES, Curriculum, CurriculumConfig, Fact, phrasings
from longmem.data import essays
from longmem.cache import FrozenEncoder
from longmem.train import Trainer
from tests.test_train import tiny_config

FILLER = [text for _, text in essays()[:3]]


class Words:
    """A word-level tokenizer over a growing vocabulary: decode(tokenize(text)) == text exactly."""

    def __init__(self):
        self.vocab: list[str] = []
        self.ids: dict[str, int] = {}

    def tokenize(self, text: str) -> list[int]:
        out = []
        for piece in re.findall(r"\s+|\w+|[^\w\s]", text):
            if piece not in self.ids:
                self.ids[piece] = len(self.vocab)
                self.vocab.append(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


@pytest.fixture(scope="module")
def curriculum():
    words = Words()
    ids = [t for text in FILLER for t in words.tokenize(text)]
    pool = [ids[s:s + 1024] for s in range(0, len(ids), 1024)]
    config = CurriculumConfig(segment_tokens=1024, prefix_tokens=300, segment_start_fraction=0.25, gap_tokens=30,
                              suffix_tokens=16, local_tokens=64, max_facts=8, number_digits=(5, 7),
                              answer_end=".")
    return Curriculum(pool, words.tokenize, words.decode, config), words


@pytest.mark.parametrize("kind", KINDS)
def test_answers_occur_only_where_stated(curriculum, kind):
    cur, words = curriculum
    rng = random.Random(0)
    for _ in range(40):
        ex = cur.example(rng, kind)
        memory = cur.filler_text + "\n" + words.decode(ex.fact_segment)
        reading = words.decode(ex.reading)
        values = [f.value for f in ex.facts]
        assert len(set(values)) == len(values)
        assert words.decode(ex.reading[-ex.answer_tokens:]) == " " + ex.answer + "."  # scored up to where it stops
        assert reading.endswith(ex.question + " " + ex.answer + ".")
        assert ex.answer not in reading[:-len(ex.answer) - 1], "the answer leaks into the reading segment"
        for fact, statement in zip(ex.facts, ex.statements):
            assert fact.value in statement
            # every occurrence of a value in the memory lies inside that fact's statement
            stated = memory.count(statement) * statement.count(fact.value)
            assert memory.count(fact.value) == stated, (fact, statement)
            assert memory.count(statement) == 1
        if kind == "passkey":
            assert len(ex.facts) == 1 and len(ex.answer) >= 5
        if kind == "words":
            assert 2 <= len(ex.facts) <= 8


def test_held_out_phrasings_never_appear_in_training_examples(curriculum):
    cur, words = curriculum
    rng = random.Random(1)
    heldout_statements, heldout_questions = phrasings(STATEMENTS, True), phrasings(QUESTIONS, True)
    assert heldout_statements and heldout_questions
    assert phrasings(STATEMENTS, False) and phrasings(QUESTIONS, False)
    for i in range(300):
        ex = cur.example(rng, KINDS[i % len(KINDS)])
        text = words.decode(ex.fact_segment) + words.decode(ex.reading)
        for fact in ex.facts:
            for p in heldout_statements + heldout_questions:
                assert fact.render(p) not in text
        for p in heldout_statements + heldout_questions:  # the fixed words of each held-out template
            for fragment in re.split(r"\{\w+\}", p.text):
                if len(fragment.strip()) > 12:
                    assert fragment not in text, fragment
    unseen = [cur.example(rng, kind, heldout=True) for kind in KINDS for _ in range(10)]
    assert all(any(ex.facts[ex.asked].render(p) == ex.question for p in heldout_questions) for ex in unseen)
    assert all(any(f.render(p) == s for p in heldout_statements) for ex in unseen for f, s in zip(ex.facts, ex.statements))


def test_an_empty_answer_end_scores_the_value_alone(curriculum):
    cur, words = curriculum
    bare = Curriculum(cur.pool, words.tokenize, words.decode, dataclasses.replace(cur.config, answer_end=""))
    ex = bare.example(random.Random(4), "words")
    assert words.decode(ex.reading[-ex.answer_tokens:]) == " " + ex.answer


def test_facts_sit_anywhere_in_their_segment(curriculum):
    cur, words = curriculum
    rng = random.Random(2)
    starts = []
    for _ in range(100):
        ex = cur.example(rng, "passkey")
        starts.append(words.decode(ex.fact_segment).index(ex.statements[0]))
    assert min(starts) == 0 and max(starts) > 200


def _lm_grads(trainer: Trainer) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    lm, distill, _ = trainer.lm_loss()
    loss = lm + distill
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.params.items() if p.grad is not None}


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 5e-2)])
def test_a_cached_step_equals_an_uncached_one(tiny_llama_dir, tmp_path, dtype, tol):
    overrides = dict(recall_rows=0, val_every=0, train_blocks=2, cache_dtype=dtype)
    cached = Trainer(tiny_config(tiny_llama_dir, cache=True, **overrides), tmp_path / "cached")
    assert cached.warm_cache() == len(cached.pool) == cached.frozen.misses
    plain = Trainer(tiny_config(tiny_llama_dir, cache=False, **overrides), tmp_path / "plain")
    for _ in range(3):  # reading from the cache: later segments also retrieve from cached keys/values
        loss_c, grads_c = _lm_grads(cached)
        loss_p, grads_p = _lm_grads(plain)
        assert loss_c == pytest.approx(loss_p, rel=tol)
        assert grads_c.keys() == grads_p.keys() and grads_c
        for name in grads_p:
            torch.testing.assert_close(grads_c[name], grads_p[name], rtol=tol, atol=tol * grads_p[name].abs().max().item())
    assert cached.frozen.misses == len(cached.pool) and cached.frozen.hits == 3 * len(cached.rows)
    assert plain.frozen.dir is None


def test_the_number_of_facts_can_be_fixed(curriculum):
    cur, _ = curriculum
    rng = random.Random(3)
    assert all(len(cur.example(rng, "words", n_facts=8).facts) == 8 for _ in range(5))
    assert len(cur.example(rng, "person", heldout=True, n_facts=3).facts) == 3
    with pytest.raises(ValueError):
        cur.example(rng, "passkey", n_facts=2)


@pytest.mark.parametrize("kind", KINDS)
def test_an_updated_fact_is_stated_again_later_with_a_new_value_that_is_the_answer(curriculum, kind):
    cur, words = curriculum
    rng = random.Random(5)
    for _ in range(5):
        ex = cur.example(rng, kind, n_facts=1, update_gap=200)
        old, new = ex.replaced, ex.answer
        assert old != new and len(ex.statements) == 2 and kind == ex.kind
        assert old.isdigit() == new.isdigit() and (not old.isdigit() or len(old) == len(new))
        text = words.decode(ex.fact_segment)
        assert text.index(old) + 200 <= text.index(new)  # at least the gap later (a token has >= 1 character)
        assert ex.statements[1] in text
        assert ex.statements[1] in [Fact(ex.facts[ex.asked].subject, new).render(p) for p in UPDATES]
        assert words.decode(ex.reading[-ex.answer_tokens:]).strip() == new + "."


def test_a_run_continuing_a_checkpoint_reads_the_cache_of_the_run_that_made_it(tiny_llama_dir, tmp_path):
    overrides = dict(recall_rows=0, val_every=0, train_blocks=1, steps=2, checkpoint_every=2,
                     cache_dir=str(tmp_path / "cache"))
    first = Trainer(tiny_config(tiny_llama_dir, **overrides), tmp_path / "first")
    first.run(progress=False)
    config = tiny_config(tiny_llama_dir, **overrides)
    config.sidenet.checkpoint = str(tmp_path / "first" / "checkpoint")
    second = Trainer(config, tmp_path / "second")
    assert second.frozen.dir == first.frozen.dir  # the checkpoint trained no block below the cached state
    assert second.warm_cache() == 0 and second.frozen.misses == 0
    with torch.no_grad():  # a frozen block that differs is another cache
        next(second.sidenet.blocks[0].parameters()).add_(1.0)
    assert FrozenEncoder(second.reader, second.frozen.start, tmp_path / "cache").dir != first.frozen.dir


@pytest.mark.parametrize("kind", KINDS)
def test_a_re_read_example_opens_its_reading_with_its_spans_which_alone_are_its_memory(curriculum, kind):
    """Curriculum.reread: reread_spans spans of at most reread_span_tokens (separator included) before the
    question, the answer's statement whole in one of them, the re-read statements in stream order, the
    answer nowhere else; the spans alone are the example's memory; the answer still ends the reading."""
    cur, words = curriculum
    rng = random.Random(6)
    separator = words.tokenize(cur.config.reread_separator)
    for i in range(20):
        ex = cur.example(rng, kind, update_gap=40 if i % 4 == 0 else None)
        again = cur.reread(rng, ex)
        prefix = again.fact_segment
        assert again.reread and not ex.reread and again.reading == prefix + ex.reading
        assert again.answer_tokens == ex.answer_tokens and again.question_tokens == ex.question_tokens
        assert prefix[-len(separator):] == separator
        assert len(prefix) <= cur.config.reread_spans * cur.config.reread_span_tokens
        start, end = again.answer_span
        assert words.decode(prefix[start:end]).strip() == ex.statements[ex.answered_by]
        text = words.decode(prefix)
        assert text.count(ex.answer) == ex.statements[ex.answered_by].count(ex.answer)
        shown = [(s, i) for i, (s, e) in enumerate(again.statement_spans) if e > s]
        assert [i for _, i in sorted(shown)] == sorted(i for _, i in shown)  # stream order kept
        if ex.replaced is not None and all(e > s for s, e in again.statement_spans):
            assert text.index(ex.replaced) < text.index(ex.answer)
