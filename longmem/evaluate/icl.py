"""Many-shot in-context learning on word sentiment: thousands of demonstrations in memory, a few in the
local context (choice log-likelihood: LongMem.score_continuations)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import LongMemConfig
from ..data import sentiment_lexicon
from ..memory import round_up
from ..model import LongMem
from ..report import markdown_table
from .common import EvalData, bar_plot, fmt_acc

ICL_LABELS = ("negative", "positive")  # label 0, label 1 (sentiment_lexicon)


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


def run(model: LongMem, config: LongMemConfig, data: EvalData, out_dir: Path, progress: bool) -> dict:
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
    result["plots"] = [bar_plot(out_dir, "icl_accuracy.png", "Word-sentiment ICL accuracy",
                                 [a["label"].replace(" (", "\n(") for a in accuracy.values()],
                                 [a["accuracy"] for a in accuracy.values()], ("majority class", majority))]
    return result


def report(r: dict) -> str:
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
