"""Recall of facts: eight word -> number facts at once, and facts stated and asked in phrasings no
training example used (longmem/curriculum.py), with the filler of passkey (generate-and-match), by
LongMem, without memory, and by the backbone alone with a BM25 prompt and with the whole text in its window."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..config import LongMemConfig
from ..curriculum import (
    KINDS,
    QUESTIONS,
    STATEMENTS,
    UPDATES,
    Curriculum,
    RecallExample,
    curriculum_config,
    phrasings,
)
from ..model import LongMem
from ..report import markdown_table
from ..roles import segments
from .common import EvalData, bar_plot, fmt_acc, md_literal
from .harness import (BASELINE_COLUMNS, RecallItem, RecallTrials, accuracy_rows, baseline_cells, baseline_text,
                      unseen_filler)


def recall_item(model: LongMem, example: RecallExample, lead: list[int]) -> RecallItem:
    """A curriculum example as an evaluation item: filler `lead` then its fact segment open the document
    (the lead pads them to whole segments, so every item reuses one encoding of the filler), its
    question (without the answer) is the prompt."""
    w = model.config.read.segment_tokens
    question = example.reading[:len(example.reading) - example.answer_tokens]
    pad = -len(example.fact_segment) % w
    intro = lead[max(0, len(lead) - pad):] + example.fact_segment
    return RecallItem(intro, question, example.question, example.answer,
                      {"kind": example.kind, "facts": len(example.facts), "question": example.question,
                       "statements": example.statements, "replaced": example.replaced})


def run(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    """Four sets of questions on unseen filler: `facts8` states eval.recall_facts word -> number facts
    (training phrasings) and asks one, the others being distractors; `person` one fact about a person
    (training phrasings); `unseen_phrasing` states and asks facts of every kind in phrasings no training
    example used (heldout phrasings); `updated` states a fact, then eval.updated_gap_tokens later states
    it again with a new value (curriculum.UPDATES), and the new value is the answer."""
    ev, w = config.eval, model.config.read.segment_tokens
    rng = random.Random(ev.seed + 1)
    sets = [("facts8", n, "words", False, ev.recall_facts, None) for n in ev.recall_lengths]
    sets += [("person", n, "person", False, 1, None) for n in ev.person_lengths]
    sets += [("unseen_phrasing", n, kind, True, None, None) for n in ev.unseen_phrasing_lengths for kind in KINDS]
    sets += [("updated", n, kind, False, 1, ev.updated_gap_tokens) for n in ev.updated_lengths for kind in KINDS]
    filler = unseen_filler(model, config, data, [n for _, n, *_ in sets], progress)
    pool = segments(filler.ids, w)
    # An evaluation document may span segments (FillerMemory ingests the ones holding facts), so facts
    # and questions are not held to W as in training.
    curriculum = Curriculum(pool, model.tokenize, model.decode, curriculum_config(config, sys.maxsize))
    split = math.ceil(ev.recall_trials / len(KINDS))
    per_set = {"facts8": ev.recall_trials, "person": ev.recall_trials, "unseen_phrasing": split, "updated": split}
    total = sum(per_set[name] for name, *_ in sets)
    with tqdm(total=total, desc="recall", unit="trial", disable=not progress) as bar:
        runner = RecallTrials(model, filler, ev, bar)
        trials = [{"set": name, **runner.run(recall_item(model, curriculum.example(rng, kind, heldout, facts, gap),
                                                         curriculum.filler(rng, w)), n)}
                  for name, n, kind, heldout, facts, gap in sets for _ in range(per_set[name])]
    updated = [t for t in trials if t["set"] == "updated"]
    result = {"items": len(trials), "by_set": accuracy_rows(trials, ["set", "filler_tokens"]),
              "by_kind": accuracy_rows([t for t in trials if t["set"] == "unseen_phrasing"], ["kind"]),
              "updated_gap_tokens": ev.updated_gap_tokens,
              "updated_answered_earlier": sum(t["replaced_match"] for t in updated),
              "updated_bm25_answered_earlier": sum(t["bm25_replaced_match"] for t in updated),
              "updated_trials": len(updated), "update_phrasings": [x.text for x in UPDATES],
              "trials": trials, "filler_tokens": len(filler.ids), "facts": ev.recall_facts,
              "fill_seconds": runner.fill_seconds - filler.encode_seconds,
              "generate_seconds": runner.generate_seconds, "baseline": runner.baseline,
              "heldout_statements": [x.text for x in phrasings(STATEMENTS, True)],
              "heldout_questions": [x.text for x in phrasings(QUESTIONS, True)]}
    result["plots"] = [bar_plot(out_dir, "recall_accuracy.png", "Recall of facts, unseen filler",
                                 [f"{r['set']}\n{r['filler_tokens']:,}" for r in result["by_set"]],
                                 [r["accuracy"] for r in result["by_set"]])]
    return result


def report(r: dict) -> str:
    table = markdown_table(["set", "filler tokens N", "accuracy", "without memory", *BASELINE_COLUMNS],
                           [[b["set"], f"{b['filler_tokens']:,}", fmt_acc(b["correct"], b["trials"]),
                             fmt_acc(b["control_correct"], b["trials"]), *baseline_cells(b)] for b in r["by_set"]])
    kinds = markdown_table(["unseen phrasing, kind", "accuracy", "without memory", *BASELINE_COLUMNS],
                           [[b["kind"], fmt_acc(b["correct"], b["trials"]),
                             fmt_acc(b["control_correct"], b["trials"]), *baseline_cells(b)] for b in r["by_kind"]])
    first = {}
    for t in r["trials"]:
        first.setdefault((t["set"], t["filler_tokens"], t["kind"]), t)
    examples = markdown_table(["set", "N", "question", "answer", "generated", "match", "BM25 prompt (backbone)",
                               "match"],
                              [[t["set"], f"{t['filler_tokens']:,}", md_literal(t["question"]), t["answer"],
                                md_literal(t["generated"]), "yes" if t["match"] else "no",
                                md_literal(t["bm25_generated"]), "yes" if t["bm25_match"] else "no"]
                               for t in first.values()], "lrlllclc")
    statements = "; ".join(f"`{x}`" for x in r["heldout_statements"])
    questions = "; ".join(f"`{x}`" for x in r["heldout_questions"])
    updates = "; ".join(f"`{x}`" for x in r["update_phrasings"])
    return "\n\n".join([
        "Facts are stated at the start of a document of N tokens of text the training never saw (numbers and "
        "towns that do not occur in it), and one of them is asked after the whole document; the document goes "
        "into a fresh memory and the greedy continuation of the question must be the answer (exact match). "
        f"`facts8`: {r['facts']} \"the number for <word>\" facts, one asked, the rest distractors, in training "
        f"phrasings. `person`: one fact about a person (a number or a town), in training phrasings. "
        f"`unseen_phrasing`: pass keys, word numbers and facts about people, stated and asked only in "
        f"phrasings no training example used — statements {statements}; questions {questions}. `updated`: a "
        f"fact of each kind stated, then {r['updated_gap_tokens']:,} tokens later stated again with a new value "
        f"(phrasings no training example used: {updates}); the answer is the new value. Of "
        f"{r['updated_trials']} updated facts, LongMem answered the earlier value {r['updated_answered_earlier']} "
        f"times, the BM25 prompt {r['updated_bm25_answered_earlier']} times.",
        baseline_text(r["baseline"]), table, kinds, f"![recall accuracy]({r['plots'][0]})", "First trial of each set and kind:", examples])
