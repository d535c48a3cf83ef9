"""LongMem = frozen backbone + memory bank + SideNet, reading long texts segment by segment.

A text is read in segments of W tokens. For each segment the backbone produces hidden states and
the memory layer's keys/values; the SideNet reads the segment, retrieving from memory at its memory
block; only then are the segment's keys/values appended (so a segment never retrieves from itself).

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
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import Backbone, BackboneOutput
from .config import LongMemConfig
from .memory import ChunkHits, MemoryBank, MemoryStats, hits_to_retrieved
from .sidenet import SideNet


@dataclass
class ScoreResult:
    token_ids: list[int]
    logprobs: np.ndarray  # [N - 1]: log p(token i+1 | tokens <= i), LongMem (or SideNet) reading
    backbone_logprobs: np.ndarray  # [N - 1]: the backbone alone, same segments

    @staticmethod
    def _ppl(lp: np.ndarray) -> float:
        return float(math.exp(-lp.mean())) if len(lp) else float("nan")

    @property
    def perplexity(self) -> float:
        return self._ppl(self.logprobs)

    @property
    def backbone_perplexity(self) -> float:
        return self._ppl(self.backbone_logprobs)


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
class _Row:
    """One document being read: its tokens and the memories its segments search and fill."""

    ids: list[int]
    search: list[str]
    fill: str | None
    logprobs: list[np.ndarray] = field(default_factory=list)
    backbone_logprobs: list[np.ndarray] = field(default_factory=list)


class LongMem:
    def __init__(self, config: LongMemConfig | None = None, backbone: Backbone | None = None,
                 sidenet: SideNet | None = None, bank: MemoryBank | None = None):
        self.config = (config or LongMemConfig()).validate()
        torch.manual_seed(self.config.seed)
        self.backbone = backbone or Backbone(self.config.backbone)
        self.sidenet = sidenet or self.build_sidenet(self.backbone, self.config)
        self.sidenet.eval()
        self.tokenizer = self.backbone.tokenizer
        mem = self.config.memory
        self.bank = bank or MemoryBank(mem.chunk_size, self.backbone.num_kv_heads, self.backbone.head_dim,
                                       mem.capacity_tokens, np.dtype(mem.dtype))

    @staticmethod
    def build_sidenet(backbone: Backbone, config: LongMemConfig) -> SideNet:
        sidenet = SideNet(backbone, config.sidenet.init, config.sidenet.gate_init).to(backbone.device)
        if config.sidenet.checkpoint:
            from safetensors.torch import load_file

            sidenet.load_state_dict(load_file(config.sidenet.checkpoint), strict=False)
        return sidenet

    # ---- memories -------------------------------------------------------------------------------
    def create_memory(self, memory_id: str | None = None, capacity_tokens: int | None = None) -> str:
        memory_id = memory_id or uuid.uuid4().hex
        self.bank.create(memory_id, capacity_tokens)
        return memory_id

    def delete_memory(self, memory_id: str) -> None:
        self.bank.delete(memory_id)

    def reset_memory(self, memory_id: str) -> None:
        self.bank.get(memory_id).reset()

    def memory_stats(self, memory_id: str) -> MemoryStats:
        return self.bank.get(memory_id).stats()

    @contextmanager
    def _scratch(self, needed: bool):
        """A temporary memory for a call's own earlier segments, deleted afterwards."""
        if not needed:
            yield None
            return
        memory_id = self.create_memory(f"scratch-{uuid.uuid4().hex}")
        try:
            yield memory_id
        finally:
            self.bank.delete(memory_id)

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def _ids(self, text: str | None, token_ids: list[int] | None) -> list[int]:
        if (text is None) == (token_ids is None):
            raise ValueError("give exactly one of text or token_ids")
        ids = self.tokenize(text) if text is not None else list(token_ids)
        if not ids:
            raise ValueError("the text has no tokens")
        vocab = self.backbone.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    # ---- the segment loop -----------------------------------------------------------------------
    def _retriever(self, search: list[list[str]]):
        k_chunks = self.config.memory.topk_tokens // self.config.memory.chunk_size
        if not any(search):
            return None

        def retrieve(queries: torch.Tensor):
            return hits_to_retrieved(self.bank.search(search, queries, k_chunks), queries.dtype, queries.device)
        return retrieve

    def _fill(self, memory_id: str, out: BackboneOutput, row: int, ids: list[int]) -> None:
        n = len(ids)
        self.bank.get(memory_id).append(out.mem_keys[row, :n].float().cpu().numpy(),
                                        out.mem_values[row, :n].float().cpu().numpy(),
                                        np.asarray(ids, np.int32), skip_first=self.config.memory.sink_tokens)

    def _pad(self, segments: list[list[int]]) -> torch.Tensor:
        width = max(map(len, segments))
        batch = torch.zeros(len(segments), width, dtype=torch.long)
        for b, seg in enumerate(segments):
            batch[b, :len(seg)] = torch.tensor(seg)
        return batch.to(self.backbone.device)

    def _positions(self, batch: int, length: int, offset: int = 0) -> torch.Tensor:
        return (offset + torch.arange(length, device=self.backbone.device)).expand(batch, length)

    @torch.no_grad()
    def read_segment(self, segments: list[list[int]], search: list[list[str]]):
        """Reads one segment per row. Returns the backbone output and the SideNet's normed state."""
        input_ids = self._pad(segments)  # [B, T], right-padded
        out, _ = self.backbone.encode(input_ids)
        rope = self.backbone.rotary(out.hidden[0], self._positions(*input_ids.shape))
        state = self.sidenet(out.hidden, rope, self._retriever(search))  # [B, T, D]
        return out, state

    def _read(self, rows: list[_Row], progress: bool = False) -> None:
        w = self.config.read.segment_tokens
        n_segments = max(math.ceil(len(r.ids) / w) for r in rows)
        for s in tqdm(range(n_segments), desc="reading", unit="segment", disable=not progress):
            active = [r for r in rows if s * w < len(r.ids)]
            for start in range(0, len(active), self.config.read.batch_segments):
                group = active[start:start + self.config.read.batch_segments]
                segments = [r.ids[s * w:(s + 1) * w] for r in group]
                out, state = self.read_segment(segments, [r.search for r in group])
                logp = torch.log_softmax(self.backbone.lm_head(state).float(), dim=-1)  # [B, T, V]
                base = torch.log_softmax(self.backbone.logits(out.last).float(), dim=-1)
                for b, r in enumerate(group):
                    targets = torch.tensor(r.ids[s * w + 1:(s + 1) * w + 1], device=logp.device)
                    n = len(targets)
                    r.logprobs.append(logp[b, :n].gather(-1, targets[:, None])[:, 0].cpu().numpy())
                    r.backbone_logprobs.append(base[b, :n].gather(-1, targets[:, None])[:, 0].cpu().numpy())
                    if r.fill is not None:
                        self._fill(r.fill, out, b, segments[b])

    # ---- public API -----------------------------------------------------------------------------
    def score_batch(self, docs: list[list[int]], memory_ids: list[str | None] | None = None,
                    use_memory: bool = True, append: bool = False, progress: bool = False) -> list[ScoreResult]:
        """Scores several documents together, each with its own memory (batch rows never mix)."""
        memory_ids = memory_ids or [None] * len(docs)
        for m in memory_ids:
            if m is not None:
                self.bank.get(m)
        needs_scratch = [use_memory and not (append and m is not None) for m in memory_ids]
        scratches = []
        try:
            for needed in needs_scratch:
                scratches.append(self.create_memory(f"scratch-{uuid.uuid4().hex}") if needed else None)
            rows = []
            for ids, m, scratch in zip(docs, memory_ids, scratches):
                search = [x for x in (m, scratch) if x is not None] if use_memory else []
                fill = scratch if scratch is not None else (m if use_memory and append else None)
                rows.append(_Row(ids, search, fill))
            self._read(rows, progress)
        finally:
            for scratch in scratches:
                if scratch is not None:
                    self.bank.delete(scratch)
        return [ScoreResult(r.ids, np.concatenate(r.logprobs)[:len(r.ids) - 1],
                            np.concatenate(r.backbone_logprobs)[:len(r.ids) - 1]) for r in rows]

    def score(self, text: str | None = None, memory_id: str | None = None, *, token_ids: list[int] | None = None,
              use_memory: bool = True, append: bool = False, progress: bool = False) -> ScoreResult:
        return self.score_batch([self._ids(text, token_ids)], [memory_id], use_memory, append, progress)[0]

    @torch.no_grad()
    def append(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None,
               progress: bool = False) -> int:
        """Encodes a text with the frozen backbone and appends it to a memory. Returns its token count."""
        ids = self._ids(text, token_ids)
        memory = self.bank.get(memory_id)
        w, batch = self.config.read.segment_tokens, self.config.read.batch_segments
        segments = [ids[i:i + w] for i in range(0, len(ids), w)]
        for start in tqdm(range(0, len(segments), batch), desc="appending", unit="batch", disable=not progress):
            group = segments[start:start + batch]
            out, _ = self.backbone.encode(self._pad(group))
            for b, seg in enumerate(group):
                self._fill(memory.memory_id, out, b, seg)
        return len(ids)

    def score_choices(self, prefix: str, choices: list[str], memory_id: str | None = None,
                      use_memory: bool = True) -> list[tuple[float, int]]:
        """(sum of log-probabilities, token count) of each choice as the continuation of prefix."""
        if not choices:
            raise ValueError("choices must not be empty")
        prefix_ids = self._ids(prefix, None)
        choice_ids = [self._ids(c, None) for c in choices]
        results = self.score_batch([prefix_ids + c for c in choice_ids], [memory_id] * len(choices),
                                   use_memory=use_memory, append=False)
        out = []
        for c, r in zip(choice_ids, results):
            out.append((float(r.logprobs[-len(c):].sum()), len(c)))
        return out

    @torch.no_grad()
    def generate(self, prompt: str | None = None, memory_id: str | None = None, *, token_ids: list[int] | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 seed: int | None = None, use_memory: bool = True) -> Iterator[int]:
        """Yields new token ids one by one. The memory is not modified: the prompt's earlier segments,
        and segments completed while generating, go to a scratch memory searched with it."""
        from transformers import DynamicCache

        ids = self._ids(prompt, token_ids)
        if memory_id is not None:
            self.bank.get(memory_id)
        max_new = self.config.read.max_new_tokens if max_new_tokens is None else max_new_tokens
        w = self.config.read.segment_tokens
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        eos = self.tokenizer.eos_token_id
        with self._scratch(use_memory) as scratch:
            search = [[x for x in (memory_id, scratch) if x is not None]] if use_memory else [[]]
            split = (len(ids) - 1) // w * w  # the last, partial segment is read with caches
            if split and scratch is not None:
                row = _Row(ids[:split], search[0], scratch)
                self._read([row])
            retriever = self._retriever(search)
            segment: list[int] = []
            seg_keys: list[torch.Tensor] = []
            seg_values: list[torch.Tensor] = []
            bb_cache, side_cache = DynamicCache(config=self.backbone.model.config), self.sidenet.new_cache()
            pending = ids[split:]
            for _ in range(max_new):
                x = torch.tensor([pending], device=self.backbone.device)
                out, bb_cache = self.backbone.encode(x, past_key_values=bb_cache)
                rope = self.backbone.rotary(out.hidden[0], self._positions(1, len(pending), len(segment)))
                state = self.sidenet(out.hidden, rope, retriever, side_cache)
                segment += pending
                seg_keys.append(out.mem_keys)
                seg_values.append(out.mem_values)
                logits = self.backbone.lm_head(state[0, -1]).float()
                token = self._sample(logits, temperature, top_k, generator)
                yield token
                if token == eos:
                    return
                if len(segment) == w:
                    if scratch is not None:
                        full = BackboneOutput(hidden=None, mem_keys=torch.cat(seg_keys, 1),
                                              mem_values=torch.cat(seg_values, 1), last=None)
                        self._fill(scratch, full, 0, segment)
                    segment, seg_keys, seg_values = [], [], []
                    bb_cache, side_cache = DynamicCache(config=self.backbone.model.config), self.sidenet.new_cache()
                pending = [token]

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))

    @torch.no_grad()
    def retrieve(self, memory_id: str, text: str | None = None, *, token_ids: list[int] | None = None,
                 max_spans: int | None = None) -> list[Span]:
        """The memory spans the SideNet's memory block retrieves while reading `text` (its last W
        tokens), most retrieved first; adjacent retrieved chunks are merged into one span."""
        ids = self._ids(text, token_ids)[-self.config.read.segment_tokens:]
        self.bank.get(memory_id)
        recorded: list[ChunkHits] = []
        k_chunks = self.config.memory.topk_tokens // self.config.memory.chunk_size

        def recording(queries: torch.Tensor):
            rows = self.bank.search([[memory_id]], queries, k_chunks)
            recorded.extend(rows)
            return hits_to_retrieved(rows, queries.dtype, queries.device)

        input_ids = self._pad([ids])
        out, _ = self.backbone.encode(input_ids)
        rope = self.backbone.rotary(out.hidden[0], self._positions(*input_ids.shape))
        self.sidenet(out.hidden, rope, recording)
        return spans_from_hits(recorded[0], self.decode, max_spans or self.config.read.max_retrieve_spans)


def spans_from_hits(hits: ChunkHits, decode, max_spans: int) -> list[Span]:
    """Aggregates chunk hits over query tokens and heads into ranked spans of source text."""
    valid = hits.seqs >= 0
    seqs = hits.seqs[valid]
    if not len(seqs):
        return []
    uniq, first, counts = np.unique(seqs, return_index=True, return_counts=True)
    positions = hits.positions[valid][first]
    tokens = hits.token_ids[valid][first]
    best = np.full(len(uniq), -np.inf, np.float32)
    np.maximum.at(best, np.searchsorted(uniq, seqs), hits.scores[valid])
    chunk = tokens.shape[1]
    spans: list[Span] = []
    for i in np.argsort(positions, kind="stable"):
        pos = int(positions[i])
        if spans and spans[-1].end_position == pos:
            last = spans[-1]
            last.end_position = pos + chunk
            last.token_ids += tokens[i].tolist()
            last.hits += int(counts[i])
            last.score = max(last.score, float(best[i]))
        else:
            spans.append(Span(pos, pos + chunk, tokens[i].tolist(), "", float(best[i]), int(counts[i])))
    spans.sort(key=lambda s: (-s.hits, -s.score))
    spans = spans[:max_spans]
    for s in spans:
        s.text = decode(s.token_ids)
    return spans
