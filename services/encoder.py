"""The encoder: a Serve deployment running the frozen backbone (the core's Encoder role)."""

from __future__ import annotations

from ray import serve

from longmem.backbone import Backbone
from longmem.config import LongMemConfig
from longmem.memory import MemoryStats
from longmem.model import LocalEncoder
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb

from .bank import RemoteBank, get_bank
from .messages import encoded_to_proto, segments_from_proto, segments_to_proto, stats_from_proto, stats_to_proto
from .remote import result, set_replica_threads


@serve.deployment
class EncoderDeployment:
    def __init__(self, config: dict):
        cfg = LongMemConfig.from_dict(config)
        set_replica_threads(cfg.serve.replica_torch_threads)
        self.backbone = Backbone(cfg.backbone)
        self.encoder = LocalEncoder(self.backbone, RemoteBank(get_bank(cfg)), cfg)

    def encode(self, req: ipb.EncodeRequest) -> ipb.Encoded:
        return encoded_to_proto(self.encoder.encode(segments_from_proto(req.segments)))

    def ingest(self, req: ipb.IngestRequest) -> pb.MemoryInfo:
        return stats_to_proto(self.encoder.ingest(req.memory_id, segments_from_proto(req.segments)))


class RemoteEncoder:
    """The Encoder role over the deployment. `encode` returns the pending response itself, which the
    reader receives as an argument: hidden states go replica to replica, never through the gateway."""

    def __init__(self, handle):
        self.handle = handle

    def encode(self, segments: list[list[int]]):
        return self.handle.encode.remote(ipb.EncodeRequest(segments=segments_to_proto(segments)))

    def ingest(self, memory_id: str, segments: list[list[int]]) -> MemoryStats:
        req = ipb.IngestRequest(memory_id=memory_id, segments=segments_to_proto(segments))
        return stats_from_proto(result(self.handle.ingest.remote(req)))
