"""The three roles LongMem's work is split into, and what passes between them.

- `Encoder`: the frozen backbone; `encode` a batch of segments, `ingest` segments into a memory
  (longmem/encoder.py in process, services/encoder.py as a Serve deployment);
- `Reader`: the SideNet; `read` encoded segments against memories (then fill a memory), `generate`
  with KV caches, `retrieve` what a text would read (longmem/reader.py; services/reader.py);
- `Bank`: the memories (longmem/memory.py's MemoryBank in process; longmem/striped.py over shard
  actors in services/bank.py).

Also here, shared by every role: how a text is cut into W-token segments and read (`segments`,
`batches`, `windows`, `read_steps`), what re-reading places before a prompt (`reread_prefix`), and how
an encoded segment goes into a memory (`fill_memory`).
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

from .backbone import BackboneOutput
from .config import LongMemConfig
from .memory import NO_SEQ, ChunkHits, LexicalHits, MemoryStats, RecentTokens, StoredTokens, round_up
from .sidenet import FrozenInputs


def memory_capacity(config: LongMemConfig, num_tokens: int) -> int:
    """A memory capacity holding num_tokens, in whole chunks, at most `memory.capacity_tokens`."""
    return min(config.memory.capacity_tokens, round_up(num_tokens, config.memory.chunk_size))


@dataclass
class Span:
    """A stretch of a memory's stream that a text retrieved."""

    start_position: int
    end_position: int  # exclusive
    token_ids: list[int]
    text: str
    score: float  # best inner product of any query with one of its chunks
    hits: int  # (query token, head) pairs that retrieved one of its chunks
    first_seq: int = NO_SEQ  # seqs of its first and last chunk (inclusive); NO_SEQ when not known
    last_seq: int = NO_SEQ


@dataclass
class SegmentScores:
    logprobs: np.ndarray  # [n] log-probabilities of the targets
    backbone_logprobs: np.ndarray  # [n]; [0] when the row did not ask for the backbone alone


class Bank(Protocol):
    def create(self, memory_id: str, capacity_tokens: int | None = None,
               num_shards: int | None = None, temporary: bool = False) -> MemoryStats: ...
    def stats(self, memory_id: str) -> MemoryStats: ...
    def list(self) -> list[MemoryStats]: ...
    def delete(self, memory_id: str) -> None: ...
    def reset(self, memory_id: str) -> MemoryStats: ...
    def append(self, memory_id: str, keys: np.ndarray, values: np.ndarray, token_ids: np.ndarray,
               skip_first: int = 0, request_id: str | None = None) -> MemoryStats: ...
    def search(self, memory_ids: list[list[str]], queries: torch.Tensor, k_chunks: int) -> list[ChunkHits]: ...
    def stored(self, memory_id: str, seqs: np.ndarray) -> StoredTokens: ...
    def lexical(self, memory_id: str, terms: np.ndarray, k: int, k1: float) -> LexicalHits: ...
    def recent(self, memory_id: str, request_id: str | None = None) -> RecentTokens: ...


class Encoder(Protocol):
    def encode(self, segments: list[list[int]]) -> Any: ...  # BackboneOutput, or a handle to one
    def ingest(self, memory_id: str, segments: list[list[int]], request_ids: list[str] | None = None) -> MemoryStats: ...


class Reader(Protocol):
    def read(self, encoded: Any, segments: list[list[int]], search: list[list[str]],
             fill: list[str | None], targets: list[list[int]], backbone: list[bool]) -> list[SegmentScores]: ...
    def generate(self, ids: list[int], memory_id: str | None, max_new_tokens: int, temperature: float,
                 top_k: int, seed: int, use_memory: bool, prefix: list[int]) -> Iterator[int]: ...
    def retrieve(self, memory_id: str, ids: list[int], max_spans: int) -> list[Span]: ...
    def reread(self, memory_id: str, ids: list[int]) -> list[Span]: ...


def segments(ids: list[int], w: int, start: int = 0) -> list[list[int]]:
    """ids[start:] cut into W-token segments, the unit everything reads and stores (the last may be short)."""
    return [ids[s:s + w] for s in range(start, len(ids), w)]


def batches(items: list, size: int) -> list[list]:
    """items in consecutive groups of `size` (one encoder or reader call each)."""
    return [items[a:a + size] for a in range(0, len(items), size)]


@dataclass
class Window:
    """What the reader reads at once: at most W tokens and their next-token targets."""

    ids: list[int]
    targets: list[int]  # ids[1:] and the token after the window, where there is one and it counts
    scored_from: int  # targets before this one are re-read context, not the text's own
    reread: bool  # opens with re-read tokens: not the text's stream, so never put in a memory


def last_window_start(n: int, w: int, prefix: int = 0) -> int:
    """Where the last window of a text of n tokens starts: after its whole W-segments, or with `prefix`
    re-read tokens opening that window, at its last W - prefix tokens."""
    return n - min(n, w - prefix) if prefix else (n - 1) // w * w


def windows(ids: list[int], w: int, prefix: list[int] = ()) -> list[Window]:
    """A text cut into the windows it is read in: W-token segments, the last opened by `prefix`."""
    split = last_window_start(len(ids), w, len(prefix))
    bound = split if prefix else len(ids)
    head = [Window(ids[s:min(s + w, split)], ids[s + 1:min(s + w + 1, bound)], 0, False) for s in range(0, split, w)]
    last = list(prefix) + ids[split:]
    return head + [Window(last, last[1:], len(prefix) - (1 if prefix and split else 0), bool(prefix))]


def read_steps(docs: list[list[Window]], batch: int) -> Iterator[tuple[list[int], list[Window]]]:
    """The loop of reading: documents read together, window s of every one before window s + 1 of any
    (a window reads the memory its predecessors filled), `batch` rows per step. Yields (the rows'
    document indices, their windows)."""
    for s in range(max(map(len, docs))):
        for rows in batches([i for i, d in enumerate(docs) if s < len(d)], batch):
            yield rows, [docs[i][s] for i in rows]


def separator_ids(tokenizer, separator: str) -> list[int]:
    return tokenizer.encode(separator, add_special_tokens=False)


def reread_prefix(spans: list[Span], separator: list[int]) -> list[int]:
    """What re-reading places before the prompt: each span's tokens, in the order given, then the separator."""
    return [t for s in spans for t in s.token_ids + separator]


def pad_segments(segments: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Right-pads token id lists into a [B, T] batch (causal attention never sees the padding)."""
    width = max(map(len, segments))
    batch = torch.zeros(len(segments), width, dtype=torch.long)
    for b, seg in enumerate(segments):
        batch[b, :len(seg)] = torch.tensor(seg)
    return batch.to(device)


def fill_memory(bank: Bank, memory_id: str, out: BackboneOutput | FrozenInputs, row: int, ids: list[int],
                sink_tokens: int, request_id: str | None = None) -> MemoryStats:
    """Appends one encoded segment (row `row` of a batch, its first len(ids) tokens) to a memory; with a
    request id, at most once."""
    n = len(ids)
    return bank.append(memory_id, out.mem_keys[row, :n].float().cpu().numpy(),
                       out.mem_values[row, :n].float().cpu().numpy(), np.asarray(ids, np.int32),
                       skip_first=sink_tokens, request_id=request_id)


def append_ids(request_id: str | None, first: int, count: int) -> list[str] | None:
    """The request ids of segments first.. of an append with this request id: one per segment, since
    each segment is one append to the bank (None without a request id)."""
    return None if request_id is None else [f"{request_id}:{first + i}" for i in range(count)]


@contextmanager
def scratch_memory(bank: Bank, config: LongMemConfig, num_tokens: int) -> Iterator[str]:
    """A temporary memory for a call's own tokens (its earlier segments, re-read spans), sized to hold
    all of them if it can, deleted when the call ends; a remote bank also deletes it should the caller's
    process die first."""
    memory_id = f"scratch-{uuid.uuid4().hex}"
    bank.create(memory_id, memory_capacity(config, num_tokens), temporary=True)
    try:
        yield memory_id
    finally:
        bank.delete(memory_id)
