"""The paper's evaluations of LongMem, on held-out real text, at sizes set by `config.eval`.

`evaluate(model, config, out_dir)` runs any of four parts and writes `report.md`, `results.json` and
PNG plots into `out_dir`:

- "ppl": long-document perplexity, overall and by token position, for the backbone with the W-token
  window, the backbone with its full window, the SideNet without memory and LongMem with a memory of
  the document's own earlier segments;
- "chapter": ChapterBreak-style suffix identification: a long prefix ending at a reST section break
  goes into memory, and the model picks the true next section opening among openings of other
  sections of the same document;
- "icl": many-shot in-context learning on word sentiment, with thousands of demonstrations in memory
  and a few in the local context;
- "passkey": a 5-digit key stated at the start of N tokens of real filler, asked for at the end;
- "recall": eight word -> number facts at once, and facts stated and asked in phrasings no training
  example used (longmem/curriculum.py), with the filler of "passkey".

Perplexity, passkey and recall read corpora the training never saw (`config.eval.unseen_corpora`);
ChapterBreak reads held-out documents of `config.eval.corpus` (it needs their reST sections). Every
question is also asked without memory (the control). `results.json` starts with a `headline` object
of the figures that matter. `config` supplies the `eval` sizes and the held-out split
(`train.heldout_fraction`); everything about how the model reads (segment W, memory sizes) is the
model's own configuration. Cost is bounded by the `config.eval` sizes alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import EVAL_PARTS, LongMemConfig
from .curriculum import KINDS, QUESTIONS, STATEMENTS, Curriculum, RecallExample, curriculum_config, phrasings
from .data import (Document, filler_text, load_corpus, passkey_prompt_parts, random_key,
                   sentiment_lexicon, split_heldout)
from .memory import MemoryStats, round_up
from .model import LongMem, perplexity
from .roles import batches, memory_capacity, pad_segments, segments
from .report import markdown_table

PARTS = EVAL_PARTS
TITLES = {"ppl": "Long-document perplexity", "chapter": "ChapterBreak-style suffix identification",
          "icl": "Many-shot in-context learning with demonstrations in memory",
          "passkey": "Passkey retrieval", "recall": "Recall of facts: eight at once, unseen phrasings"}
CHAPTER_LOCAL_TOKENS = 32  # tokens before a section break that the reader sees locally
CHAPTER_MIN_BREAKS = 6  # documents with fewer section breaks give no ChapterBreak items
HEADING_CHARS = "=-~^*"  # reST section adornments used by the Python docs
ICL_LABELS = ("negative", "positive")  # label 0, label 1 (sentiment_lexicon)
PASSKEY_DIGITS = 5
RECALL_EXTRA_TOKENS = 2  # greedy tokens generated past the answer's own, so a longer answer shows


# ---- small helpers ------------------------------------------------------------------------------

def md_literal(text: str) -> str:
    """Generated text shown safely in Markdown: its Python repr, with backticks escaped."""
    return repr(text).replace("`", "\\`")


def fmt_ppl(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:,.2f}"


def fmt_acc(correct: int, total: int) -> str:
    return f"{correct / total:.1%} ({correct}/{total})" if total else "n/a"


def heldout_documents(config: LongMemConfig) -> list[Document]:
    return split_heldout(load_corpus(config.eval.corpus, config.corpus), config.train.heldout_fraction)[1]


@dataclass
class EvalData:
    """What the parts read: held-out documents of a training corpus (`eval.corpus`: ChapterBreak needs
    its reST sections) and every document of corpora the training never saw (`eval.unseen_corpora`:
    perplexity, and the filler of passkey and recall)."""

    heldout: list[Document]
    unseen: dict[str, list[Document]]

    @property
    def unseen_documents(self) -> list[Document]:
        return [d for docs in self.unseen.values() for d in docs]


def eval_data(config: LongMemConfig) -> EvalData:
    trained = sorted(set(config.eval.unseen_corpora) & set(config.train.corpora))
    if trained:
        raise ValueError(f"eval.unseen_corpora {trained} are in train.corpora: they are not unseen text")
    heldout = heldout_documents(config)
    if not heldout:
        raise ValueError(f"corpus {config.eval.corpus!r} has no held-out documents at fraction "
                         f"{config.train.heldout_fraction}")
    return EvalData(heldout, {name: load_corpus(name, config.corpus) for name in config.eval.unseen_corpora})


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib figure on the Agg canvas, without pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    return name


def _bar_plot(out_dir: Path, name: str, title: str, labels: list[str], values: list[float],
              reference: tuple[str, float] | None = None) -> str:
    fig, ax = _figure(6.4, 3.6)
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    if reference is not None:
        ax.axhline(reference[1], color="gray", linestyle="--", label=reference[0])
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    return _save(fig, out_dir, name)


# ---- a. long-document perplexity ----------------------------------------------------------------

@dataclass
class PplDoc:
    name: str
    ids: list[int]
    joined: int  # held-out documents concatenated into this one (1: a single document)


def ppl_documents(model: LongMem, docs: Sequence[Document], count: int, num_tokens: int) -> list[PplDoc]:
    """The first `count` documents with at least `num_tokens` tokens, cut to `num_tokens`. When too
    few are that long, consecutive shorter documents are joined (blank line between) into documents
    of that length. May return fewer than `count` when the held-out text runs out."""
    long, short = [], []
    for doc in docs:
        ids = model.tokenize(doc.text)
        if len(ids) >= num_tokens:
            long.append(PplDoc(doc.name, ids[:num_tokens], 1))
            if len(long) == count:
                return long
        elif ids:
            short.append((doc.name, ids))
    sep = model.tokenize("\n\n")
    names, ids = [], []
    for name, doc_ids in short:
        names.append(name)
        ids += (sep if ids else []) + doc_ids
        if len(ids) >= num_tokens:
            long.append(PplDoc(" + ".join(names), ids[:num_tokens], len(names)))
            names, ids = [], []
            if len(long) == count:
                break
    return long


def position_buckets(num_tokens: int, buckets: int) -> list[tuple[int, int]]:
    """Equal [start, end) ranges of token position covering [0, num_tokens)."""
    edges = [round(i * num_tokens / buckets) for i in range(buckets + 1)]
    return [(edges[i], edges[i + 1]) for i in range(buckets)]


def bucket_ppl(logprobs: list[np.ndarray], ranges: list[tuple[int, int]]) -> list[float]:
    """Perplexity per position range over all documents; logprobs[i] predicts token position i + 1."""
    result = []
    for start, end in ranges:
        parts = [lp[max(start - 1, 0):max(end - 1, 0)] for lp in logprobs]
        result.append(perplexity(np.concatenate(parts)))
    return result


def ppl_corpus(model: LongMem, config: LongMemConfig, docs: Sequence[Document], name: str,
               progress: bool) -> dict:
    ev, w = config.eval, model.config.read.segment_tokens
    chosen = ppl_documents(model, docs, ev.ppl_docs, ev.ppl_doc_tokens)
    if not chosen:
        raise ValueError(f"no text of {ev.ppl_doc_tokens} tokens in corpus {name!r}")
    ids = [d.ids for d in chosen]
    n_tokens = len(ids[0])
    window = min(n_tokens, ev.full_window_tokens, model.backbone.max_positions)
    with_memory = model.score_batch(ids, use_memory=True, progress=progress)
    without = model.score_batch(ids, use_memory=False, progress=progress)
    full = [model.backbone.window_logprobs(d, window)
            for d in tqdm(ids, desc="full window", unit="doc", disable=not progress)]
    methods = {
        "backbone_w": (f"backbone, {w}-token window", [r.backbone_logprobs for r in with_memory]),
        "backbone_full": (f"backbone, {window}-token window", full),
        "sidenet": ("SideNet, no memory", [r.logprobs for r in without]),
        "longmem": ("LongMem, memory of earlier segments", [r.logprobs for r in with_memory]),
    }
    ranges = position_buckets(n_tokens, ev.position_buckets)
    scratch_capacity = memory_capacity(model.config, n_tokens)
    result = {
        "corpus": name, "items": len(chosen), "doc_tokens": n_tokens, "segment_tokens": w,
        "full_window_tokens": window, "memory_capacity_tokens": scratch_capacity,
        "documents": [{"name": d.name, "tokens": len(d.ids), "joined_documents": d.joined} for d in chosen],
        "buckets": [list(r) for r in ranges],
        # logprobs[i] predicts token i + 1: the tokens after the first segment are logprobs[w - 1:]
        "methods": {key: {"label": label, "ppl": perplexity(np.concatenate(lps)),
                          "after_first_segment": perplexity(np.concatenate([lp[w - 1:] for lp in lps])),
                          "per_doc": [perplexity(lp) for lp in lps], "by_position": bucket_ppl(lps, ranges)}
                    for key, (label, lps) in methods.items()},
        "notes": [],
    }
    m = result["methods"]
    result["longmem_vs_sidenet_after_first_segment"] = m["longmem"]["after_first_segment"] / m["sidenet"][
        "after_first_segment"] - 1
    joined = sum(d.joined > 1 for d in chosen)
    if joined:
        result["notes"].append(f"Too few documents have {ev.ppl_doc_tokens:,} tokens: {joined} of the "
                               f"{len(chosen)} documents join consecutive shorter documents.")
    if len(chosen) < ev.ppl_docs:
        result["notes"].append(f"Only {len(chosen)} of the {ev.ppl_docs} documents asked for could be formed.")
    if scratch_capacity < n_tokens - w:
        result["notes"].append(f"Memory capacity ({scratch_capacity:,} tokens) is smaller than the text before the "
                               f"last segment: the FIFO evicts the oldest segments.")
    return result


def run_ppl(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    corpora = {name: ppl_corpus(model, config, docs, name, progress) for name, docs in data.unseen.items()}
    return {"items": sum(c["items"] for c in corpora.values()), "corpora": corpora,
            "plots": [plot_ppl(c, out_dir) for c in corpora.values()]}


def plot_ppl(result: dict, out_dir: Path) -> str:
    fig, ax = _figure()
    mids = [(a + b) / 2 for a, b in result["buckets"]]
    for key, m in result["methods"].items():
        ax.plot(mids, m["by_position"], marker="o", label=m["label"])
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"Perplexity by position, {result['items']} {result['corpus']} documents", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, f"ppl_by_position_{result['corpus']}.png")


def report_ppl_corpus(r: dict, plot: str) -> str:
    overall = markdown_table(
        ["reader", "perplexity", "after the first segment", "per document"],
        [[m["label"], fmt_ppl(m["ppl"]), fmt_ppl(m["after_first_segment"]),
          ", ".join(fmt_ppl(p) for p in m["per_doc"])] for m in r["methods"].values()], "lrrl")
    buckets = markdown_table(
        ["reader"] + [f"{a:,}–{b - 1:,}" for a, b in r["buckets"]],
        [[m["label"]] + [fmt_ppl(p) for p in m["by_position"]] for m in r["methods"].values()])
    docs = markdown_table(["document", "tokens", "joined documents"],
                          [[d["name"], f"{d['tokens']:,}", d["joined_documents"]] for d in r["documents"]])
    return "\n\n".join([
        f"### {r['corpus']}",
        f"The first {r['doc_tokens']:,} tokens of {r['items']} {r['corpus']} documents. The backbone reads them in "
        f"{r['segment_tokens']:,}-token segments (each segment from scratch) and in windows of "
        f"{r['full_window_tokens']:,} tokens; the SideNet reads {r['segment_tokens']:,}-token segments without "
        f"memory, and LongMem with a memory (capacity {r['memory_capacity_tokens']:,} tokens) of the document's "
        "own earlier segments. Perplexity is exp of the mean negative log-likelihood over all predicted tokens "
        f"of all documents; after the first segment, over tokens at positions {r['segment_tokens']:,} and later "
        f"(the ones memory can help). LongMem vs the SideNet without memory there: "
        f"{r['longmem_vs_sidenet_after_first_segment']:+.2%}.",
        overall, "By token position (perplexity of the tokens at those positions):", buckets,
        f"![perplexity by position]({plot})", docs, *[f"Note: {n}" for n in r["notes"]]])


def report_ppl(r: dict) -> str:
    return "\n\n".join(["Corpora the training never saw (`eval.unseen_corpora`), each document read on its own.",
                         *(report_ppl_corpus(c, plot) for c, plot in zip(r["corpora"].values(), r["plots"]))])


# ---- b. ChapterBreak-style suffix identification ------------------------------------------------

def section_breaks(text: str) -> list[tuple[int, str]]:
    """(character offset, title) of every reST section heading: a title line followed by an underline
    of one of `=-~^*` at least as long as the title (reST's rule), after a blank line or at the
    start of the text. The offset is that of an overline when the heading has one."""
    lines = text.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(s) for s in lines]).tolist()
    stripped = [s.rstrip() for s in lines]
    breaks = []
    for i in range(1, len(lines)):
        title, under = stripped[i - 1], stripped[i]
        if len(under) < 2 or under[0] not in HEADING_CHARS or under != under[0] * len(under):
            continue
        if not title or title[0].isspace() or len(under) < len(title):
            continue
        if title[0] in HEADING_CHARS and title == title[0] * len(title):
            continue  # an overline, or two adornment lines

        start = i - 1
        if start >= 1 and stripped[start - 1] == under:  # overline
            start -= 1
        if start >= 1 and stripped[start - 1]:
            continue  # a section title follows a blank line
        breaks.append((offsets[start], title.strip()))
    return breaks


@dataclass
class ChapterItem:
    doc: str
    offset: int  # character offset of the break in the document
    heading: str  # the true section's title
    memory_ids: list[int]  # the long prefix, which goes into memory
    local_ids: list[int]  # the last tokens before the break, read locally
    candidates: list[list[int]]  # section openings, each exactly chapter_opening_tokens tokens
    candidate_headings: list[str]
    answer: int  # index of the true opening


def chapter_local_tokens(config: LongMemConfig, segment_tokens: int) -> int:
    """Tokens before the break read locally: ~32, fewer when W is so small that the local prefix and
    an opening would not fit in one segment."""
    return max(1, min(CHAPTER_LOCAL_TOKENS, segment_tokens - config.eval.chapter_opening_tokens))


def chapter_items(model: LongMem, config: LongMemConfig, docs: Sequence[Document],
                  rng: random.Random) -> list[ChapterItem]:
    """Items from held-out documents with at least CHAPTER_MIN_BREAKS section breaks (and enough
    distinct full-length openings for the candidates), taken round-robin over the documents, a random
    break each time. A break qualifies when at least one W-token segment of text precedes its local
    prefix; up to chapter_prefix_tokens tokens before the break are used."""
    ev, w = config.eval, model.config.read.segment_tokens
    n_open, n_cand = ev.chapter_opening_tokens, ev.chapter_candidates
    local = chapter_local_tokens(config, w)
    pools = []  # per document: (name, text, openings by break, shuffled break order)
    for doc in docs:
        breaks = section_breaks(doc.text)
        if len(breaks) < max(CHAPTER_MIN_BREAKS, n_cand):
            continue
        openings = [model.tokenize(doc.text[b:b + 64 * n_open])[:n_open] for b, _ in breaks]
        full = [i for i, o in enumerate(openings) if len(o) == n_open]
        if len({tuple(openings[i]) for i in full}) < n_cand:
            continue
        order = [i for i in full if i > 0]
        rng.shuffle(order)
        pools.append((doc, breaks, openings, full, order))
    items: list[ChapterItem] = []
    while len(items) < ev.chapter_items and any(p[4] for p in pools):
        for doc, breaks, openings, full, order in pools:
            if not order or len(items) == ev.chapter_items:
                continue
            i = order.pop()
            offset, title = breaks[i]
            start = doc.text.rfind("\n", 0, max(0, offset - 16 * ev.chapter_prefix_tokens)) + 1  # a line start
            before = model.tokenize(doc.text[start:offset])[-ev.chapter_prefix_tokens:]
            if len(before) < local + w:
                continue
            true = openings[i]
            others = {tuple(openings[j]): j for j in full if j != i and openings[j] != true}
            picked = rng.sample(sorted(others.items()), n_cand - 1)
            cands = [(true, title)] + [(list(o), breaks[j][1]) for o, j in picked]
            rng.shuffle(cands)
            items.append(ChapterItem(doc.name, offset, title, before[:-local], before[-local:], [c for c, _ in cands],
                                     [t for _, t in cands], [c for c, _ in cands].index(true)))
    return items


def run_chapter(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    ev, c = config.eval, model.config.memory.chunk_size
    items = chapter_items(model, config, data.heldout, random.Random(ev.seed))
    if not items:
        raise ValueError(f"no held-out document of corpus {ev.corpus!r} has {CHAPTER_MIN_BREAKS} section breaks "
                         f"with enough text before them")
    rows = []
    for item in tqdm(items, desc="chapter", unit="item", disable=not progress):
        memory_id = model.create_memory(capacity_tokens=round_up(len(item.memory_ids), c))
        try:
            model.append(memory_id, token_ids=item.memory_ids)
            with_mem, backbone = model.score_continuations([item.local_ids], item.candidates, memory_id, True)
            without, _ = model.score_continuations([item.local_ids], item.candidates, None, False)
        finally:
            model.delete_memory(memory_id)
        rows.append({"doc": item.doc, "heading": item.heading, "memory_tokens": len(item.memory_ids),
                     "answer": item.answer, "candidate_headings": item.candidate_headings,
                     "scores": {"longmem": with_mem[0].tolist(), "sidenet": without[0].tolist(),
                                "backbone_w": backbone[0].tolist()}})
    labels = {"longmem": "LongMem, prefix in memory", "sidenet": "SideNet, no memory",
              "backbone_w": "backbone, local prefix only"}
    correct = {k: sum(int(np.argmax(r["scores"][k])) == r["answer"] for r in rows) for k in labels}
    result = {
        "items": len(rows), "requested_items": ev.chapter_items, "candidates": ev.chapter_candidates,
        "opening_tokens": ev.chapter_opening_tokens, "local_tokens": len(items[0].local_ids),
        "mean_memory_tokens": float(np.mean([r["memory_tokens"] for r in rows])),
        "documents": sorted({r["doc"] for r in rows}), "chance": 1 / ev.chapter_candidates,
        "accuracy": {k: {"label": labels[k], "correct": correct[k], "accuracy": correct[k] / len(rows)}
                     for k in labels},
        "rows": rows, "notes": [],
    }
    if len(rows) < ev.chapter_items:
        result["notes"].append(f"Only {len(rows)} of the {ev.chapter_items} items asked for exist in the held-out "
                               f"documents.")
    acc = result["accuracy"]
    result["plots"] = [_bar_plot(out_dir, "chapter_accuracy.png", "ChapterBreak-style accuracy",
                                 [a["label"] for a in acc.values()], [a["accuracy"] for a in acc.values()],
                                 ("chance", result["chance"]))]
    return result


def report_chapter(r: dict) -> str:
    table = markdown_table(["reader", "accuracy"],
                           [[a["label"], fmt_acc(a["correct"], r["items"])] for a in r["accuracy"].values()]
                           + [["chance", f"{r['chance']:.1%}"]])
    examples = markdown_table(
        ["document", "true section", "tokens in memory", "LongMem picks", "SideNet picks"],
        [[x["doc"], x["heading"], f"{x['memory_tokens']:,}",
          x["candidate_headings"][int(np.argmax(x["scores"]["longmem"]))],
          x["candidate_headings"][int(np.argmax(x["scores"]["sidenet"]))]] for x in r["rows"]], "llrll")
    return "\n\n".join([
        f"{r['items']} items from {len(r['documents'])} held-out documents with at least {CHAPTER_MIN_BREAKS} reST "
        f"section breaks. Each item: a break; on average {r['mean_memory_tokens']:,.0f} tokens of text before it "
        f"go into a fresh memory, the last {r['local_tokens']} tokens before it are the local prefix, and the "
        f"reader picks, among {r['candidates']} section openings of the same document ({r['opening_tokens']} "
        "tokens each, heading included; the true one and others), the one with the highest summed "
        "log-probability as the continuation of the local prefix. All openings have the same token count, so "
        "summed and per-token mean log-probabilities rank them alike.",
        table, f"![ChapterBreak accuracy]({r['plots'][0]})", "Items:", examples,
        *[f"Note: {n}" for n in r["notes"]]])


# ---- c. many-shot in-context learning -----------------------------------------------------------

def icl_demo(word: str, label: int) -> str:
    return f"Word: {word}\nSentiment: {ICL_LABELS[label]}\n"


def icl_query(word: str) -> str:
    return f"Word: {word}\nSentiment:"


def icl_split(lexicon: Sequence[tuple[str, int]], n_memory: int, n_local: int, n_test: int,
              rng: random.Random) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """(memory demos, local demos, test items): disjoint sets of distinct words, each balanced between
    the two labels (an odd count gets its extra item from a random label), each in random order."""
    words = dict(lexicon)
    pools = {label: sorted(w for w, lab in words.items() if lab == label) for label in (0, 1)}
    for pool in pools.values():
        rng.shuffle(pool)
    groups = []
    for n in (n_test, n_local, n_memory):
        counts = {0: n // 2, 1: n // 2}
        if n % 2:
            counts[rng.randint(0, 1)] += 1
        for label, k in counts.items():
            if len(pools[label]) < k:
                raise ValueError(f"the sentiment lexicon has too few {ICL_LABELS[label]} words for "
                                 f"{n_test} test items, {n_local} local and {n_memory} memory demonstrations")
        group = [(pools[label].pop(), label) for label in (0, 1) for _ in range(counts[label])]
        rng.shuffle(group)
        groups.append(group)
    test, local, memory = groups
    return memory, local, test


def run_icl(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    ev, c = config.eval, model.config.memory.chunk_size
    memory_demos, local_demos, tests = icl_split(sentiment_lexicon(), ev.icl_memory_demos, ev.icl_local_demos,
                                                 ev.icl_test_items, random.Random(ev.seed))
    local_text = "".join(icl_demo(*d) for d in local_demos)
    prefixes = [model.tokenize(local_text + icl_query(word)) for word, _ in tests]
    choices = [model.tokenize(" " + label) for label in ICL_LABELS]
    memory_ids = model.tokenize("".join(icl_demo(*d) for d in memory_demos)) if memory_demos else []
    memory_id = model.create_memory(capacity_tokens=round_up(len(memory_ids), c))
    scores = {"longmem": [], "sidenet": [], "backbone_w": []}
    try:
        if memory_ids:
            model.append(memory_id, token_ids=memory_ids, progress=progress)
        step = max(1, model.config.read.batch_segments * 4)
        for a in tqdm(range(0, len(prefixes), step), desc="icl", unit="batch", disable=not progress):
            block = prefixes[a:a + step]
            with_mem, _ = model.score_continuations(block, choices, memory_id, True)
            without, backbone = model.score_continuations(block, choices, None, False)
            scores["longmem"] += with_mem.tolist()
            scores["sidenet"] += without.tolist()
            scores["backbone_w"] += backbone.tolist()
    finally:
        model.delete_memory(memory_id)
    truth = np.array([label for _, label in tests])
    labels = {"longmem": f"{len(local_demos)} local + {len(memory_demos)} memory demos (LongMem)",
              "sidenet": f"{len(local_demos)} local demos (SideNet, no memory)",
              "backbone_w": f"{len(local_demos)} local demos (backbone)"}
    accuracy = {}
    for key, label in labels.items():
        predicted = np.argmax(np.array(scores[key]), axis=1)
        accuracy[key] = {"label": label, "correct": int((predicted == truth).sum()),
                         "accuracy": float((predicted == truth).mean()),
                         "predicted_positive": float(predicted.mean())}
    majority = max(float(truth.mean()), 1 - float(truth.mean()))
    result = {
        "items": len(tests), "memory_demos": len(memory_demos), "local_demos": len(local_demos),
        "memory_tokens": len(memory_ids), "lexicon_words": len(dict(sentiment_lexicon())),
        "majority_baseline": majority, "accuracy": accuracy,
        "template": icl_demo("{word}", 1).replace("positive", "{positive|negative}"),
        "tests": [{"word": w, "label": lab, "scores": {k: scores[k][i] for k in scores}}
                  for i, (w, lab) in enumerate(tests)],
        "local_demos_list": local_demos, "notes": [],
    }
    result["plots"] = [_bar_plot(out_dir, "icl_accuracy.png", "Word-sentiment ICL accuracy",
                                 [a["label"].replace(" (", "\n(") for a in accuracy.values()],
                                 [a["accuracy"] for a in accuracy.values()], ("majority class", majority))]
    return result


def report_icl(r: dict) -> str:
    table = markdown_table(["demonstrations (reader)", "accuracy", "predicted positive"],
                           [[a["label"], fmt_acc(a["correct"], r["items"]), f"{a['predicted_positive']:.1%}"]
                            for a in r["accuracy"].values()]
                           + [["majority-class baseline", f"{r['majority_baseline']:.1%}", ""]])
    template = r["template"].replace("\n", "\\n")
    return "\n\n".join([
        f"Words and labels from the VADER sentiment lexicon ({r['lexicon_words']:,} words with a clear valence). "
        f"Template `{template}`. {r['memory_demos']:,} demonstrations ({r['memory_tokens']:,} tokens) are "
        f"appended to one memory, {r['local_demos']} more precede each of the {r['items']} test words locally; "
        "the three sets are disjoint and each is balanced between the labels. Prediction: the label (\" positive\" "
        "or \" negative\") with the higher log-probability after `Sentiment:`.",
        table, f"![ICL accuracy]({r['plots'][0]})", *[f"Note: {n}" for n in r["notes"]]])


# ---- d. passkey retrieval -----------------------------------------------------------------------

class FillerMemory:
    """The memory-layer keys/values of a filler text, encoded once and appended to many memories.

    The frozen backbone reads each W-token segment on its own, so the keys/values of a segment made
    only of filler do not depend on what precedes it. A document intro + filler[:n] is split into
    segments at multiples of W: the segments holding intro tokens are ingested for each document, the
    rest are slices of one encoding of the filler that starts at the same phase (filler offset
    modulo W). `fill` therefore leaves a memory exactly as appending the whole document would.
    Encoding runs the backbone only up to its memory layer (Backbone.encode_memory), as
    LongMem.append does; a causal backbone gives a segment's first tokens the same keys/values
    whether or not the segment is cut short, so shorter fillers reuse the same encoding.
    """

    def __init__(self, model: LongMem, filler_ids: list[int], progress: bool = False):
        self.model, self.ids, self.progress = model, filler_ids, progress
        self.w = model.config.read.segment_tokens
        self.sink = model.config.memory.sink_tokens
        self._encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.segments_encoded = 0
        self.encode_seconds = 0.0

    @property
    def phases(self) -> list[int]:
        return sorted(self._encoded)

    def encoded(self, phase: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values [len(ids) - phase, Hkv, d] (float32) of filler_ids[phase:], in W segments."""
        if phase not in self._encoded:
            t0 = time.perf_counter()
            segs = segments(self.ids, self.w, phase)
            keys, values = [], []
            batch, backbone = self.model.config.read.batch_segments, self.model.backbone
            for group in tqdm(batches(segs, batch), desc="encoding filler", unit="batch", disable=not self.progress):
                k, v = backbone.encode_memory(pad_segments(group, backbone.device))
                for b, seg in enumerate(group):
                    keys.append(k[b, :len(seg)].float().cpu().numpy())
                    values.append(v[b, :len(seg)].float().cpu().numpy())
            self.segments_encoded += len(segs)
            self._encoded[phase] = (np.concatenate(keys), np.concatenate(values))
            self.encode_seconds += time.perf_counter() - t0
        return self._encoded[phase]

    def fill(self, memory_id: str, intro_ids: list[int], n: int) -> MemoryStats:
        """Appends intro_ids + filler[:n] to a memory, as model.append(memory_id, token_ids=...) would.
        n may exceed the filler: its whole W-segments then repeat (`repeats(n)` says how often)."""
        w, bank = self.w, self.model.bank
        total = len(intro_ids) + n
        head_len = min(total, math.ceil(len(intro_ids) / w) * w)  # the segments that hold intro tokens
        head = (intro_ids + self.ids[:head_len])[:head_len]
        for group in batches(segments(head, w), self.model.config.read.batch_segments):
            self.model.encoder.ingest(memory_id, group)
        phase = head_len - len(intro_ids)  # filler offset of the first segment of filler alone
        if head_len < total:
            keys, values = self.encoded(phase)
            period = (len(self.ids) - phase) // w * w  # whole segments of filler after the phase
            for s in range(phase, n, w):
                e = min(s + w, n)
                a = s - phase if n <= len(self.ids) else (s - phase) % period
                b = a + e - s
                bank.append(memory_id, keys[a:b], values[a:b], np.asarray(self.ids[phase + a:phase + b], np.int32),
                            skip_first=self.sink)
        return bank.stats(memory_id)

    def repeats(self, n: int) -> float:
        """How many times the filler's text occurs in n filler tokens (1 when it is long enough)."""
        return max(1.0, n / len(self.ids))


def passkey_filler_ids(model: LongMem, docs: Sequence[Document], num_tokens: int, rng: random.Random) -> list[int]:
    """`num_tokens` tokens of real unseen text (filler_text), asking for more text until enough."""
    chars = 6 * num_tokens + 1000
    while True:
        ids = model.tokenize(filler_text(docs, chars, rng))
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
        chars *= 2


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match: the greedy continuation starts with the answer, not followed by more of a word or number."""
    return re.match(rf"\s*{re.escape(answer)}(?![\w])", generated) is not None


@dataclass
class RecallItem:
    """A question about facts stated at the start of a long document."""

    intro_ids: list[int]  # the facts: the document's first tokens, then filler follows
    question_ids: list[int]  # the prompt, after the document
    answer: str
    info: dict  # what the report shows of it


class RecallTrials:
    """Runs recall items: each document (intro + n filler tokens) goes into a fresh memory sized to hold
    it all, the question is the prompt, and the greedy continuation must start with the answer. The
    control asks the same question without memory."""

    def __init__(self, model: LongMem, filler: "FillerMemory", bar):
        self.model, self.filler, self.bar = model, filler, bar
        self.controls: dict[tuple[tuple[int, ...], int], str] = {}  # (question, new tokens) -> answer
        self.fill_seconds = self.generate_seconds = 0.0

    def _greedy(self, ids: list[int], memory_id: str | None, new_tokens: int) -> str:
        return self.model.decode(list(self.model.generate(token_ids=ids, memory_id=memory_id, temperature=0.0,
                                                          max_new_tokens=new_tokens,
                                                          use_memory=memory_id is not None)))

    def run(self, item: RecallItem, n: int) -> dict:
        model = self.model
        new_tokens = len(model.tokenize(" " + item.answer)) + RECALL_EXTRA_TOKENS
        capacity = round_up(len(item.intro_ids) + n, model.config.memory.chunk_size)
        memory_id = model.create_memory(capacity_tokens=capacity)
        try:
            t0 = time.perf_counter()
            stats = self.filler.fill(memory_id, item.intro_ids, n)
            t1 = time.perf_counter()
            text = self._greedy(item.question_ids, memory_id, new_tokens)
            self.fill_seconds += t1 - t0
            self.generate_seconds += time.perf_counter() - t1
        finally:
            model.delete_memory(memory_id)
        key = (tuple(item.question_ids), new_tokens)
        if key not in self.controls:
            self.controls[key] = self._greedy(item.question_ids, None, new_tokens)
        control = self.controls[key]
        self.bar.update()
        return {**item.info, "filler_tokens": n, "answer": item.answer,
                "document_tokens": len(item.intro_ids) + n + len(item.question_ids), "memory_capacity": capacity,
                "tokens_held": stats.tokens_held, "tokens_evicted": stats.tokens_evicted,
                "filler_repeats": self.filler.repeats(n), "generated": text, "match": answer_matches(text, item.answer),
                "control_generated": control, "control_match": answer_matches(control, item.answer)}


def accuracy_rows(trials: list[dict], keys: Sequence[str]) -> list[dict]:
    """Accuracy with and without memory for each distinct value of `keys` among the trials, in order."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault(tuple(t[k] for k in keys), []).append(t)
    return [{**dict(zip(keys, group)), "trials": len(ts), "correct": sum(t["match"] for t in ts),
             "accuracy": sum(t["match"] for t in ts) / len(ts),
             "control_correct": sum(t["control_match"] for t in ts),
             "control_accuracy": sum(t["control_match"] for t in ts) / len(ts),
             "memory_capacity": max(t["memory_capacity"] for t in ts),
             "evicted": sum(t["tokens_evicted"] for t in ts), "filler_repeats": max(t["filler_repeats"] for t in ts)}
            for group, ts in groups.items()]


def unseen_filler(model: LongMem, config: LongMemConfig, data: EvalData, lengths: Sequence[int],
                  rng: random.Random, progress: bool) -> "FillerMemory":
    """Filler of unseen text, encoded once, up to eval.filler_tokens (longer memories repeat it)."""
    n = min(max(lengths), config.eval.filler_tokens)
    return FillerMemory(model, passkey_filler_ids(model, data.unseen_documents, n, rng), progress)


def run_passkey(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    ev = config.eval
    lengths = sorted(set(ev.passkey_lengths))
    rng = random.Random(ev.seed)
    filler = unseen_filler(model, config, data, lengths, rng, progress)
    filler_text_used = model.decode(filler.ids)
    question_ids = model.tokenize(passkey_prompt_parts("0" * PASSKEY_DIGITS)[1])
    keys: list[str] = []
    with tqdm(total=len(lengths) * ev.passkey_trials, desc="passkey", unit="trial", disable=not progress) as bar:
        runner = RecallTrials(model, filler, bar)
        trials = []
        for n in lengths:
            for _ in range(ev.passkey_trials):
                key = random_key(rng)
                while key in filler_text_used or key in keys:  # the key must occur only in the intro
                    key = random_key(rng)
                keys.append(key)
                item = RecallItem(model.tokenize(passkey_prompt_parts(key)[0]), question_ids, key, {"key": key})
                trials.append(runner.run(item, n))
    result = {
        "items": len(trials), "lengths": lengths, "trials_per_length": ev.passkey_trials,
        "by_length": accuracy_rows(trials, ["filler_tokens"]), "trials": trials, "question_tokens": len(question_ids),
        "filler_tokens": len(filler.ids), "filler_segments_encoded": filler.segments_encoded,
        "filler_phases": filler.phases, "filler_encode_seconds": filler.encode_seconds,
        "fill_seconds": runner.fill_seconds - filler.encode_seconds, "generate_seconds": runner.generate_seconds,
        "configured_capacity": model.config.memory.capacity_tokens, "notes": [],
    }
    larger = [b["filler_tokens"] for b in result["by_length"]
              if b["memory_capacity"] > model.config.memory.capacity_tokens]
    if larger:
        result["notes"].append(
            f"Filler lengths {', '.join(f'{n:,}' for n in larger)} exceed the configured memory capacity "
            f"({model.config.memory.capacity_tokens:,} tokens): their memories are sized to the document instead, "
            "since a FIFO memory of the configured size would have evicted the key.")
    repeated = [b["filler_tokens"] for b in result["by_length"] if b["filler_repeats"] > 1]
    if repeated:
        result["notes"].append(
            f"Filler lengths {', '.join(f'{n:,}' for n in repeated)} exceed the {len(filler.ids):,} tokens of filler "
            "encoded (eval.filler_tokens): the filler's segments repeat in those memories.")
    result["plots"] = [plot_passkey(result, out_dir)]
    return result


def plot_passkey(result: dict, out_dir: Path) -> str:
    fig, ax = _figure()
    ns = [b["filler_tokens"] for b in result["by_length"]]
    ax.plot(ns, [b["accuracy"] for b in result["by_length"]], marker="o", label="LongMem, document in memory")
    ax.plot(ns, [b["control_accuracy"] for b in result["by_length"]], linestyle="--", color="gray",
            label="no memory")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("filler tokens N")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"Passkey retrieval, {result['trials_per_length']} trials per length", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "passkey.png")


def report_passkey(r: dict) -> str:
    table = markdown_table(["filler tokens N", "accuracy", "without memory", "memory capacity", "tokens evicted"],
                           [[f"{b['filler_tokens']:,}", fmt_acc(b["correct"], b["trials"]),
                             fmt_acc(b["control_correct"], b["trials"]), f"{b['memory_capacity']:,}",
                             f"{b['evicted']:,}"] for b in r["by_length"]])
    examples = markdown_table(["N", "key", "generated", "match"],
                              [[f"{t['filler_tokens']:,}", t["key"], md_literal(t["generated"]),
                                "yes" if t["match"] else "no"]
                               for t in r["trials"][:: max(1, r["trials_per_length"])]], "rllc")
    return "\n\n".join([
        "Each trial: a random 5-digit key stated in an intro (\"The pass key is 12345. Remember it. 12345 is the "
        "pass key.\"), then N tokens of text the training never saw, then the question \"What is the pass key? The "
        f"pass key is\" ({r['question_tokens']} tokens). Intro and filler go into a fresh memory sized to hold them "
        f"all (up to {max(b['memory_capacity'] for b in r['by_length']):,} tokens; the configured capacity is "
        f"{r['configured_capacity']:,}, and a smaller FIFO memory would evict the key), so nothing is evicted; the "
        "question is the prompt, and the trial counts when the greedy continuation is the key (exact match). "
        "The key never occurs in the filler. Without memory: the same question with no memory.",
        table, f"![passkey accuracy]({r['plots'][0]})",
        f"The filler's keys/values ({r['filler_tokens']:,} tokens, {r['filler_segments_encoded']:,} segments) were "
        f"encoded once ({r['filler_encode_seconds']:.1f} s) and appended to every trial's memory after the "
        f"segment(s) holding the key, encoded per trial (filling the memories took {r['fill_seconds']:.1f} s in "
        f"all, generation {r['generate_seconds']:.1f} s).",
        "First trial of each length:", examples, *[f"Note: {n}" for n in r["notes"]]])


# ---- e. recall of facts: many facts at once, unseen phrasings ------------------------------------

def recall_item(model: LongMem, example: RecallExample, lead: list[int]) -> RecallItem:
    """A curriculum example as an evaluation item: filler `lead` then its fact segment open the document
    (the lead pads them to whole segments, so every item reuses one encoding of the filler), its
    question (without the answer) is the prompt."""
    w = model.config.read.segment_tokens
    question = example.reading[:len(example.reading) - example.answer_tokens]
    pad = -len(example.fact_segment) % w
    intro = lead[max(0, len(lead) - pad):] + example.fact_segment
    return RecallItem(intro, question, example.answer,
                      {"kind": example.kind, "facts": len(example.facts), "question": example.question,
                       "statements": example.statements})


def run_recall(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    """Two sets of questions on unseen filler: `facts8` states eval.recall_facts word -> number facts
    (training phrasings) and asks one, the others being distractors; `unseen_phrasing` states and asks
    facts of every kind in phrasings no training example used (curriculum.HELDOUT)."""
    ev, w = config.eval, model.config.read.segment_tokens
    rng = random.Random(ev.seed + 1)
    sets = [("facts8", n, "words", False, ev.recall_facts) for n in ev.recall_lengths]
    sets += [("unseen_phrasing", n, kind, True, None) for n in ev.unseen_phrasing_lengths for kind in KINDS]
    filler = unseen_filler(model, config, data, [n for _, n, *_ in sets], rng, progress)
    pool = segments(filler.ids, w)
    # An evaluation document may span segments (FillerMemory ingests the ones holding facts), so facts
    # and questions are not held to W as in training.
    curriculum = Curriculum(pool, model.tokenize, model.decode, curriculum_config(config, sys.maxsize))
    per_set = {"facts8": ev.recall_trials, "unseen_phrasing": math.ceil(ev.recall_trials / len(KINDS))}
    total = sum(per_set[name] for name, *_ in sets)
    with tqdm(total=total, desc="recall", unit="trial", disable=not progress) as bar:
        runner = RecallTrials(model, filler, bar)
        trials = [{"set": name, **runner.run(recall_item(model, curriculum.example(rng, kind, heldout, facts),
                                                         curriculum.filler(rng, w)), n)}
                  for name, n, kind, heldout, facts in sets for _ in range(per_set[name])]
    result = {"items": len(trials), "by_set": accuracy_rows(trials, ["set", "filler_tokens"]),
              "by_kind": accuracy_rows([t for t in trials if t["set"] == "unseen_phrasing"], ["kind"]),
              "trials": trials, "filler_tokens": len(filler.ids), "facts": ev.recall_facts,
              "fill_seconds": runner.fill_seconds - filler.encode_seconds,
              "generate_seconds": runner.generate_seconds,
              "heldout_statements": [x.text for x in phrasings(STATEMENTS, True)],
              "heldout_questions": [x.text for x in phrasings(QUESTIONS, True)]}
    result["plots"] = [_bar_plot(out_dir, "recall_accuracy.png", "Recall of facts, unseen filler",
                                 [f"{r['set']}\n{r['filler_tokens']:,}" for r in result["by_set"]],
                                 [r["accuracy"] for r in result["by_set"]])]
    return result


def report_recall(r: dict) -> str:
    table = markdown_table(["set", "filler tokens N", "accuracy", "without memory"],
                           [[b["set"], f"{b['filler_tokens']:,}", fmt_acc(b["correct"], b["trials"]),
                             fmt_acc(b["control_correct"], b["trials"])] for b in r["by_set"]])
    kinds = markdown_table(["unseen phrasing, kind", "accuracy", "without memory"],
                           [[b["kind"], fmt_acc(b["correct"], b["trials"]),
                             fmt_acc(b["control_correct"], b["trials"])] for b in r["by_kind"]])
    first = {}
    for t in r["trials"]:
        first.setdefault((t["set"], t["filler_tokens"], t["kind"]), t)
    examples = markdown_table(["set", "N", "question", "answer", "generated", "match"],
                              [[t["set"], f"{t['filler_tokens']:,}", md_literal(t["question"]), t["answer"],
                                md_literal(t["generated"]), "yes" if t["match"] else "no"] for t in first.values()],
                              "lrlllc")
    statements = "; ".join(f"`{x}`" for x in r["heldout_statements"])
    questions = "; ".join(f"`{x}`" for x in r["heldout_questions"])
    return "\n\n".join([
        "Facts are stated at the start of a document of N tokens of text the training never saw (numbers and "
        "towns that do not occur in it), and one of them is asked after the whole document; the document goes "
        "into a fresh memory and the greedy continuation of the question must be the answer (exact match). "
        f"`facts8`: {r['facts']} \"the number for <word>\" facts, one asked, the rest distractors, in training "
        f"phrasings. `unseen_phrasing`: pass keys, word numbers and facts about people, stated and asked only in "
        f"phrasings no training example used — statements {statements}; questions {questions}.",
        table, kinds, f"![recall accuracy]({r['plots'][0]})", "First trial of each set and kind:", examples])


# ---- the whole evaluation -----------------------------------------------------------------------

RUNNERS: dict[str, Callable[..., dict]] = {"ppl": run_ppl, "chapter": run_chapter, "icl": run_icl,
                                           "passkey": run_passkey, "recall": run_recall}
REPORTERS: dict[str, Callable[[dict], str]] = {"ppl": report_ppl, "chapter": report_chapter, "icl": report_icl,
                                               "passkey": report_passkey, "recall": report_recall}


def checkpoint_digest(path: Path) -> str:
    """sha256 of a checkpoint's weights (the first 16 hex digits): which SideNet gave a result."""
    from .checkpoint import WEIGHTS

    return hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()[:16]


def setup_info(model: LongMem, config: LongMemConfig, data: EvalData) -> dict:
    from .checkpoint import resolve_checkpoint

    mc = model.config
    checkpoint = resolve_checkpoint(mc)
    return {
        "backbone": str(model.backbone.path), "backbone_layers": model.backbone.num_layers,
        "memory_layer": model.backbone.memory_layer, "max_positions": model.backbone.max_positions,
        "sidenet": str(checkpoint) if checkpoint else f"untrained (init '{mc.sidenet.init}')",
        "sidenet_sha256": checkpoint_digest(checkpoint) if checkpoint else None,
        "sidenet_blocks": model.sidenet.num_blocks, "memory_block": model.sidenet.memory_block,
        "segment_tokens": mc.read.segment_tokens, "batch_segments": mc.read.batch_segments,
        "memory": {"capacity_tokens": mc.memory.capacity_tokens, "chunk_size": mc.memory.chunk_size,
                   "topk_tokens": mc.memory.topk_tokens, "sink_tokens": mc.memory.sink_tokens,
                   "dtype": mc.memory.dtype},
        "corpus": config.eval.corpus, "heldout_fraction": config.train.heldout_fraction,
        "heldout_documents": len(data.heldout),
        "unseen_corpora": {name: len(docs) for name, docs in data.unseen.items()}, "seed": config.eval.seed, "eval_config": vars(config.eval).copy(),
        "device": str(model.backbone.device), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
    }


def headline(results: dict) -> dict:
    """The figures the project is judged by, by name: exact-match accuracies with memory and without
    (the control), and perplexities after the first segment on each unseen corpus."""
    h: dict[str, Any] = {}
    if "passkey" in results:
        h["passkey"] = {str(b["filler_tokens"]): b["accuracy"] for b in results["passkey"]["by_length"]}
        h["passkey_without_memory"] = {str(b["filler_tokens"]): b["control_accuracy"]
                                       for b in results["passkey"]["by_length"]}
    if "recall" in results:
        for b in results["recall"]["by_set"]:
            h.setdefault(b["set"], {})[str(b["filler_tokens"])] = b["accuracy"]
            h.setdefault(f"{b['set']}_without_memory", {})[str(b["filler_tokens"])] = b["control_accuracy"]
    if "ppl" in results:
        h["ppl_after_first_segment"] = {
            name: {**{k: m["after_first_segment"] for k, m in c["methods"].items()},
                   "longmem_vs_sidenet": c["longmem_vs_sidenet_after_first_segment"]}
            for name, c in results["ppl"]["corpora"].items()}
        h["ppl"] = {name: {k: m["ppl"] for k, m in c["methods"].items()}
                    for name, c in results["ppl"]["corpora"].items()}
    for part in ("chapter", "icl"):
        if part in results:
            h[part] = {k: a["accuracy"] for k, a in results[part]["accuracy"].items()}
    return h


def render_report(results: dict) -> str:
    s = results["setup"]
    mem = s["memory"]
    parts = [p for p in PARTS if p in results]
    setup = markdown_table(["", ""], [
        ["backbone", f"`{s['backbone']}` ({s['backbone_layers']} layers, memory layer {s['memory_layer']}, "
                     f"{s['max_positions']:,} positions)"],
        ["SideNet", f"{s['sidenet']}; {s['sidenet_blocks']} blocks, memory block {s['memory_block']}"],
        ["segment W", f"{s['segment_tokens']:,} tokens (batches of up to {s['batch_segments']} segments)"],
        ["memory", f"capacity {mem['capacity_tokens']:,} tokens, chunks of {mem['chunk_size']}, top-"
                   f"{mem['topk_tokens']} tokens per query, first {mem['sink_tokens']} token(s) of each segment "
                   f"never stored (attention sinks), {mem['dtype']}"],
        ["corpus", f"{s['corpus']}: {s['heldout_documents']} held-out documents (fraction "
                   f"{s['heldout_fraction']}), seed {s['seed']}"],
        ["unseen corpora", ", ".join(f"{name}: {n} documents" for name, n in s["unseen_corpora"].items())],
        ["eval sizes", ", ".join(f"{k}={v}" for k, v in s["eval_config"].items() if k != "out_dir")],
        ["device", f"{s['device']}, {s['torch_threads']} torch threads; Python {s['python']}, torch {s['torch']}"],
    ], "ll")
    times = markdown_table(["part", "items", "wall time"],
                           [[TITLES[p], results[p]["items"], f"{results[p]['seconds']:.1f} s"] for p in parts]
                           + [["total", "", f"{sum(results[p]['seconds'] for p in parts):.1f} s"]])
    sections = [f"## {TITLES[p]}\n\n{REPORTERS[p](results[p])}" for p in parts]
    return "\n\n".join(["# LongMem evaluation", "## Setup", setup, times, *sections]) + "\n"


def evaluate(model: LongMem, config: LongMemConfig, out_dir: str | Path, parts: Sequence[str] = PARTS,
             progress: bool = True) -> dict:
    """Runs the selected parts (any of PARTS) and writes report.md, results.json and the plots into
    out_dir, keeping other parts an earlier run of the same setup wrote there (write_results).
    Returns the results (as written to results.json)."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown evaluation parts {unknown}; choose from {', '.join(PARTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = eval_data(config)
    results: dict[str, Any] = {"setup": setup_info(model, config, data)}
    for part in PARTS:
        if part not in parts:
            continue
        t0 = time.perf_counter()
        results[part] = RUNNERS[part](model, config, data, out, progress)
        results[part]["seconds"] = time.perf_counter() - t0
    return write_results(out, _jsonable(results))


def same_setup(a: dict, b: dict) -> bool:
    """Whether two runs evaluated the same model the same way (threads aside)."""
    volatile = ("torch_threads",)
    return {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}


def write_results(out: Path, results: dict) -> dict:
    """Writes results.json and report.md. Parts an earlier run of the same setup wrote there and this
    one did not run are kept, so parts may run one at a time or side by side in several processes
    (a lock file orders their writes); a different setup replaces the report."""
    with (out / ".results.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "results.json"
        earlier = json.loads(path.read_text()) if path.exists() else {}
        if earlier.get("setup") and same_setup(earlier["setup"], results["setup"]):
            results = {"setup": results["setup"], **{p: results.get(p, earlier.get(p)) for p in PARTS
                                                      if p in results or p in earlier}}
        results = {"headline": headline(results), **results}
        tmp = out / f".results.{os.getpid()}.json"
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, path)
        (out / "report.md").write_text(render_report(results))
    return results
