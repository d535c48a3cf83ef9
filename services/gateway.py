"""The gRPC ingress: implements longmem.v1.LongMem on Ray Serve's gRPC proxy.

It tokenises, validates every request, and runs the core's segment loop (`LongMemRunner`) over the
remote encoder, reader and bank. User errors become gRPC status codes with a message naming the
field; INTERNAL is left for real bugs.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from longmem.backbone import model_dims, resolve_backbone_path
from longmem.config import LongMemConfig
from longmem.memory import CapacityExceeded, MemoryExists, MemoryNotFound
from longmem.model import LongMemRunner
from longmem.v1 import longmem_pb2 as pb

from .bank import RemoteBank, get_bank
from .encoder import RemoteEncoder
from .messages import spans_to_proto, stats_to_proto
from .reader import RemoteReader

log = logging.getLogger("longmem.gateway")

MEMORY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_PREFIX = "scratch-"

STATUS = ((MemoryNotFound, grpc.StatusCode.NOT_FOUND), (MemoryExists, grpc.StatusCode.ALREADY_EXISTS),
          (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED), (ValueError, grpc.StatusCode.INVALID_ARGUMENT))


def status_of(error: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS:
        if isinstance(error, kind):
            return code
    return None


def unary(response_type):
    """Maps core errors to status codes; the client gets the code, the message and an empty reply."""
    def wrap(method):
        # Serve passes `grpc_context` only to methods whose own signature names it: no functools.wraps.
        def run(self, request, grpc_context: RayServegRPCContext):
            try:
                return method(self, request)
            except Exception as e:
                code = status_of(e)
                if code is None:
                    log.exception("%s failed", method.__name__)
                    raise
                grpc_context.set_code(code)
                grpc_context.set_details(str(e))
                return response_type()
        run.__name__, run.__doc__ = method.__name__, method.__doc__
        return run
    return wrap


def require_memory_id(memory_id: str, field: str = "memory_id") -> str:
    if not memory_id:
        raise ValueError(f"{field} is required")
    if not MEMORY_ID.match(memory_id) or memory_id.startswith(RESERVED_PREFIX):
        raise ValueError(f"{field} '{memory_id[:140]}' must be 1-128 letters, digits, '.', '_' or '-', "
                         f"start with a letter or digit, and not start with '{RESERVED_PREFIX}'")
    return memory_id


@serve.deployment
class Gateway:
    def __init__(self, config: dict, encoder, reader):
        from transformers import AutoTokenizer

        self.config = LongMemConfig.from_dict(config).validate()
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path(self.config.backbone))
        dims = model_dims(self.config.backbone)
        self.runner = LongMemRunner(self.config, RemoteEncoder(encoder), RemoteReader(reader),
                                    RemoteBank(get_bank(self.config)), tokenizer, dims.vocab_size)

    # ---- validation -----------------------------------------------------------------------------
    def _ids(self, text: str, token_ids, field: str = "text") -> list[int]:
        if text and token_ids:
            raise ValueError(f"set either {field} or token_ids, not both")
        if not text and not token_ids:
            raise ValueError(f"{field} (or token_ids) is required")
        if len(text) > self.config.serve.max_text_chars:
            raise ValueError(f"{field} has {len(text):,} characters; the limit is {self.config.serve.max_text_chars:,}")
        try:
            return self.runner.token_ids(text or None, list(token_ids) if token_ids else None)
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None

    def _optional_memory(self, memory_id: str) -> str | None:
        return require_memory_id(memory_id) if memory_id else None

    # ---- memories -------------------------------------------------------------------------------
    @unary(pb.MemoryInfo)
    def CreateMemory(self, request: pb.CreateMemoryRequest) -> pb.MemoryInfo:
        memory_id = require_memory_id(request.memory_id) if request.memory_id else uuid.uuid4().hex
        if request.capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be positive, got {request.capacity_tokens}")
        if request.num_shards < 0:
            raise ValueError(f"num_shards must be positive, got {request.num_shards}")
        self.runner.create_memory(memory_id, request.capacity_tokens or None, request.num_shards or None)
        return stats_to_proto(self.runner.memory_stats(memory_id))

    @unary(pb.MemoryInfo)
    def GetMemory(self, request: pb.GetMemoryRequest) -> pb.MemoryInfo:
        return stats_to_proto(self.runner.memory_stats(require_memory_id(request.memory_id)))

    @unary(pb.ListMemoriesResponse)
    def ListMemories(self, request: pb.ListMemoriesRequest) -> pb.ListMemoriesResponse:
        memories = [m for m in self.runner.list_memories() if not m.memory_id.startswith(RESERVED_PREFIX)]
        return pb.ListMemoriesResponse(memories=[stats_to_proto(m) for m in memories])

    @unary(pb.DeleteMemoryResponse)
    def DeleteMemory(self, request: pb.DeleteMemoryRequest) -> pb.DeleteMemoryResponse:
        self.runner.delete_memory(require_memory_id(request.memory_id))
        return pb.DeleteMemoryResponse(memory_id=request.memory_id, deleted=True)

    @unary(pb.MemoryInfo)
    def ResetMemory(self, request: pb.ResetMemoryRequest) -> pb.MemoryInfo:
        return stats_to_proto(self.runner.reset_memory(require_memory_id(request.memory_id)))

    # ---- reading --------------------------------------------------------------------------------
    @unary(pb.AppendResponse)
    def Append(self, request: pb.AppendRequest) -> pb.AppendResponse:
        memory_id = require_memory_id(request.memory_id)
        n = self.runner.append(memory_id, token_ids=self._ids(request.text, request.token_ids))
        return pb.AppendResponse(memory=stats_to_proto(self.runner.memory_stats(memory_id)), tokens_appended=n)

    @unary(pb.ScoreResponse)
    def Score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        memory_id = self._optional_memory(request.memory_id)
        use_memory = request.use_memory if request.HasField("use_memory") else True
        if request.append and memory_id is None:
            raise ValueError("append=true needs a memory_id")
        ids = self._ids(request.text, request.token_ids)
        if len(ids) < 2:
            raise ValueError("text must have at least 2 tokens to score")
        r = self.runner.score_batch([ids], [memory_id], use_memory, request.append)[0]
        return pb.ScoreResponse(token_ids=ids, logprobs=r.logprobs.tolist(), perplexity=r.perplexity,
                                num_scored_tokens=len(r.logprobs), backbone_logprobs=r.backbone_logprobs.tolist(),
                                backbone_perplexity=r.backbone_perplexity)

    @unary(pb.ScoreChoicesResponse)
    def ScoreChoices(self, request: pb.ScoreChoicesRequest) -> pb.ScoreChoicesResponse:
        memory_id = self._optional_memory(request.memory_id)
        choices = list(request.choices)
        if not choices:
            raise ValueError("choices must not be empty")
        if len(choices) > self.config.serve.max_choices:
            raise ValueError(f"choices has {len(choices)} entries; the limit is {self.config.serve.max_choices}")
        if not request.prefix:
            raise ValueError("prefix is required")
        for i, c in enumerate(choices):
            self._ids(c, None, field=f"choices[{i}]")
        self._ids(request.prefix, None, field="prefix")
        use_memory = request.use_memory if request.HasField("use_memory") else True
        scored = self.runner.score_choices(request.prefix, choices, memory_id, use_memory)
        out = [pb.ChoiceScore(choice=c, logprob=lp, num_tokens=n, mean_logprob=lp / n) for c, (lp, n) in zip(choices, scored)]
        best = max(range(len(out)), key=lambda i: out[i].logprob)
        return pb.ScoreChoicesResponse(choices=out, best_index=best)

    def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> Iterator[pb.GenerateResponse]:
        try:
            memory_id = self._optional_memory(request.memory_id)
            ids = self._ids(request.prompt, None, field="prompt")
            limit = self.config.serve.max_new_tokens_limit
            if not 0 <= request.max_new_tokens <= limit:
                raise ValueError(f"max_new_tokens must be in [0, {limit}], got {request.max_new_tokens}")
            if request.temperature < 0 or request.top_k < 0:
                raise ValueError("temperature and top_k must not be negative")
            tokens = self.runner.generate(
                token_ids=ids, memory_id=memory_id, max_new_tokens=request.max_new_tokens or None,
                temperature=request.temperature, top_k=request.top_k,
                seed=request.seed if request.HasField("seed") else None,
                use_memory=request.use_memory if request.HasField("use_memory") else True)
            generated: list[int] = []
            shown = ""
            for token in tokens:
                generated.append(token)
                text = self.runner.decode(generated)
                yield pb.GenerateResponse(text=text[len(shown):], token_ids=[token])
                shown = text
            eos = self.runner.tokenizer.eos_token_id
            yield pb.GenerateResponse(finish_reason="eos" if generated and generated[-1] == eos else "length")
        except Exception as e:
            code = status_of(e)
            if code is None:
                log.exception("Generate failed")
                raise
            grpc_context.set_code(code)
            grpc_context.set_details(str(e))
            raise

    @unary(pb.RetrieveResponse)
    def Retrieve(self, request: pb.RetrieveRequest) -> pb.RetrieveResponse:
        memory_id = require_memory_id(request.memory_id)
        if request.max_spans < 0:
            raise ValueError(f"max_spans must not be negative, got {request.max_spans}")
        ids = self._ids(request.text, None)
        return spans_to_proto(self.runner.retrieve(memory_id, token_ids=ids, max_spans=request.max_spans or None))
