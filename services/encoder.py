"""The encoder: a Serve deployment running the frozen backbone (the core's Encoder role)."""

from __future__ import annotations

import asyncio

from ray import serve

from longmem.backbone import Backbone
from longmem.config import LongMemConfig
from longmem.memory import MemoryStats
from longmem.encoder import LocalEncoder
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb

from .bank import RemoteBank
from .messages import encoded_to_proto, segments_from_proto, segments_to_proto, stats_from_proto, stats_to_proto
from .remote import configure_batching, raise_if_error, result, row_starts, set_replica_threads


@serve.deployment
class EncoderDeployment:
    """Concurrent requests are batched (@serve.batch): one padded backbone pass for all their segments."""

    def __init__(self, config: dict):
        cfg = LongMemConfig.from_dict(config)
        set_replica_threads(cfg.serve.replica_torch_threads)
        self.backbone = Backbone(cfg.backbone)
        self.encoder = LocalEncoder(self.backbone, RemoteBank(cfg), cfg)
        configure_batching(cfg, self._encode_batch, self._ingest_batch)

    async def encode(self, req: ipb.EncodeRequest) -> ipb.Encoded:
        return raise_if_error(await self._encode_batch(segments_from_proto(req.segments)))

    async def ingest(self, req: ipb.IngestRequest) -> pb.MemoryInfo:
        return raise_if_error(await self._ingest_batch(req.memory_id, segments_from_proto(req.segments),
                                                       list(req.append_ids) or None))

    @serve.batch
    async def _encode_batch(self, requests: list[list[list[int]]]) -> list[ipb.Encoded]:
        out = await asyncio.to_thread(self.encoder.encode, [seg for segs in requests for seg in segs])
        return [encoded_to_proto(out.rows(start, start + len(segs), max(map(len, segs))))
                for start, segs in zip(row_starts(requests), requests)]

    @serve.batch
    async def _ingest_batch(self, memory_ids: list[str], requests: list[list[list[int]]],
                            request_ids: list[list[str] | None]) -> list:
        """One pass up to the memory layer for every request's segments; then each request's memory
        gets its own rows, an error (e.g. a memory deleted meanwhile) failing only that request."""
        out = await asyncio.to_thread(self.encoder.encode_memory, [seg for segs in requests for seg in segs])
        results = []
        for memory_id, start, segs, ids in zip(memory_ids, row_starts(requests), requests, request_ids):
            try:
                results.append(stats_to_proto(await asyncio.to_thread(self.encoder.fill, memory_id, out, segs, start,
                                                                      ids)))
            except Exception as e:
                results.append(e)
        return results


class RemoteEncoder:
    """The Encoder role over the deployment. `encode` returns the pending response itself, which the
    reader receives as an argument: hidden states go replica to replica, never through the gateway."""

    def __init__(self, handle):
        self.handle = handle

    def encode(self, segments: list[list[int]]):
        return self.handle.encode.remote(ipb.EncodeRequest(segments=segments_to_proto(segments)))

    def ingest(self, memory_id: str, segments: list[list[int]], request_ids: list[str] | None = None) -> MemoryStats:
        req = ipb.IngestRequest(memory_id=memory_id, segments=segments_to_proto(segments), append_ids=request_ids or [])
        return stats_from_proto(result(self.handle.ingest.remote(req)))
