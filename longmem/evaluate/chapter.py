"""ChapterBreak-style suffix identification: a long prefix ending at a reST section break goes into
memory, and the model picks the true next section opening among openings of other sections of the
same document (choice log-likelihood: LongMem.score_continuations)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import LongMemConfig
from ..data import Document
from ..memory import round_up
from ..model import LongMem
from ..report import markdown_table
from .common import EvalData, bar_plot, fmt_acc

CHAPTER_LOCAL_TOKENS = 32  # tokens before a section break that the reader sees locally
CHAPTER_MIN_BREAKS = 6  # documents with fewer section breaks give no ChapterBreak items
HEADING_CHARS = "=-~^*"  # reST section adornments used by the Python docs


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


def run(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
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
    result["plots"] = [bar_plot(out_dir, "chapter_accuracy.png", "ChapterBreak-style accuracy",
                                 [a["label"] for a in acc.values()], [a["accuracy"] for a in acc.values()],
                                 ("chance", result["chance"]))]
    return result


def report(r: dict) -> str:
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
