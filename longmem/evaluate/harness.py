"""The requests the parts make of a model beyond scoring: a memory of filler text encoded once
(`FillerMemory`), and generate-and-match trials (`RecallTrials`: fill a memory, ask, compare the greedy
answer, and ask again without memory as the control, with a BM25 prompt of the document's text and
with the whole document in the window, the last two read by the backbone alone)."""

from __future__ import annotations

import random
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..baseline import BM25Prompt
from ..config import EvalConfig, LongMemConfig
from ..data import Document, filler_text
from ..memory import MemoryStats, round_up
from ..model import LongMem
from ..roles import Span, batches, pad_segments, segments
from .common import EvalData, fmt_acc

RECALL_EXTRA_TOKENS = 2  # greedy tokens generated past the answer's own, so a longer answer shows
# Filler encodings of this process, by backbone, then (W, filler ids), then phase: the frozen backbone's
# keys/values of a filler never change, so parts and settings run in one process with one backbone
# (scripts/reread_tuning.py) encode it once. Weak keys: an encoding goes with its backbone.
_ENCODINGS: "weakref.WeakKeyDictionary[object, dict[tuple, dict[int, tuple[np.ndarray, np.ndarray]]]]" = \
    weakref.WeakKeyDictionary()


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
        self._encoded = _ENCODINGS.setdefault(model.backbone, {}).setdefault((self.w, tuple(filler_ids)), {})
        self._read: set[int] = set()  # the phases this filler's memories were filled from
        self.segments_encoded = 0
        self.encode_seconds = 0.0

    @property
    def phases(self) -> list[int]:
        return sorted(self._read)

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
        self._read.add(phase)
        return self._encoded[phase]

    def phase(self, intro_tokens: int, n: int) -> int:
        """The filler offset of the first segment of filler alone in an intro of intro_tokens + filler[:n]
        (`encoded(phase)` is what `fill` reads), n when the filler ends within the intro's last segment."""
        return min(n, -intro_tokens % self.w)

    def _layout(self, intro_ids: list[int], n: int) -> tuple[list[int], int, list[tuple[int, int]]]:
        """How intro_ids + filler[:n] is filled: the head (the segments holding intro tokens, ingested per
        document), the phase (filler offset of the first segment of filler alone) and, segment by
        segment, the [a, b) rows of `encoded(phase)` that follow the head (filler ids[phase + a:phase + b])."""
        w = self.w
        phase = self.phase(len(intro_ids), n)
        period = (len(self.ids) - phase) // w * w  # whole segments of filler after the phase
        rows = []
        for s in range(phase, n, w):
            a = s - phase if n <= len(self.ids) else (s - phase) % period
            rows.append((a, a + min(s + w, n) - s))
        return intro_ids + self.ids[:phase], phase, rows

    def fill(self, memory_id: str, intro_ids: list[int], n: int, encoder=None, bank=None) -> MemoryStats:
        """Appends intro_ids + filler[:n] to a memory, as model.append(memory_id, token_ids=...) would.
        n may exceed the filler: its whole W-segments then repeat (`repeats(n)` says how often).
        encoder and bank (default: the model's): what ingests the head's segments (`ingest(memory_id,
        segments)`) and what takes the filler's keys/values (roles.Bank), e.g. the services'."""
        bank = bank or self.model.bank
        encoder = encoder or self.model.encoder
        head, phase, rows = self._layout(intro_ids, n)
        for group in batches(segments(head, self.w), self.model.config.read.batch_segments):
            encoder.ingest(memory_id, group)
        if rows:
            keys, values = self.encoded(phase)
            for a, b in rows:
                bank.append(memory_id, keys[a:b], values[a:b], np.asarray(self.ids[phase + a:phase + b], np.int32),
                            skip_first=self.sink)
        return bank.stats(memory_id)

    def document_ids(self, intro_ids: list[int], n: int) -> list[int]:
        """The token ids `fill(memory_id, intro_ids, n)` appends, in order: intro_ids + filler[:n], the
        filler's whole W-segments repeating when n exceeds it."""
        head, phase, rows = self._layout(intro_ids, n)
        return head + [t for a, b in rows for t in self.ids[phase + a:phase + b]]

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
    query: str  # the question's text: what the BM25 baseline searches the document for
    answer: str
    info: dict  # what the report shows of it


class RecallTrials:
    """Runs recall items: each document (intro + n filler tokens) goes into a fresh memory sized to hold
    it all, the question is the prompt, and the greedy continuation must start with the answer. The
    control asks the same question without memory. Two baselines read with the backbone alone: `bm25`
    (longmem/baseline.py: the document's best-matching windows before the question) and `full` (the
    whole document and the question in its window, where they fit in eval.full_window_tokens and the
    backbone's positions; None otherwise)."""

    def __init__(self, model: LongMem, filler: "FillerMemory", ev: EvalConfig, bar):
        self.model, self.filler, self.ev, self.bar = model, filler, ev, bar
        self.full_window = min(ev.full_window_tokens, model.backbone.max_positions)
        self.controls: dict[tuple[tuple[int, ...], int], str] = {}  # (question, new tokens) -> answer
        self.fill_seconds = self.generate_seconds = self.bm25_index_seconds = self.baseline_seconds = 0.0

    @property
    def baseline(self) -> dict:
        """What the report says of the baselines."""
        ev = self.ev
        return {"window_tokens": ev.bm25_window_tokens, "stride_tokens": ev.bm25_stride_tokens,
                "windows": ev.bm25_windows, "separator": ev.bm25_separator, "stopwords": ev.bm25_stopwords,
                "full_window_tokens": self.full_window,
                "index_seconds": self.bm25_index_seconds, "generate_seconds": self.baseline_seconds}

    def _greedy(self, ids: list[int], memory_id: str | None, new_tokens: int, reread: list[Span] | None = None) -> str:
        return self.model.decode(list(self.model.generate(token_ids=ids, memory_id=memory_id, temperature=0.0,
                                                          max_new_tokens=new_tokens,
                                                          use_memory=memory_id is not None, reread=reread)))

    def _backbone_greedy(self, ids: list[int], new_tokens: int) -> str:
        return self.model.decode(self.model.backbone.generate_greedy(ids, new_tokens))

    def run(self, item: RecallItem, n: int) -> dict:
        model = self.model
        new_tokens = len(model.tokenize(" " + item.answer)) + RECALL_EXTRA_TOKENS
        capacity = round_up(len(item.intro_ids) + n, model.config.memory.chunk_size)
        memory_id = model.create_memory(capacity_tokens=capacity)
        try:
            t0 = time.perf_counter()
            stats = self.filler.fill(memory_id, item.intro_ids, n)
            t1 = time.perf_counter()
            reread = model.answer_spans("generate", memory_id, item.question_ids, True)
            text = self._greedy(item.question_ids, memory_id, new_tokens, reread)
            self.fill_seconds += t1 - t0
            self.generate_seconds += time.perf_counter() - t1
        finally:
            model.delete_memory(memory_id)
        key = (tuple(item.question_ids), new_tokens)
        if key not in self.controls:
            self.controls[key] = self._greedy(item.question_ids, None, new_tokens)
        control = self.controls[key]
        document = self.filler.document_ids(item.intro_ids, n)  # [len(intro) + n]: what went into memory
        t0 = time.perf_counter()
        selection = BM25Prompt.from_config(document, model.decode, model.tokenize, self.ev).select(item.query)
        t1 = time.perf_counter()
        bm25 = self._backbone_greedy(selection.ids + item.question_ids, new_tokens)
        whole = document + item.question_ids
        full = self._backbone_greedy(whole, new_tokens) if len(whole) + new_tokens <= self.full_window else None
        self.bm25_index_seconds += t1 - t0
        self.baseline_seconds += time.perf_counter() - t1
        self.bar.update()
        ranked = [i for i, s in enumerate(sorted(reread, key=lambda s: -s.score)) if item.answer in s.text]
        replaced = item.info.get("replaced")
        return {**item.info, "filler_tokens": n, "answer": item.answer,
                "document_tokens": len(item.intro_ids) + n + len(item.question_ids), "memory_capacity": capacity,
                "tokens_held": stats.tokens_held, "tokens_evicted": stats.tokens_evicted,
                "filler_repeats": self.filler.repeats(n), "generated": text, "match": answer_matches(text, item.answer),
                "reread": [[s.start_position, s.end_position] for s in reread],
                "reread_scores": [round(s.score, 4) for s in reread],
                "reread_hit": bool(ranked), "reread_rank": ranked[0] + 1 if ranked else None,
                "reread_top1_hit": ranked[:1] == [0],
                "replaced_match": replaced is not None and answer_matches(text, replaced),
                "bm25_replaced_match": replaced is not None and answer_matches(bm25, replaced),
                "control_generated": control, "control_match": answer_matches(control, item.answer),
                "bm25_windows": selection.starts, "bm25_prompt_tokens": len(selection.ids),
                "bm25_hit": any(item.answer in span for span in selection.texts),
                "bm25_generated": bm25, "bm25_match": answer_matches(bm25, item.answer),
                "full_generated": full, "full_match": None if full is None else answer_matches(full, item.answer)}


def accuracy_rows(trials: list[dict], keys: Sequence[str]) -> list[dict]:
    """Accuracy with and without memory and of the baselines for each distinct value of `keys` among the
    trials, in order. The whole-text baseline counts only the trials whose document fitted its window
    (full_trials; its accuracy is None when none did)."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault(tuple(t[k] for k in keys), []).append(t)
    rows = []
    for group, ts in groups.items():
        full = [t["full_match"] for t in ts if t["full_match"] is not None]
        rows.append({**dict(zip(keys, group)), "trials": len(ts), "correct": sum(t["match"] for t in ts),
                     "accuracy": sum(t["match"] for t in ts) / len(ts),
                     "control_correct": sum(t["control_match"] for t in ts),
                     "control_accuracy": sum(t["control_match"] for t in ts) / len(ts),
                     "bm25_correct": sum(t["bm25_match"] for t in ts),
                     "bm25_accuracy": sum(t["bm25_match"] for t in ts) / len(ts),
                     "bm25_hits": sum(t["bm25_hit"] for t in ts),
                     "reread_hits": sum(t["reread_hit"] for t in ts),
                     "reread_top1_hits": sum(t["reread_top1_hit"] for t in ts),
                     "span_recall_at_1": sum(t["reread_top1_hit"] for t in ts) / len(ts),
                     "span_recall_at_k": sum(t["reread_hit"] for t in ts) / len(ts),
                     "full_trials": len(full), "full_correct": sum(full),
                     "full_accuracy": sum(full) / len(full) if full else None,
                     "memory_capacity": max(t["memory_capacity"] for t in ts),
                     "evicted": sum(t["tokens_evicted"] for t in ts),
                     "filler_repeats": max(t["filler_repeats"] for t in ts)})
    return rows


BASELINE_COLUMNS = ["re-read: best span holds the answer (recall@1)", "any re-read span holds it (recall@k)",
                    "BM25 prompt (backbone)", "BM25 windows hold the answer", "whole text in window (backbone)"]


def baseline_cells(row: dict) -> list[str]:
    """An accuracy_rows row's BASELINE_COLUMNS: LongMem's span recall, then the baselines."""
    return [f"{row['reread_top1_hits']}/{row['trials']}", f"{row['reread_hits']}/{row['trials']}",
            fmt_acc(row["bm25_correct"], row["trials"]), f"{row['bm25_hits']}/{row['trials']}",
            fmt_acc(row["full_correct"], row["full_trials"])]


def baseline_text(b: dict) -> str:
    """The report's description of the baselines (RecallTrials.baseline)."""
    return (
        "*Re-read*: the spans LongMem placed before the question (read.reread_spans at most); recall@1 counts "
        "the trials whose best-scoring span holds the answer's text, recall@k those where any span does. "
        "Baselines, read by the backbone alone (no memory, no SideNet), greedy, on the same items: "
        f"*BM25 prompt*: the document's tokens (intro and filler, exactly as they went into memory) cut into "
        f"windows of {b['window_tokens']} tokens, one every {b['stride_tokens']} tokens, their text indexed with "
        f"BM25 (`bm25s`, stopwords {b['stopwords'] or 'none'}); the {b['windows']} windows that best match the question's text (any sharing no word "
        f"with it left out), overlapping ones merged, go in document order before the question, each followed by "
        f"{b['separator']!r}. *BM25 windows hold the answer*: how often those windows contain the answer's text "
        "(a miss there is retrieval's, a wrong answer despite it is reading's). *Whole text in window*: the "
        f"document and the question read at once, where they fit in {b['full_window_tokens']:,} tokens (n/a "
        f"where no document does). BM25 indexing and retrieval took {b['index_seconds']:.1f} s in all (one "
        f"index per trial), the baselines' generation {b['generate_seconds']:.1f} s.")


def unseen_filler(model: LongMem, config: LongMemConfig, data: EvalData, lengths: Sequence[int],
                  progress: bool) -> "FillerMemory":
    """Filler of unseen text (drawn with eval.seed, so every part reads the same text), encoded once
    per phase, up to eval.filler_tokens (longer memories repeat it)."""
    n = min(max(lengths), config.eval.filler_tokens)
    return FillerMemory(model, passkey_filler_ids(model, data.unseen_documents, n, random.Random(config.eval.seed)),
                        progress)
