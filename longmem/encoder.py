"""The encoder role in process: the frozen backbone, encoding segments and ingesting them into memories."""

from __future__ import annotations

from tqdm.auto import tqdm

from .backbone import Backbone, BackboneOutput
from .config import LongMemConfig
from .memory import MemoryStats
from .roles import Bank, Encoder, append_ids, batches, fill_memory, pad_segments, segments


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

    def fill(self, memory_id: str, out: BackboneOutput, segments: list[list[int]], first_row: int = 0,
             request_ids: list[str] | None = None) -> MemoryStats:
        """Appends encoded segments (rows first_row.. of `out`) to a memory, in order; with request ids
        (one per segment), each at most once."""
        stats = None
        for b, seg in enumerate(segments):
            stats = fill_memory(self.bank, memory_id, out, first_row + b, seg, self.config.memory.sink_tokens,
                                request_ids[b] if request_ids else None)
        return stats

    def ingest(self, memory_id: str, segments: list[list[int]], request_ids: list[str] | None = None) -> MemoryStats:
        """Encodes segments up to the memory layer only and appends them to a memory."""
        return self.fill(memory_id, self.encode_memory(segments), segments, 0, request_ids)


def ingest_tokens(encoder: Encoder, memory_id: str, ids: list[int], config: LongMemConfig,
                  progress: bool = False, request_id: str | None = None) -> MemoryStats:
    """Appends a token stream to a memory in segments of W tokens, read.batch_segments per encoder call;
    with a request id, each segment at most once (a retried call adds only what is missing). Returns
    the memory's stats after the last call."""
    stats, done = None, 0
    for group in tqdm(batches(segments(ids, config.read.segment_tokens), config.read.batch_segments),
                      desc="appending", unit="batch", disable=not progress):
        stats = encoder.ingest(memory_id, group, append_ids(request_id, done, len(group)))
        done += len(group)
    return stats
