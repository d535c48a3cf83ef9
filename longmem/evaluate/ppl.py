"""Long-document perplexity, overall and by token position, for the backbone with the W-token window,
the backbone with its full window, the SideNet without memory and LongMem with a memory of the
document's own earlier segments (rolling perplexity: LongMem.score_batch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import LongMemConfig
from ..data import Document
from ..model import LongMem, perplexity
from ..report import markdown_table
from ..roles import memory_capacity
from .common import EvalData, figure, fmt_ppl, save_plot


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


def run(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    corpora = {name: ppl_corpus(model, config, docs, name, progress) for name, docs in data.unseen.items()}
    return {"items": sum(c["items"] for c in corpora.values()), "corpora": corpora,
            "plots": [plot_ppl(c, out_dir) for c in corpora.values()]}


def plot_ppl(result: dict, out_dir: Path) -> str:
    fig, ax = figure()
    mids = [(a + b) / 2 for a, b in result["buckets"]]
    for key, m in result["methods"].items():
        ax.plot(mids, m["by_position"], marker="o", label=m["label"])
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title(f"Perplexity by position, {result['items']} {result['corpus']} documents", fontsize=10)
    ax.legend(fontsize=8)
    return save_plot(fig, out_dir, f"ppl_by_position_{result['corpus']}.png")


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


def report(r: dict) -> str:
    return "\n\n".join(["Corpora the training never saw (`eval.unseen_corpora`), each document read on its own.",
                         *(report_ppl_corpus(c, plot) for c, plot in zip(r["corpora"].values(), r["plots"]))])
