"""LongMem = frozen backbone + memory bank + SideNet, reading long texts segment by segment.

A text is read in segments of W tokens. For each segment the backbone produces hidden states and
the memory layer's keys/values; the SideNet reads the segment, retrieving from memory at its memory
block; only then are the segment's keys/values appended (so a segment never retrieves from itself).

Three roles do the work, each a small interface with an in-process implementation here and a Ray
one in services/ (the segment loop below is the same for both):
- `Encoder`: the frozen backbone; `encode` a batch of segments, `ingest` segments into a memory;
- `Reader`: the SideNet; `read` encoded segments against memories (then fill a memory), `generate`
  with KV caches, `retrieve` what a text would read;
- `Bank`: the memories (longmem.memory.MemoryBank in process; sharded over actors in services/).

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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone, BackboneOutput
from .checkpoint import load_weights, read_meta, resolve_checkpoint
from .config import LongMemConfig
from .memory import ChunkHits, MemoryBank, MemoryStats, Retrieved, hits_to_retrieved, round_up
from .sidenet import FrozenInputs, Retriever, SideNet



def perplexity(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-prob (NaN for none)."""
    return float(math.exp(-float(np.mean(logprobs)))) if len(logprobs) else float("nan")


def memory_capacity(config: LongMemConfig, num_tokens: int) -> int:
    """A memory capacity holding num_tokens, in whole chunks, at most `memory.capacity_tokens`."""
    return min(config.memory.capacity_tokens, round_up(num_tokens, config.memory.chunk_size))


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
class Span:
    """A stretch of a memory's stream that a text retrieved."""

    start_position: int
    end_position: int  # exclusive
    token_ids: list[int]
    text: str
    score: float  # best inner product of any query with one of its chunks
    hits: int  # (query token, head) pairs that retrieved one of its chunks


@dataclass
class SegmentScores:
    logprobs: np.ndarray  # [n] log-probabilities of the targets
    backbone_logprobs: np.ndarray  # [n]; [0] when the row did not ask for the backbone alone


class Bank(Protocol):
    def create(self, memory_id: str, capacity_tokens: int | None = None,
               num_shards: int | None = None) -> MemoryStats: ...
    def stats(self, memory_id: str) -> MemoryStats: ...
    def list(self) -> list[MemoryStats]: ...
    def delete(self, memory_id: str) -> None: ...
    def reset(self, memory_id: str) -> MemoryStats: ...
    def append(self, memory_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
               skip_first: int = 0) -> MemoryStats: ...
    def search(self, memory_ids: list[list[str]], queries: torch.Tensor, k_chunks: int) -> list[ChunkHits]: ...


class Encoder(Protocol):
    def encode(self, segments: list[list[int]]) -> Any: ...  # BackboneOutput, or a handle to one
    def ingest(self, memory_id: str, segments: list[list[int]]) -> MemoryStats: ...


class Reader(Protocol):
    def read(self, encoded: Any, segments: list[list[int]], search: list[list[str]],
             fill: list[str | None], targets: list[list[int]], backbone: list[bool]) -> list[SegmentScores]: ...
    def generate(self, ids: list[int], memory_id: str | None, max_new_tokens: int, temperature: float,
                 top_k: int, seed: int, use_memory: bool) -> Iterator[int]: ...
    def retrieve(self, memory_id: str, ids: list[int], max_spans: int) -> list[Span]: ...


def segments(ids: list[int], w: int, start: int = 0) -> list[list[int]]:
    """ids[start:] cut into W-token segments, the unit everything reads and stores (the last may be short)."""
    return [ids[s:s + w] for s in range(start, len(ids), w)]


def batches(items: list, size: int) -> list[list]:
    """items in consecutive groups of `size` (one encoder or reader call each)."""
    return [items[a:a + size] for a in range(0, len(items), size)]


def read_steps(docs: list[list[int]], w: int, batch: int) -> Iterator[tuple[list[int], list[list[int]], list[list[int]]]]:
    """The segment loop of reading: documents read together, segment s of every one before segment s + 1
    of any (a segment reads the memory its predecessors filled), `batch` rows per step. Yields (the
    rows' document indices, their segments, each segment's next-token targets)."""
    for s in range(max(math.ceil(len(d) / w) for d in docs)):
        for rows in batches([i for i, d in enumerate(docs) if s * w < len(d)], batch):
            yield (rows, [docs[i][s * w:(s + 1) * w] for i in rows], [docs[i][s * w + 1:(s + 1) * w + 1] for i in rows])


def pad_segments(segments: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Right-pads token id lists into a [B, T] batch (causal attention never sees the padding)."""
    width = max(map(len, segments))
    batch = torch.zeros(len(segments), width, dtype=torch.long)
    for b, seg in enumerate(segments):
        batch[b, :len(seg)] = torch.tensor(seg)
    return batch.to(device)


def fill_memory(bank: Bank, memory_id: str, out: BackboneOutput | FrozenInputs, row: int, ids: list[int], sink_tokens: int) -> MemoryStats:
    """Appends one encoded segment (row `row` of a batch, its first len(ids) tokens) to a memory."""
    n = len(ids)
    return bank.append(memory_id, out.mem_keys[row, :n].float().cpu().numpy(),
                       out.mem_values[row, :n].float().cpu().numpy(), np.asarray(ids, np.int32),
                       skip_first=sink_tokens)


class Retrieval:
    """The retrieval role: what the SideNet's memory block reads besides its local context.

    query -> search -> attend: the memory block (sidenet.SideNet._memory_path) hands this its
    pre-rotary queries [B, T, Hq, d]; row b's are searched in the memories `search[b]` (their hits
    merged into one exact top-k of k_chunks chunks, Bank.search) and the retrieved keys/values come
    back as the attention reads them (`Retrieved`, gathered on the queries' device); the block then
    attends jointly to them and its local context. It runs where the reader runs and blocks on I/O:
    in process the bank is a MemoryBank; in the service, RemoteBank asks the bank actor for the
    memories' routes and searches their shard actors. `record` and `sources`, when given, receive
    each row's hits and which of its memories each hit came from (sources: an in-process MemoryBank
    only, see MemoryBank.search)."""

    def __init__(self, bank: Bank, search: list[list[str]], k_chunks: int, record: list[ChunkHits] | None = None,
                 sources: list[np.ndarray] | None = None):
        self.bank, self.search, self.k_chunks, self.record, self.sources = bank, search, k_chunks, record, sources

    def __call__(self, queries: torch.Tensor) -> Retrieved:  # [B, T, Hq, d]
        rows = (self.bank.search(self.search, queries, self.k_chunks) if self.sources is None
                else self.bank.search(self.search, queries, self.k_chunks, self.sources))
        if self.record is not None:
            self.record.extend(rows)
        return hits_to_retrieved(rows, queries.dtype, queries.device)


class LocalEncoder:
    """The encoder role in process: the frozen backbone."""

    def __init__(self, backbone: Backbone, bank: Bank, config: LongMemConfig):
        self.backbone, self.bank, self.config = backbone, bank, config

    def encode(self, segments: list[list[int]]) -> BackboneOutput:
        out, _ = self.backbone.encode(pad_segments(segments, self.backbone.device))
        return out

    def encode_memory(self, segments: list[list[int]]) -> BackboneOutput:
        """The memory layer's keys/values only: the backbone stops there (all ingest needs)."""
        keys, values = self.backbone.encode_memory(pad_segments(segments, self.backbone.device))
        return BackboneOutput(hidden=None, mem_keys=keys, mem_values=values, last=None)

    def fill(self, memory_id: str, out: BackboneOutput, segments: list[list[int]], first_row: int = 0) -> MemoryStats:
        """Appends encoded segments (rows first_row.. of `out`) to a memory, in order."""
        stats = None
        for b, seg in enumerate(segments):
            stats = fill_memory(self.bank, memory_id, out, first_row + b, seg, self.config.memory.sink_tokens)
        return stats

    def ingest(self, memory_id: str, segments: list[list[int]]) -> MemoryStats:
        """Encodes segments up to the memory layer only and appends them to a memory."""
        return self.fill(memory_id, self.encode_memory(segments), segments)


class LocalReader:
    """The reader role in process: the SideNet, with the backbone's LM head, positions and (for
    generation) the backbone itself."""

    def __init__(self, backbone: Backbone, sidenet: SideNet, bank: Bank, config: LongMemConfig):
        self.backbone, self.sidenet, self.bank, self.config = backbone, sidenet, bank, config
        self.k_chunks = config.memory.topk_tokens // config.memory.chunk_size

    def retrieval(self, search: list[list[str]], record: list[ChunkHits] | None = None,
                  sources: list[np.ndarray] | None = None) -> Retrieval | None:
        """The Retrieval for rows searching `search[b]` (None when no row searches anything)."""
        return Retrieval(self.bank, search, self.k_chunks, record, sources) if any(search) else None

    def _positions(self, batch: int, length: int, offset: int = 0) -> torch.Tensor:
        return (offset + torch.arange(length, device=self.backbone.device)).expand(batch, length)

    def read_state(self, out: BackboneOutput | FrozenInputs, retrieval: Retriever | None, cache=None,
                   offset: int = 0) -> torch.Tensor:
        """The SideNet's final normed state [B, T, D] for encoded segments (with grad when enabled);
        from FrozenInputs only the blocks from its `start` run."""
        b, t = out.hidden.shape[1:3]
        positions = self._positions(b, t, offset)
        if isinstance(out, FrozenInputs):
            return self.sidenet(out.hidden, positions, retrieval, cache, out.start, out.entry)
        return self.sidenet(out.hidden, positions, retrieval, cache)  # [B, T, D]

    def frozen_inputs(self, out: BackboneOutput, start: int) -> FrozenInputs:
        """What SideNet blocks start.. read for encoded segments (see SideNet.frozen_inputs)."""
        b, t = out.hidden.shape[1:3]
        return self.sidenet.frozen_inputs(out.hidden, self._positions(b, t), out.mem_keys, out.mem_values, start)

    def read(self, encoded: BackboneOutput, segments: list[list[int]], search: list[list[str]],
             fill: list[str | None], targets: list[list[int]], backbone: list[bool]) -> list[SegmentScores]:
        """Scores the targets of each row, then appends each row's segment to its `fill` memory."""
        scores = self.score(encoded, search, targets, backbone)
        self.fill(encoded, segments, fill)
        return scores

    def fill(self, encoded: BackboneOutput, segments: list[list[int]], fill: list[str | None]) -> None:
        """Appends row b's segment to memory fill[b] (None: not kept)."""
        for b, memory_id in enumerate(fill):
            if memory_id is not None:
                fill_memory(self.bank, memory_id, encoded, b, segments[b], self.config.memory.sink_tokens)

    @torch.no_grad()
    def score(self, encoded: BackboneOutput, search: list[list[str]], targets: list[list[int]],
              backbone: list[bool]) -> list[SegmentScores]:
        """Log-probabilities of each row's targets, LongMem's and, for the rows whose `backbone` is
        True, the backbone's alone (its LM head runs only if some row asks); no memory is changed."""
        state = self.read_state(encoded, self.retrieval(search))
        logp = torch.log_softmax(self.backbone.lm_head(state).float(), dim=-1)  # [B, T, V]
        base = torch.log_softmax(self.backbone.logits(encoded.last).float(), dim=-1) if any(backbone) else None
        scores = []
        for b, tgt in enumerate(targets):
            t = torch.tensor(tgt, dtype=torch.long, device=logp.device)[:, None]
            n = len(tgt)
            scores.append(SegmentScores(logp[b, :n].gather(-1, t)[:, 0].cpu().numpy(),
                                        base[b, :n].gather(-1, t)[:, 0].cpu().numpy() if backbone[b]
                                        else np.zeros(0, np.float32)))
        return scores

    @contextmanager
    def _scratch(self, needed: bool, num_tokens: int):
        memory_id = create_scratch(self.bank, self.config, num_tokens) if needed else None
        try:
            yield memory_id
        finally:
            if memory_id:
                self.bank.delete(memory_id)

    @torch.no_grad()
    def generate(self, ids: list[int], memory_id: str | None, max_new_tokens: int, temperature: float,
                 top_k: int, seed: int, use_memory: bool) -> Iterator[int]:
        """Yields new token ids. The memory is not modified: the prompt's earlier segments, and segments
        completed while generating, go to a scratch memory searched together with it."""
        from transformers import DynamicCache

        w, sink = self.config.read.segment_tokens, self.config.memory.sink_tokens
        generator = torch.Generator().manual_seed(seed)
        eos = self.backbone.tokenizer.eos_token_id
        new_cache = lambda: (DynamicCache(config=self.backbone.model.config), self.sidenet.new_cache())
        with self._scratch(use_memory and len(ids) + max_new_tokens > w, len(ids) + max_new_tokens) as scratch:
            search = [[x for x in (memory_id, scratch) if x is not None]] if use_memory else [[]]
            retrieval = self.retrieval(search)
            split = (len(ids) - 1) // w * w  # whole segments before the last are read, then cached
            if scratch is not None:
                for seg in segments(ids[:split], w):
                    out, _ = self.backbone.encode(pad_segments([seg], self.backbone.device))
                    fill_memory(self.bank, scratch, out, 0, seg, sink)  # only its keys/values are needed
            segment, keys, values = [], [], []
            bb_cache, side_cache = new_cache()
            pending = ids[split:]
            for _ in range(max_new_tokens):
                x = torch.tensor([pending], device=self.backbone.device)
                out, bb_cache = self.backbone.encode(x, past_key_values=bb_cache)
                state = self.read_state(out, retrieval, side_cache, offset=len(segment))
                segment += pending
                keys.append(out.mem_keys)
                values.append(out.mem_values)
                token = sample(self.backbone.lm_head(state[0, -1]).float(), temperature, top_k, generator)
                yield token
                if token == eos:
                    return
                if len(segment) == w:
                    if scratch is not None:
                        full = BackboneOutput(None, torch.cat(keys, 1), torch.cat(values, 1), None)
                        fill_memory(self.bank, scratch, full, 0, segment, sink)
                    segment, keys, values = [], [], []
                    bb_cache, side_cache = new_cache()
                pending = [token]

    @torch.no_grad()
    def retrieve(self, memory_id: str, ids: list[int], max_spans: int) -> list[Span]:
        recorded: list[ChunkHits] = []
        out, _ = self.backbone.encode(pad_segments([ids], self.backbone.device))
        self.read_state(out, self.retrieval([[memory_id]], recorded))
        return spans_from_hits(recorded[0], self.backbone.tokenizer.decode, max_spans)


def ingest_tokens(encoder: Encoder, memory_id: str, ids: list[int], config: LongMemConfig,
                  progress: bool = False) -> MemoryStats:
    """Appends a token stream to a memory in segments of W tokens, read.batch_segments per encoder call.
    Returns the memory's stats after the last call."""
    stats = None
    for group in tqdm(batches(segments(ids, config.read.segment_tokens), config.read.batch_segments),
                      desc="appending", unit="batch", disable=not progress):
        stats = encoder.ingest(memory_id, group)
    return stats


def create_scratch(bank: Bank, config: LongMemConfig, num_tokens: int) -> str:
    """A temporary memory for a call's own earlier segments, sized to hold all of them if it can."""
    memory_id = f"scratch-{uuid.uuid4().hex}"
    bank.create(memory_id, memory_capacity(config, num_tokens))
    return memory_id


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Greedy when temperature <= 0; else softmax(logits / temperature) over the top_k (0: all)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))


def spans_from_hits(hits: ChunkHits, decode, max_spans: int) -> list[Span]:
    """Aggregates chunk hits over query tokens and heads into ranked spans of source text;
    retrieved chunks that follow each other in the stream merge into one span."""
    valid = hits.seqs >= 0
    seqs = hits.seqs[valid]
    if not len(seqs):
        return []
    uniq, first, counts = np.unique(seqs, return_index=True, return_counts=True)
    table_rows = hits.rows[valid][first]
    positions, tokens = hits.table_positions[table_rows], hits.table_token_ids[table_rows]  # [U, c] each
    best = np.full(len(uniq), -np.inf, np.float32)
    np.maximum.at(best, np.searchsorted(uniq, seqs), hits.scores[valid])
    spans: list[Span] = []
    for i in np.argsort(positions[:, 0], kind="stable"):
        start, end = int(positions[i, 0]), int(positions[i, -1]) + 1
        if spans and spans[-1].end_position == start:
            last = spans[-1]
            last.end_position = end
            last.token_ids += tokens[i].tolist()
            last.hits += int(counts[i])
            last.score = max(last.score, float(best[i]))
        else:
            spans.append(Span(start, end, tokens[i].tolist(), "", float(best[i]), int(counts[i])))
    spans.sort(key=lambda s: (-s.hits, -s.score))
    spans = spans[:max_spans]
    for s in spans:
        s.text = decode(s.token_ids)
    return spans


@dataclass
class _Row:
    """One document being read: its tokens and the memories its segments search and fill."""

    ids: list[int]
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
        steps = read_steps([r.ids for r in rows], self.config.read.segment_tokens, self.config.read.batch_segments)
        for active, segs, targets in tqdm(steps, desc="reading", unit="step", disable=not progress):
            group = [rows[i] for i in active]
            encoded = self.encoder.encode(segs)
            scores = self.reader.read(encoded, segs, [r.search for r in group], [r.fill for r in group], targets,
                                      [r.backbone for r in group])
            for i, sc in zip(active, scores):
                collected[i].append(sc)
        return [ScoreResult(r.ids, np.concatenate([c.logprobs for c in cs]),
                            np.concatenate([c.backbone_logprobs for c in cs])) for r, cs in zip(rows, collected)]

    def score_batch(self, docs: list[list[int]], memory_ids: list[str | None] | None = None,
                    use_memory: bool = True, append: bool = False, progress: bool = False,
                    backbone_logprobs: bool = True) -> list[ScoreResult]:
        """Scores several documents together, each with its own memory (batch rows never mix).
        backbone_logprobs=False leaves each result's backbone_logprobs empty and skips the backbone's
        LM head (one of the two vocabulary projections per scored token)."""
        if not docs:
            raise ValueError("docs must not be empty")
        memory_ids = memory_ids or [None] * len(docs)
        if len(memory_ids) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(memory_ids)} memory ids")
        docs = [self.token_ids(None, d) for d in docs]
        for m in memory_ids:
            if m is not None:
                self.bank.stats(m)
        scratches: list[str | None] = []
        try:
            w = self.config.read.segment_tokens
            for ids, m in zip(docs, memory_ids):
                # Only a text of several segments has earlier segments of its own to remember.
                needed = use_memory and not (append and m is not None) and len(ids) > w
                scratches.append(create_scratch(self.bank, self.config, len(ids)) if needed else None)
            rows = []
            for ids, m, scratch in zip(docs, memory_ids, scratches):
                search = [x for x in (m, scratch) if x is not None] if use_memory else []
                fill = m if append and m is not None else scratch
                rows.append(_Row(ids, search, fill, backbone_logprobs))
            return self._read(rows, progress)
        finally:
            for scratch in scratches:
                if scratch is not None:
                    self.bank.delete(scratch)

    def score(self, text: str | None = None, memory_id: str | None = None, *, token_ids: list[int] | None = None,
              use_memory: bool = True, append: bool = False, progress: bool = False,
              backbone_logprobs: bool = True) -> ScoreResult:
        return self.score_batch([self.token_ids(text, token_ids)], [memory_id], use_memory, append, progress,
                                backbone_logprobs)[0]

    def append(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None,
               progress: bool = False) -> int:
        """Encodes a text with the frozen backbone and appends it to a memory. Returns its token count."""
        ids = self.token_ids(text, token_ids)
        self.bank.stats(memory_id)
        ingest_tokens(self.encoder, memory_id, ids, self.config, progress)
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
        one score_batch call: ([P, C] LongMem, [P, C] the backbone alone). The memory is not changed."""
        texts = [p + c for p in prefixes for c in choices]
        results = self.score_batch(texts, [memory_id] * len(texts), use_memory=use_memory, append=False)
        lengths = [len(c) for _ in prefixes for c in choices]
        shape = (len(prefixes), len(choices))
        return (np.reshape([r.logprobs[-n:].sum() for r, n in zip(results, lengths)], shape).astype(np.float64),
                np.reshape([r.backbone_logprobs[-n:].sum() for r, n in zip(results, lengths)], shape).astype(np.float64))

    def generate(self, prompt: str | None = None, memory_id: str | None = None, *, token_ids: list[int] | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None, use_memory: bool = True) -> Iterator[int]:
        ids = self.token_ids(prompt, token_ids)
        if memory_id is not None:
            self.bank.stats(memory_id)
        max_new = self.config.read.max_new_tokens if max_new_tokens is None else max_new_tokens
        return self.reader.generate(ids, memory_id, max_new, temperature, top_k,
                                    self.config.seed if seed is None else seed, use_memory)

    def retrieve(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None,
                 max_spans: int | None = None) -> list[Span]:
        """The memory spans the SideNet's memory block retrieves while reading `text` (its last W
        tokens), most retrieved first."""
        ids = self.token_ids(text, token_ids)[-self.config.read.segment_tokens:]
        self.bank.stats(memory_id)
        return self.reader.retrieve(memory_id, ids, max_spans or self.config.read.max_retrieve_spans)


def build_sidenet(backbone: Backbone, config: LongMemConfig) -> SideNet:
    """The SideNet for this backbone: a trained checkpoint when the config names one (its own
    initialisation mode then applies to the parameters it did not train), else the configured init."""
    path = resolve_checkpoint(config)
    meta = read_meta(path) if path else {}
    memory_read = meta.get("memory_read", "joint") if path else config.sidenet.memory_read
    if memory_read != config.sidenet.memory_read:
        raise ValueError(f"checkpoint {path} reads memory as {memory_read!r}, the config asks for "
                         f"sidenet.memory_read={config.sidenet.memory_read!r}")
    sidenet = SideNet(backbone, meta.get("init", config.sidenet.init), config.sidenet.gate_init,
                      memory_read).to(backbone.device)
    if path:
        load_weights(sidenet, path, meta)
    return sidenet.eval()


def make_bank(config: LongMemConfig, backbone: Backbone) -> MemoryBank:
    mem = config.memory
    return MemoryBank(mem.chunk_size, backbone.num_kv_heads, backbone.head_dim, mem.capacity_tokens,
                      np.dtype(mem.dtype), mem.approx_search())


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
