"""The reader: a Serve deployment running the SideNet (the core's Reader role)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from ray import serve

from longmem.backbone import Backbone, BackboneOutput
from longmem.config import LongMemConfig
from longmem.reader import LocalReader, build_sidenet
from longmem.roles import SegmentScores, Span
from longmem.v1 import internal_pb2 as ipb
from longmem.v1 import longmem_pb2 as pb

from .bank import RemoteBank
from .messages import (encoded_from_proto, scores_from_proto, scores_to_proto, segments_from_proto, segments_to_proto,
                       spans_from_proto, spans_to_proto)
from .metrics import metrics
from .remote import configure_batching, raise_if_error, result, row_starts, set_replica_threads


@serve.deployment
class ReaderDeployment:
    """Concurrent reads are batched (@serve.batch): one SideNet pass over all their rows."""

    def __init__(self, config: dict):
        cfg = LongMemConfig.from_dict(config)
        set_replica_threads(cfg.serve.replica_torch_threads)
        backbone = Backbone(cfg.backbone)  # its LM head, positions, and the KV-cached path of generation
        bank = RemoteBank(cfg, metrics(tuple(cfg.serve.latency_buckets_s)))  # times each search: component "reader"
        self.reader = LocalReader(backbone, build_sidenet(backbone, cfg), bank, cfg)
        configure_batching(cfg, self._read_batch)

    async def read(self, encoded: ipb.Encoded, req: ipb.ReadRequest) -> ipb.ReadResponse:
        return raise_if_error(await self._read_batch(encoded, req))

    @serve.batch
    async def _read_batch(self, encoded: list[ipb.Encoded], requests: list[ipb.ReadRequest]) -> list:
        """Scores every request's rows in one pass (no memory changes, so a failed batch is re-run
        request by request to isolate the failure), then fills each request's memories."""
        outs = [encoded_from_proto(e) for e in encoded]
        targets = [segments_from_proto(r.targets) for r in requests]
        search = [[list(s.memory_ids) for s in r.search] for r in requests]
        backbone = [list(r.backbone) for r in requests]
        try:
            rows = await asyncio.to_thread(self.reader.score, BackboneOutput.concat(outs),
                                           [s for ss in search for s in ss], [t for ts in targets for t in ts],
                                           [b for bs in backbone for b in bs])
            scores = [rows[start:start + len(ts)] for start, ts in zip(row_starts(targets), targets)]
        except Exception:
            if len(requests) == 1:
                raise
            scores = [await self._score_alone(o, s, t, b) for o, s, t, b in zip(outs, search, targets, backbone)]
        results = []
        for out, req, rows in zip(outs, requests, scores):
            if isinstance(rows, Exception):
                results.append(rows)
                continue
            try:
                await asyncio.to_thread(self.reader.fill, out, segments_from_proto(req.segments),
                                        [f or None for f in req.fill])
                results.append(scores_to_proto(rows))
            except Exception as e:
                results.append(e)
        return results

    async def _score_alone(self, out: BackboneOutput, search: list[list[str]], targets: list[list[int]],
                           backbone: list[bool]):
        try:
            return await asyncio.to_thread(self.reader.score, out, search, targets, backbone)
        except Exception as e:
            return e

    def generate(self, req: ipb.ReadGenerateRequest) -> Iterator[int]:
        yield from self.reader.generate(list(req.token_ids), req.memory_id or None, req.max_new_tokens,
                                        req.temperature, req.top_k, req.seed, req.use_memory,
                                        list(req.prefix_token_ids))

    def retrieve(self, req: ipb.ReadRetrieveRequest) -> pb.RetrieveResponse:
        return spans_to_proto(self.reader.retrieve(req.memory_id, list(req.token_ids), req.max_spans))

    def reread(self, req: ipb.ReadRetrieveRequest) -> pb.RetrieveResponse:
        """The spans to re-read before req.token_ids (in the response's `reread`; max_spans unused)."""
        return spans_to_proto([], self.reader.reread(req.memory_id, list(req.token_ids)))


class RemoteReader:
    """The Reader role over the deployment."""

    def __init__(self, handle):
        self.handle = handle

    def read(self, encoded, segments, search, fill, targets, backbone) -> list[SegmentScores]:
        req = ipb.ReadRequest(segments=segments_to_proto(segments),
                              search=[ipb.SearchList(memory_ids=s) for s in search],
                              fill=[f or "" for f in fill], targets=segments_to_proto(targets), backbone=backbone)
        return scores_from_proto(result(self.handle.read.remote(encoded, req)))

    def generate(self, ids, memory_id, max_new_tokens, temperature, top_k, seed, use_memory, prefix) -> Iterator[int]:
        req = ipb.ReadGenerateRequest(token_ids=ids, memory_id=memory_id or "", max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, seed=seed, use_memory=use_memory,
                                      prefix_token_ids=prefix)
        yield from self.handle.options(stream=True).generate.remote(req)

    def retrieve(self, memory_id: str, ids: list[int], max_spans: int) -> list[Span]:
        req = ipb.ReadRetrieveRequest(memory_id=memory_id, token_ids=ids, max_spans=max_spans)
        return spans_from_proto(result(self.handle.retrieve.remote(req)).spans)

    def reread(self, memory_id: str, ids: list[int]) -> list[Span]:
        req = ipb.ReadRetrieveRequest(memory_id=memory_id, token_ids=ids)
        return spans_from_proto(result(self.handle.reread.remote(req)).reread)
