"""The reader role in process: the SideNet with its retrieval, reading encoded segments against
memories, generating and showing what a text retrieves."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import numpy as np
import torch

from .backbone import Backbone, BackboneOutput
from .checkpoint import load_weights, read_meta, resolve_checkpoint
from .config import LongMemConfig
from .memory import ChunkHits, LexicalHits, Retrieved, StoredTokens, hits_to_retrieved
from .roles import (Bank, SegmentScores, Span, fill_memory, last_window_start, pad_segments, segments,
                    scratch_memory, separator_ids)
from .sidenet import FrozenInputs, Retriever, SideNet


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

    @torch.no_grad()
    def generate(self, ids: list[int], memory_id: str | None, max_new_tokens: int, temperature: float,
                 top_k: int, seed: int, use_memory: bool, prefix: list[int] = ()) -> Iterator[int]:
        """Yields new token ids. The memory is not modified: the prompt's earlier segments, and segments
        completed while generating, go to a scratch memory searched together with it. `prefix` (re-read
        tokens, `reread_prefix`) opens the window before the prompt's last W - len(prefix) tokens."""
        from transformers import DynamicCache

        w, sink = self.config.read.segment_tokens, self.config.memory.sink_tokens
        generator = torch.Generator().manual_seed(seed)
        eos = self.backbone.tokenizer.eos_token_id
        new_cache = lambda: (DynamicCache(config=self.backbone.model.config), self.sidenet.new_cache())
        total = len(prefix) + len(ids) + max_new_tokens
        with scratch_memory(self.bank, self.config, total) if use_memory and total > w else nullcontext() as scratch:
            search = [[x for x in (memory_id, scratch) if x is not None]] if use_memory else [[]]
            retrieval = self.retrieval(search)
            split = last_window_start(len(ids), w, len(prefix))  # the prompt before its last window
            if scratch is not None:
                for seg in segments(ids[:split], w):
                    out, _ = self.backbone.encode(pad_segments([seg], self.backbone.device))
                    fill_memory(self.bank, scratch, out, 0, seg, sink)  # only its keys/values are needed
            segment, keys, values = [], [], []
            bb_cache, side_cache = new_cache()
            pending = list(prefix) + ids[split:]
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

    @torch.no_grad()
    def reread(self, memory_id: str, ids: list[int]) -> list[Span]:
        """The spans to re-read before answering `ids` (its last read.reread_query_tokens). Each chunk of the memory scores
        by what the memory block's queries retrieve near it (hits within read.reread_widen_tokens) mixed
        with how well the stored token ids there match the prompt's (BM25 over chunks, weight
        read.reread_lexical_weight); the best chunks, at least a span apart, are the centres of up to
        read.reread_spans spans of read.reread_span_tokens (within read.reread_budget, separators
        included), filled with the token ids the memory holds (`spans_around`)."""
        r, c, tokenizer = self.config.read, self.config.memory.chunk_size, self.backbone.tokenizer
        sep = len(separator_ids(tokenizer, r.reread_separator))
        count = min(r.reread_spans, r.reread_budget // (c + sep))
        if not count:
            return []
        most = (min(r.reread_span_tokens, r.reread_budget // count) - sep) // c  # chunks per span
        ids = ids[-r.reread_query_tokens:]
        recorded: list[ChunkHits] = []
        out, _ = self.backbone.encode(pad_segments([ids], self.backbone.device))
        self.read_state(out, self.retrieval([[memory_id]], recorded))
        valid = recorded[0].seqs >= 0
        dense = np.unique(recorded[0].seqs[valid], return_counts=True)  # (seqs, hits) of every retrieved chunk
        lexical = (self.bank.lexical(memory_id, np.asarray(ids), r.reread_lexical_chunks, r.reread_lexical_k1)
                   if r.reread_lexical_weight > 0 else LexicalHits(np.zeros(0, np.int64), np.zeros(0, np.float32)))
        centers = rank_centers(dense, (lexical.seqs, lexical.scores), r.reread_lexical_weight,
                               math.ceil(r.reread_widen_tokens / c), most, count, r.reread_min_score_ratio)
        return spans_around(centers, dense, lambda seqs: self.bank.stored(memory_id, seqs), most, tokenizer.decode)


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
            last.end_position, last.last_seq = end, int(uniq[i])
            last.token_ids += tokens[i].tolist()
            last.hits += int(counts[i])
            last.score = max(last.score, float(best[i]))
        else:
            spans.append(Span(start, end, tokens[i].tolist(), "", float(best[i]), int(counts[i]), int(uniq[i]), int(uniq[i])))
    spans.sort(key=lambda s: (-s.hits, -s.score))
    spans = spans[:max_spans]
    for s in spans:
        s.text = decode(s.token_ids)
    return spans


def rank_centers(dense: tuple[np.ndarray, np.ndarray], lexical: tuple[np.ndarray, np.ndarray], weight: float,
                 radius: int, spacing: int, count: int, min_ratio: float = 0.0) -> list[tuple[int, float]]:
    """The best `count` chunks to centre re-read spans on, at least `spacing` seqs apart, best first, as
    (seq, score), each scoring at least `min_ratio` times the best. dense and lexical: (seqs, values) of
    chunks; a chunk's score is (1 - weight) times its dense values summed over the chunks within `radius`
    seqs of it, plus weight times its lexical ones, each over its own maximum."""
    at = np.union1d(dense[0], lexical[0])  # [n] candidate seqs
    if not len(at):
        return []

    def near(seqs: np.ndarray, values: np.ndarray) -> np.ndarray:  # [n]: values within radius of each candidate
        order = np.argsort(seqs)
        total = np.concatenate([[0.0], np.cumsum(values[order], dtype=np.float64)])
        hi = np.searchsorted(seqs[order], at + radius, "right")
        return total[hi] - total[np.searchsorted(seqs[order], at - radius)]

    scores = np.zeros(len(at))
    for w, (seqs, values) in ((1 - weight, dense), (weight, lexical)):
        v = near(seqs, np.asarray(values, np.float64))
        if w and v.max() > 0:
            scores += w * v / v.max()
    chosen: list[tuple[int, float]] = []
    floor = min_ratio * scores.max()
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < floor:
            break
        if all(abs(int(at[i]) - c) >= spacing for c, _ in chosen):
            chosen.append((int(at[i]), float(scores[i])))
            if len(chosen) == count:
                break
    return chosen


def spans_around(centers: list[tuple[int, float]], dense: tuple[np.ndarray, np.ndarray],
                 stored: Callable[[np.ndarray], StoredTokens], most: int, decode) -> list[Span]:
    """Re-read spans of `most` chunks around each centre (seq, score), with the token ids the memory holds
    there (`stored` answers for the chunks it still holds); spans that overlap or touch merge. In stream
    order; a span's score is its best centre's, its hits the dense hits (seqs, counts) inside it."""
    if not centers or most <= 0:
        return []
    ranges = [np.arange(max(0, seq - (most - 1) // 2), seq + most // 2 + 1) for seq, _ in centers]
    held = stored(np.concatenate(ranges))
    spans: list[Span] = []
    for seq, ids, positions in zip(held.seqs.tolist(), held.token_ids, held.positions):
        if spans and spans[-1].last_seq == seq - 1:
            spans[-1].last_seq, spans[-1].end_position = seq, int(positions[-1]) + 1
            spans[-1].token_ids += ids.tolist()
        else:
            spans.append(Span(int(positions[0]), int(positions[-1]) + 1, ids.tolist(), "", float("-inf"), 0, seq, seq))
    for s in spans:
        s.score = max((score for seq, score in centers if s.first_seq <= seq <= s.last_seq), default=float("-inf"))
        inside = (dense[0] >= s.first_seq) & (dense[0] <= s.last_seq)
        s.hits = int(dense[1][inside].sum())
        s.text = decode(s.token_ids)
    return spans


def build_sidenet(backbone: Backbone, config: LongMemConfig) -> SideNet:
    """The SideNet for this backbone: a trained checkpoint when the config names one (its own
    initialisation mode then applies to the parameters it did not train), else the configured init."""
    path = resolve_checkpoint(config)
    meta = read_meta(path) if path else {}
    asked = config.sidenet.memory_read
    memory_read = meta.get("memory_read", "joint") if path else ("joint" if asked == "auto" else asked)
    if asked not in ("auto", memory_read):
        raise ValueError(f"checkpoint {path} reads memory as {memory_read!r}, the config asks for "
                         f"sidenet.memory_read={config.sidenet.memory_read!r}")
    sidenet = SideNet(backbone, meta.get("init", config.sidenet.init), config.sidenet.gate_init,
                      memory_read).to(backbone.device)
    if path:
        load_weights(sidenet, path, meta)
    return sidenet.eval()
