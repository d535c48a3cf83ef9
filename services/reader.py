"""The reader: a Serve deployment running the SideNet (the core's Reader role)."""

from __future__ import annotations

from collections.abc import Iterator

from ray import serve

from longmem.backbone import Backbone
from longmem.config import LongMemConfig
from longmem.model import LocalReader, SegmentScores, Span, build_sidenet
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb

from .bank import RemoteBank, get_bank
from .messages import (encoded_from_proto, scores_from_proto, scores_to_proto, segments_from_proto, segments_to_proto,
                       spans_from_proto, spans_to_proto)
from .remote import result, set_replica_threads


@serve.deployment
class ReaderDeployment:
    def __init__(self, config: dict):
        cfg = LongMemConfig.from_dict(config)
        set_replica_threads(cfg.serve.replica_torch_threads)
        backbone = Backbone(cfg.backbone)  # its LM head, positions, and the KV-cached path of generation
        self.reader = LocalReader(backbone, build_sidenet(backbone, cfg), RemoteBank(get_bank(cfg)), cfg)

    def read(self, encoded: ipb.Encoded, req: ipb.ReadRequest) -> ipb.ReadResponse:
        rows = self.reader.read(encoded_from_proto(encoded), segments_from_proto(req.segments),
                                [list(s.memory_ids) for s in req.search], [f or None for f in req.fill],
                                segments_from_proto(req.targets))
        return scores_to_proto(rows)

    def generate(self, req: ipb.ReadGenerateRequest) -> Iterator[int]:
        yield from self.reader.generate(list(req.token_ids), req.memory_id or None, req.max_new_tokens,
                                        req.temperature, req.top_k, req.seed, req.use_memory)

    def retrieve(self, req: ipb.ReadRetrieveRequest) -> pb.RetrieveResponse:
        return spans_to_proto(self.reader.retrieve(req.memory_id, list(req.token_ids), req.max_spans))


class RemoteReader:
    """The Reader role over the deployment."""

    def __init__(self, handle):
        self.handle = handle

    def read(self, encoded, segments, search, fill, targets) -> list[SegmentScores]:
        req = ipb.ReadRequest(segments=segments_to_proto(segments),
                              search=[ipb.SearchList(memory_ids=s) for s in search],
                              fill=[f or "" for f in fill], targets=segments_to_proto(targets))
        return scores_from_proto(result(self.handle.read.remote(encoded, req)))

    def generate(self, ids, memory_id, max_new_tokens, temperature, top_k, seed, use_memory) -> Iterator[int]:
        req = ipb.ReadGenerateRequest(token_ids=ids, memory_id=memory_id or "", max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, seed=seed, use_memory=use_memory)
        yield from self.handle.options(stream=True).generate.remote(req)

    def retrieve(self, memory_id: str, ids: list[int], max_spans: int) -> list[Span]:
        req = ipb.ReadRetrieveRequest(memory_id=memory_id, token_ids=ids, max_spans=max_spans)
        return spans_from_proto(result(self.handle.retrieve.remote(req)))
