"""Passkey retrieval: a 5-digit key stated at the start of N tokens of real filler, asked for at the end
(generate-and-match: harness.RecallTrials), by LongMem, without memory, and by the backbone alone with a
BM25 prompt and with the whole text in its window."""

from __future__ import annotations

import random
from pathlib import Path

from tqdm.auto import tqdm

from ..config import LongMemConfig
from ..data import passkey_prompt_parts, random_key
from ..model import LongMem
from ..report import markdown_table
from .common import EvalData, figure, fmt_acc, md_literal, save_plot
from .harness import (BASELINE_COLUMNS, RecallItem, RecallTrials, accuracy_rows, baseline_cells, baseline_text,
                      unseen_filler)

PASSKEY_DIGITS = 5


def run(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
    ev = config.eval
    lengths = sorted(set(ev.passkey_lengths))
    rng = random.Random(ev.seed)
    filler = unseen_filler(model, config, data, lengths, progress)
    filler_text_used = model.decode(filler.ids)
    question = passkey_prompt_parts("0" * PASSKEY_DIGITS)[1]
    question_ids = model.tokenize(question)
    keys: list[str] = []
    with tqdm(total=len(lengths) * ev.passkey_trials, desc="passkey", unit="trial", disable=not progress) as bar:
        runner = RecallTrials(model, filler, ev, bar)
        trials = []
        for n in lengths:
            for _ in range(ev.passkey_trials):
                key = random_key(rng)
                while key in filler_text_used or key in keys:  # the key must occur only in the intro
                    key = random_key(rng)
                keys.append(key)
                item = RecallItem(model.tokenize(passkey_prompt_parts(key)[0]), question_ids, question, key,
                                  {"key": key})
                trials.append(runner.run(item, n))
    result = {
        "items": len(trials), "lengths": lengths, "trials_per_length": ev.passkey_trials,
        "by_length": accuracy_rows(trials, ["filler_tokens"]), "trials": trials, "question_tokens": len(question_ids),
        "filler_tokens": len(filler.ids), "filler_segments_encoded": filler.segments_encoded,
        "filler_phases": filler.phases, "filler_encode_seconds": filler.encode_seconds,
        "fill_seconds": runner.fill_seconds - filler.encode_seconds, "generate_seconds": runner.generate_seconds,
        "configured_capacity": model.config.memory.capacity_tokens, "baseline": runner.baseline, "notes": [],
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
    fig, ax = figure()
    ns = [b["filler_tokens"] for b in result["by_length"]]
    ax.plot(ns, [b["accuracy"] for b in result["by_length"]], marker="o", label="LongMem, document in memory")
    ax.plot(ns, [b["control_accuracy"] for b in result["by_length"]], linestyle="--", color="gray",
            label="no memory")
    ax.plot(ns, [b["bm25_accuracy"] for b in result["by_length"]], marker="s", color="tab:orange",
            label="backbone, BM25 prompt")
    full = [b for b in result["by_length"] if b["full_accuracy"] is not None]
    ax.plot([b["filler_tokens"] for b in full], [b["full_accuracy"] for b in full], marker="^", linestyle="",
            color="tab:green", label="backbone, whole text in window")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("filler tokens N")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"Passkey retrieval, {result['trials_per_length']} trials per length", fontsize=10)
    ax.legend(fontsize=8)
    return save_plot(fig, out_dir, "passkey.png")


def report(r: dict) -> str:
    table = markdown_table(["filler tokens N", "accuracy", "without memory", *BASELINE_COLUMNS, "memory capacity",
                            "tokens evicted"],
                           [[f"{b['filler_tokens']:,}", fmt_acc(b["correct"], b["trials"]),
                             fmt_acc(b["control_correct"], b["trials"]), *baseline_cells(b),
                             f"{b['memory_capacity']:,}", f"{b['evicted']:,}"] for b in r["by_length"]])
    examples = markdown_table(["N", "key", "generated", "match", "BM25 prompt (backbone)", "match"],
                              [[f"{t['filler_tokens']:,}", t["key"], md_literal(t["generated"]),
                                "yes" if t["match"] else "no", md_literal(t["bm25_generated"]),
                                "yes" if t["bm25_match"] else "no"]
                               for t in r["trials"][:: max(1, r["trials_per_length"])]], "rllclc")
    return "\n\n".join([
        "Each trial: a random 5-digit key stated in an intro (\"The pass key is 12345. Remember it. 12345 is the "
        "pass key.\"), then N tokens of text the training never saw, then the question \"What is the pass key? The "
        f"pass key is\" ({r['question_tokens']} tokens). Intro and filler go into a fresh memory sized to hold them "
        f"all (up to {max(b['memory_capacity'] for b in r['by_length']):,} tokens; the configured capacity is "
        f"{r['configured_capacity']:,}, and a smaller FIFO memory would evict the key), so nothing is evicted; the "
        "question is the prompt, and the trial counts when the greedy continuation is the key (exact match). "
        "The key never occurs in the filler. Without memory: the same question with no memory.",
        baseline_text(r["baseline"]), table, f"![passkey accuracy]({r['plots'][0]})",
        f"The filler's keys/values ({r['filler_tokens']:,} tokens, {r['filler_segments_encoded']:,} segments) were "
        f"encoded once ({r['filler_encode_seconds']:.1f} s) and appended to every trial's memory after the "
        f"segment(s) holding the key, encoded per trial (filling the memories took {r['fill_seconds']:.1f} s in "
        f"all, generation {r['generate_seconds']:.1f} s).",
        "First trial of each length:", examples, *[f"Note: {n}" for n in r["notes"]]])
