"""The requests the parts make of a model beyond scoring: a memory of filler text encoded once
(`FillerMemory`), and generate-and-match trials (`RecallTrials`: fill a memory, ask, compare the greedy
answer, and ask again without memory as the control)."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..config import LongMemConfig
from ..data import Document, filler_text
from ..memory import MemoryStats, round_up
from ..model import LongMem
from ..roles import batches, pad_segments, segments
from .common import EvalData

RECALL_EXTRA_TOKENS = 2  # greedy tokens generated past the answer's own, so a longer answer shows


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
