"""`evaluate`: runs the parts, writes report.md, results.json (its `headline` first) and the plots."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import EVAL_PARTS, LongMemConfig
from ..model import LongMem
from ..report import markdown_table
from . import chapter, conversation, icl, passkey, ppl, recall
from .common import EvalData, eval_data, jsonable

PARTS = EVAL_PARTS


TITLES = {"ppl": "Long-document perplexity", "chapter": "ChapterBreak-style suffix identification",
          "icl": "Many-shot in-context learning with demonstrations in memory",
          "passkey": "Passkey retrieval", "recall": "Recall of facts: eight at once, people, unseen phrasings, updated facts",
          "conversation": "Conversations that remember: a fact from an early turn"}


MODULES = {"ppl": ppl, "chapter": chapter, "icl": icl, "passkey": passkey, "recall": recall,
           "conversation": conversation}  # each has run, report


assert tuple(MODULES) == EVAL_PARTS


def checkpoint_digest(path: Path) -> str:
    """sha256 of a checkpoint's weights (the first 16 hex digits): which SideNet gave a result."""
    from ..checkpoint import WEIGHTS

    return hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()[:16]


def setup_info(model: LongMem, config: LongMemConfig, data: EvalData) -> dict:
    from ..checkpoint import resolve_checkpoint

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
    """The figures the project is judged by, by name: exact-match accuracies with memory, without (the
    control) and of the backbone alone with a BM25 prompt (_bm25) and with the whole text in its window
    (_full: None where it did not fit), and perplexities after the first segment on each unseen corpus."""
    h: dict[str, Any] = {}
    columns = {"": "accuracy", "_without_memory": "control_accuracy", "_bm25": "bm25_accuracy",
               "_full": "full_accuracy", "_span_recall_at_1": "span_recall_at_1",
               "_span_recall_at_k": "span_recall_at_k"}
    rows = [("passkey", b) for b in results["passkey"]["by_length"]] if "passkey" in results else []
    rows += [(b["set"], b) for b in results["recall"]["by_set"]] if "recall" in results else []
    for name, b in rows:
        for suffix, column in columns.items():
            h.setdefault(name + suffix, {})[str(b["filler_tokens"])] = b[column]
    if "ppl" in results:
        h["ppl_after_first_segment"] = {
            name: {**{k: m["after_first_segment"] for k, m in c["methods"].items()},
                   "longmem_vs_sidenet": c["longmem_vs_sidenet_after_first_segment"]}
            for name, c in results["ppl"]["corpora"].items()}
        h["ppl"] = {name: {k: m["ppl"] for k, m in c["methods"].items()}
                    for name, c in results["ppl"]["corpora"].items()}
    if "conversation" in results:
        for suffix, column in (("", "accuracy"), ("_without_memory", "control_accuracy"), ("_bm25", "bm25_accuracy"),
                               ("_full", "full_accuracy"), ("_reply_seconds", "reply_seconds")):
            h["conversation" + suffix] = {str(b["history_tokens"]): b[column] for b in results["conversation"]["by_length"]}
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
        ["eval sizes", ", ".join(f"{k}={v!r}" for k, v in s["eval_config"].items() if k != "out_dir")],
        ["device", f"{s['device']}, {s['torch_threads']} torch threads; Python {s['python']}, torch {s['torch']}"],
    ], "ll")
    times = markdown_table(["part", "items", "wall time"],
                           [[TITLES[p], results[p]["items"], f"{results[p]['seconds']:.1f} s"] for p in parts]
                           + [["total", "", f"{sum(results[p]['seconds'] for p in parts):.1f} s"]])
    sections = [f"## {TITLES[p]}\n\n{MODULES[p].report(results[p])}" for p in parts]
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
        results[part] = MODULES[part].run(model, config, data, out, progress)
        results[part]["seconds"] = time.perf_counter() - t0
    return write_results(out, jsonable(results))


def same_setup(a: dict, b: dict) -> bool:
    """Whether two runs evaluated the same model the same way (threads aside). An evaluation setting one of
    them did not have (a part added since) cannot have changed what that one measured."""
    volatile = ("torch_threads", "eval_config")
    fixed = lambda s: {k: v for k, v in s.items() if k not in volatile}
    ea, eb = a.get("eval_config", {}), b.get("eval_config", {})
    return fixed(a) == fixed(b) and all(ea[k] == eb[k] for k in ea.keys() & eb.keys())


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
