"""LongMem = frozen backbone + memory bank + SideNet, reading long texts segment by segment.

A text is read in segments of W tokens. For each segment the backbone produces hidden states and
the memory layer's keys/values; the SideNet reads the segment, retrieving from memory at its memory
block; only then are the segment's keys/values appended (so a segment never retrieves from itself).

Three roles do the work (longmem/roles.py), each a small interface with an in-process
implementation (longmem/encoder.py, longmem/reader.py, longmem/memory.py) and a Ray one in
services/. `LongMemRunner` here runs the public operations over any of them; `LongMem` is all of it
in one process.

Where memory comes from, per call:
- `memory_id` given and `append=True`: the text is read against that memory and goes into it;
- `memory_id` given and `append=False`: the memory is left untouched; the text's own earlier
  segments go into a temporary *scratch* memory searched together with it (exact merged top-k);
- no `memory_id` with `use_memory=True`: the scratch memory alone (LongMem over one long document);
- `use_memory=False`: the SideNet without memory.
Every call also returns the backbone's own log-probabilities with the same window (the baseline).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone
from .config import LongMemConfig
from .encoder import LocalEncoder, ingest_tokens
from .memory import MemoryBank, MemoryStats
from .reader import LocalReader, build_sidenet
from .roles import (Bank, Encoder, Reader, SegmentScores, Span, Window, read_steps, reread_prefix,
                    scratch_memory, separator_ids, windows)
from .sidenet import SideNet


def perplexity(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-prob (NaN for none)."""
    return float(math.exp(-float(np.mean(logprobs)))) if len(logprobs) else float("nan")


@dataclass
class ScoreResult:
    token_ids: list[int]
    logprobs: np.ndarray  # [N - 1]: log p(token i+1 | tokens <= i), LongMem (or SideNet) reading
    backbone_logprobs: np.ndarray  # [N - 1]: the backbone alone, same segments; [0] when not asked for

    @property
    def perplexity(self) -> float:
        return perplexity(self.logprobs)

    @property
    def backbone_perplexity(self) -> float:
        return perplexity(self.backbone_logprobs)


@dataclass
class _Row:
    """One document being read: its tokens, the windows it is read in, the memories they search and fill."""

    ids: list[int]
    windows: list[Window]
    search: list[str]
    fill: str | None
    backbone: bool  # also score it with the backbone alone


class LongMemRunner:
    """The segment loop and the public operations, over any Encoder / Reader / Bank."""

    def __init__(self, config: LongMemConfig, encoder: Encoder, reader: Reader, bank: Bank, tokenizer,
                 vocab_size: int):
        self.config = config.validate()
        self.encoder, self.reader, self.bank = encoder, reader, bank
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    # ---- memories -------------------------------------------------------------------------------
    def create_memory(self, memory_id: str | None = None, capacity_tokens: int | None = None,
                      num_shards: int | None = None) -> str:
        memory_id = memory_id or uuid.uuid4().hex
        self.bank.create(memory_id, capacity_tokens, num_shards)
        return memory_id

    def delete_memory(self, memory_id: str) -> None:
        self.bank.delete(memory_id)

    def reset_memory(self, memory_id: str) -> MemoryStats:
        return self.bank.reset(memory_id)

    def memory_stats(self, memory_id: str) -> MemoryStats:
        return self.bank.stats(memory_id)

    def list_memories(self) -> list[MemoryStats]:
        return self.bank.list()

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def token_ids(self, text: str | None, token_ids: list[int] | None) -> list[int]:
        """Exactly one of text / token_ids, non-empty and inside the vocabulary (ValueError otherwise)."""
        if (text is None) == (token_ids is None):
            raise ValueError("give exactly one of text or token_ids")
        ids = self.tokenize(text) if text is not None else [int(t) for t in token_ids]
        if not ids:
            raise ValueError("the text has no tokens")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return ids

    # ---- reading --------------------------------------------------------------------------------
    def _read(self, rows: list[_Row], progress: bool) -> list[ScoreResult]:
        collected: list[list[SegmentScores]] = [[] for _ in rows]
        steps = read_steps([r.windows for r in rows], self.config.read.batch_segments)
        for active, wins in tqdm(steps, desc="reading", unit="step", disable=not progress):
            group = [rows[i] for i in active]
            segs = [x.ids for x in wins]
            encoded = self.encoder.encode(segs)
            scores = self.reader.read(encoded, segs, [r.search for r in group],
                                      [None if x.reread else r.fill for r, x in zip(group, wins)],
                                      [x.targets for x in wins], [r.backbone for r in group])
            for i, x, sc in zip(active, wins, scores):
                collected[i].append(SegmentScores(sc.logprobs[x.scored_from:],
                                                  sc.backbone_logprobs[x.scored_from:] if rows[i].backbone
                                                  else sc.backbone_logprobs))
        return [ScoreResult(r.ids, np.concatenate([c.logprobs for c in cs]),
                            np.concatenate([c.backbone_logprobs for c in cs])) for r, cs in zip(rows, collected)]

    def score_batch(self, docs: list[list[int]], memory_ids: list[str | None] | None = None,
                    use_memory: bool = True, append: bool = False, progress: bool = False,
                    backbone_logprobs: bool = True, prefixes: list[list[int]] | None = None) -> list[ScoreResult]:
        """Scores several documents together, each with its own memory (batch rows never mix).
        backbone_logprobs=False leaves each result's backbone_logprobs empty and skips the backbone's
        LM head (one of the two vocabulary projections per scored token). prefixes[i], when given,
        opens document i's last window (re-read tokens, `reread_prefix`); it is read, not scored, and
        the memory read follows read.reread_memory_read (`answer_memory`)."""
        if not docs:
            raise ValueError("docs must not be empty")
        memory_ids = memory_ids or [None] * len(docs)
        prefixes = prefixes or [[]] * len(docs)
        if len(memory_ids) != len(docs) or len(prefixes) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(memory_ids)} memory ids and {len(prefixes)} prefixes")
        docs = [self.token_ids(None, d) for d in docs]
        for m in memory_ids:
            if m is not None:
                self.bank.stats(m)
        w = self.config.read.segment_tokens
        with ExitStack() as temporary:  # every memory made for this call is deleted when it ends
            rows, reads = [], {}  # reads: one answer memory per (memory, prefix), which a prefix's choices share
            for ids, m, prefix in zip(docs, memory_ids, prefixes):
                # Only a text of several windows has earlier segments of its own to remember.
                scratch = None
                if use_memory and not (append and m is not None) and len(windows(ids, w, prefix)) > 1:
                    scratch = temporary.enter_context(scratch_memory(self.bank, self.config, len(ids)))
                if use_memory and (m, tuple(prefix)) not in reads:
                    reads[m, tuple(prefix)] = temporary.enter_context(self.answer_memory(m, prefix))
                search = [x for x in (reads[m, tuple(prefix)], scratch) if x is not None] if use_memory else []
                fill = m if append and m is not None else scratch
                rows.append(_Row(ids, windows(ids, w, prefix), search, fill, backbone_logprobs))
            return self._read(rows, progress)

    def score(self, text: str | None = None, memory_id: str | None = None, *, token_ids: list[int] | None = None,
              use_memory: bool = True, append: bool = False, progress: bool = False,
              backbone_logprobs: bool = True) -> ScoreResult:
        return self.score_batch([self.token_ids(text, token_ids)], [memory_id], use_memory, append, progress,
                                backbone_logprobs)[0]

    def append(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None,
               progress: bool = False, request_id: str | None = None) -> int:
        """Encodes a text with the frozen backbone and appends it to a memory. Returns its token count.
        With a request id the append is applied at most once: a call retried with the same id (after
        a failure) appends only what the first one did not."""
        ids = self.token_ids(text, token_ids)
        self.bank.stats(memory_id)
        ingest_tokens(self.encoder, memory_id, ids, self.config, progress, request_id)
        return len(ids)

    def score_choices(self, prefix: str, choices: list[str], memory_id: str | None = None,
                      use_memory: bool = True) -> list[tuple[float, int]]:
        """(sum of log-probabilities, token count) of each choice as the continuation of prefix."""
        if not choices:
            raise ValueError("choices must not be empty")
        choice_ids = [self.token_ids(c, None) for c in choices]
        reader, _ = self.score_continuations([self.token_ids(prefix, None)], choice_ids, memory_id, use_memory)
        return [(float(lp), len(c)) for lp, c in zip(reader[0], choice_ids)]

    def score_continuations(self, prefixes: list[list[int]], choices: list[list[int]], memory_id: str | None = None,
                            use_memory: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Sums of log-probabilities of every choice as the continuation of every prefix (token ids), in
        one score_batch call: ([P, C] LongMem, [P, C] the backbone alone). The memory is not changed.
        With "choices" in read.reread, each prefix's re-read spans open the window of all its choices."""
        texts = [p + c for p in prefixes for c in choices]
        rereads = [self.reread_prefix(self.answer_spans("choices", memory_id, p, use_memory)) for p in prefixes]
        results = self.score_batch(texts, [memory_id] * len(texts), use_memory=use_memory, append=False,
                                   prefixes=[r for r in rereads for _ in choices])
        lengths = [len(c) for _ in prefixes for c in choices]
        shape = (len(prefixes), len(choices))
        return (np.reshape([r.logprobs[-n:].sum() for r, n in zip(results, lengths)], shape).astype(np.float64),
                np.reshape([r.backbone_logprobs[-n:].sum() for r, n in zip(results, lengths)], shape).astype(np.float64))

    def generate(self, prompt: str | None = None, memory_id: str | None = None, *, token_ids: list[int] | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None, use_memory: bool = True, reread: list[Span] | None = None) -> Iterator[int]:
        """New token ids continuing the prompt. reread: the spans to re-read before it (`reread`);
        None re-reads as read.reread says for "generate"."""
        ids = self.token_ids(prompt, token_ids)
        if memory_id is not None:
            self.bank.stats(memory_id)
        if reread is None:
            reread = self.answer_spans("generate", memory_id, ids, use_memory)
        max_new = self.config.read.max_new_tokens if max_new_tokens is None else max_new_tokens
        return self._generate(ids, memory_id, max_new, temperature, top_k, self.config.seed if seed is None else seed,
                              use_memory, self.reread_prefix(reread))

    def _generate(self, ids: list[int], memory_id: str | None, max_new: int, temperature: float, top_k: int,
                  seed: int, use_memory: bool, prefix: list[int]) -> Iterator[int]:
        with self.answer_memory(memory_id, prefix) as read:
            yield from self.reader.generate(ids, read, max_new, temperature, top_k, seed, use_memory, prefix)

    def retrieve(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None,
                 max_spans: int | None = None) -> list[Span]:
        """The memory spans the SideNet's memory block retrieves while reading `text` (its last W
        tokens), most retrieved first."""
        ids = self.token_ids(text, token_ids)[-self.config.read.segment_tokens:]
        self.bank.stats(memory_id)
        return self.reader.retrieve(memory_id, ids, max_spans or self.config.read.max_retrieve_spans)

    def reread(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None) -> list[Span]:
        """The spans answering `text` from this memory re-reads (read.reread_*): the best spans the memory
        block retrieves for its last W tokens, widened, with the token ids the memory holds, in stream order."""
        ids = self.token_ids(text, token_ids)[-self.config.read.segment_tokens:]
        self.bank.stats(memory_id)
        return self.reader.reread(memory_id, ids)

    def answer_spans(self, path: str, memory_id: str | None, ids: list[int], use_memory: bool,
                     reread: bool | None = None) -> list[Span]:
        """What answer path `path` ("generate", "choices") re-reads before ids: `reread` where a memory is
        read and `reread` says so (None: where read.reread lists the path), else nothing."""
        wanted = path in self.config.read.reread if reread is None else reread
        if memory_id is None or not use_memory or not wanted:
            return []
        return self.reread(memory_id, token_ids=ids)

    @contextmanager
    def answer_memory(self, memory_id: str | None, prefix: list[int]) -> Iterator[str | None]:
        """The memory an answer's memory read searches after re-reading `prefix` (read.reread_memory_read):
        the memory itself ("memory", or nothing re-read), a temporary memory holding the re-read tokens
        alone, encoded as one more text and deleted afterwards ("spans"), or none ("none")."""
        mode = self.config.read.reread_memory_read
        if memory_id is None or not prefix or mode == "memory":
            yield memory_id
        elif mode == "none":
            yield None
        else:
            with scratch_memory(self.bank, self.config, len(prefix)) as scratch:
                ingest_tokens(self.encoder, scratch, prefix, self.config)
                yield scratch

    def reread_prefix(self, spans: list[Span]) -> list[int]:
        return reread_prefix(spans, separator_ids(self.tokenizer, self.config.read.reread_separator))


def make_bank(config: LongMemConfig, backbone: Backbone) -> MemoryBank:
    mem = config.memory
    return MemoryBank(mem.chunk_size, backbone.num_kv_heads, backbone.head_dim, mem.capacity_tokens,
                      np.dtype(mem.dtype), mem.approx_search(), mem.request_id_window, mem.recent_tokens)


class LongMem(LongMemRunner):
    """LongMem in one process: backbone, SideNet and memory bank side by side."""

    def __init__(self, config: LongMemConfig | None = None, backbone: Backbone | None = None,
                 sidenet: SideNet | None = None, bank: MemoryBank | None = None):
        config = (config or LongMemConfig()).validate()
        torch.manual_seed(config.seed)
        self.backbone = backbone or Backbone(config.backbone)
        self.sidenet = sidenet or build_sidenet(self.backbone, config)
        bank = bank or make_bank(config, self.backbone)
        super().__init__(config, LocalEncoder(self.backbone, bank, config),
                         LocalReader(self.backbone, self.sidenet, bank, config), bank,
                         self.backbone.tokenizer, self.backbone.vocab_size)
