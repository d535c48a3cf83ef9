"""Conversions between the core's data classes and the protobuf messages the services exchange."""

from __future__ import annotations

from longmem.backbone import BackboneOutput
from longmem.memory import ChunkHits, Chunks, LexicalHits, MemoryStats, StoredTokens
from longmem.roles import SegmentScores, Span
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb
from longmem.wire import from_tensor_proto, tensor_from_proto, to_tensor_proto


def chunks_to_proto(c: Chunks) -> ipb.ChunkBatch:
    return ipb.ChunkBatch(keys=to_tensor_proto(c.keys), values=to_tensor_proto(c.values),
                          token_ids=to_tensor_proto(c.token_ids), positions=to_tensor_proto(c.positions),
                          seqs=to_tensor_proto(c.seqs))


def chunks_from_proto(m: ipb.ChunkBatch) -> Chunks:
    return Chunks(from_tensor_proto(m.keys), from_tensor_proto(m.values), from_tensor_proto(m.token_ids),
                  from_tensor_proto(m.positions), from_tensor_proto(m.seqs))


HIT_FIELDS = {"scores": "scores", "seqs": "seqs", "rows": "rows", "positions": "table_positions",  # proto: ChunkHits
              "token_ids": "table_token_ids", "keys": "table_keys", "values": "table_values"}


def hits_to_proto(h: ChunkHits) -> ipb.Hits:
    return ipb.Hits(**{name: to_tensor_proto(getattr(h, field)) for name, field in HIT_FIELDS.items()})


def hits_from_proto(m: ipb.Hits) -> ChunkHits:
    return ChunkHits(**{field: from_tensor_proto(getattr(m, name)) for name, field in HIT_FIELDS.items()})


def encoded_to_proto(out: BackboneOutput) -> ipb.Encoded:
    return ipb.Encoded(hidden=to_tensor_proto(out.hidden), mem_keys=to_tensor_proto(out.mem_keys),
                       mem_values=to_tensor_proto(out.mem_values), last=to_tensor_proto(out.last))


def encoded_from_proto(m: ipb.Encoded) -> BackboneOutput:
    return BackboneOutput(hidden=tensor_from_proto(m.hidden), mem_keys=tensor_from_proto(m.mem_keys),
                          mem_values=tensor_from_proto(m.mem_values), last=tensor_from_proto(m.last))


def segments_to_proto(segments: list[list[int]]) -> list[ipb.Segment]:
    return [ipb.Segment(token_ids=s) for s in segments]


def segments_from_proto(segments) -> list[list[int]]:
    return [list(s.token_ids) for s in segments]


def scores_to_proto(rows: list[SegmentScores]) -> ipb.ReadResponse:
    return ipb.ReadResponse(rows=[ipb.SegmentScores(logprobs=to_tensor_proto(r.logprobs),
                                                    backbone_logprobs=to_tensor_proto(r.backbone_logprobs))
                                  for r in rows])


def scores_from_proto(m: ipb.ReadResponse) -> list[SegmentScores]:
    return [SegmentScores(from_tensor_proto(r.logprobs), from_tensor_proto(r.backbone_logprobs)) for r in m.rows]


def stats_to_proto(s: MemoryStats) -> pb.MemoryInfo:
    return pb.MemoryInfo(memory_id=s.memory_id, capacity_tokens=s.capacity_tokens, num_shards=s.num_shards,
                         tokens_held=s.tokens_held, tokens_evicted=s.tokens_evicted,
                         tokens_appended=s.tokens_appended, pending_tokens=s.pending_tokens)


def stats_from_proto(m: pb.MemoryInfo) -> MemoryStats:
    return MemoryStats(memory_id=m.memory_id, capacity_tokens=m.capacity_tokens, tokens_held=m.tokens_held,
                       tokens_evicted=m.tokens_evicted, tokens_appended=m.tokens_appended,
                       pending_tokens=m.pending_tokens, num_shards=m.num_shards)


def span_to_proto(s: Span) -> pb.RetrievedSpan:
    return pb.RetrievedSpan(start_position=s.start_position, end_position=s.end_position, text=s.text, score=s.score,
                            hits=s.hits, token_ids=s.token_ids)


def spans_to_proto(spans: list[Span], reread: list[Span] = ()) -> pb.RetrieveResponse:
    return pb.RetrieveResponse(spans=[span_to_proto(s) for s in spans], reread=[span_to_proto(s) for s in reread])


def spans_from_proto(spans) -> list[Span]:
    """RetrievedSpan messages as spans (a RetrieveResponse's `spans` or `reread`)."""
    return [Span(s.start_position, s.end_position, list(s.token_ids), s.text, s.score, s.hits) for s in spans]


def stored_to_proto(t: StoredTokens) -> ipb.StoredTokens:
    return ipb.StoredTokens(seqs=to_tensor_proto(t.seqs), token_ids=to_tensor_proto(t.token_ids),
                            positions=to_tensor_proto(t.positions))


def lexical_to_proto(h: LexicalHits) -> ipb.LexicalHits:
    return ipb.LexicalHits(seqs=to_tensor_proto(h.seqs), scores=to_tensor_proto(h.scores))


def lexical_from_proto(m: ipb.LexicalHits) -> LexicalHits:
    return LexicalHits(from_tensor_proto(m.seqs), from_tensor_proto(m.scores))


def stored_from_proto(m: ipb.StoredTokens) -> StoredTokens:
    return StoredTokens(from_tensor_proto(m.seqs), from_tensor_proto(m.token_ids), from_tensor_proto(m.positions))
