"""The gRPC ingress: implements longmem.v1.LongMem on Ray Serve's gRPC proxy.

It authenticates the caller (services/auth.py), scopes memory ids to the caller's tenant, validates
every request, and runs the core's segment loop (`LongMemRunner`) over the remote encoder, reader
and bank. User errors become gRPC status codes with a message naming the field; INTERNAL is left
for real bugs.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from longmem.backbone import model_dims, resolve_backbone_path
from longmem.chat import TURN_REQUEST, Conversation
from longmem.config import LongMemConfig
from longmem.memory import MemoryStats
from longmem.model import LongMemRunner
from longmem.v1 import longmem_pb2 as pb

from .auth import SEPARATOR, Tenants, load_keys, scope, unscope
from .bank import RemoteBank
from .encoder import RemoteEncoder
from .messages import span_to_proto, spans_to_proto, stats_to_proto
from .metrics import metrics
from .reader import RemoteReader
from .outages import infrastructure_status
from .proxy import Undecodable
from .remote import STATUS

log = logging.getLogger("longmem.gateway")

MEMORY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_REQUEST_ID_CHARS = 128


def status_of(error: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS:
        if isinstance(error, kind):
            return code
    return None


def public_message(error: BaseException, tenant: str | None) -> str:
    """The error's message as the caller may see it: their own ids, no tenant prefixes."""
    text = str(error)
    return text.replace(f"{tenant}{SEPARATOR}", "") if tenant else text


def report(grpc_context: RayServegRPCContext, error: BaseException, tenant: str | None, method: str,
           errors) -> bool:
    """Sets the status for a user error or an infrastructure failure (UNAVAILABLE or DEADLINE_EXCEEDED,
    with a retry hint) and returns True; returns False for a real bug (logged). Either way the error
    is counted by method and status code."""
    code, details = status_of(error), None
    if code is not None:
        details = public_message(error, tenant)
    elif (infrastructure := infrastructure_status(error)) is not None:
        code, details = infrastructure
        log.warning("%s: %s (%r)", method, details, error)
    errors.inc(tags={"method": method, "code": (code or grpc.StatusCode.INTERNAL).name})
    if code is None:
        log.exception("%s failed", method)
        return False
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    return True


def unary(response_type):
    """Authenticates, calls method(self, request, tenant) and maps errors to status codes; times the
    request and counts its errors."""
    def wrap(method):
        # Serve passes `grpc_context` only to methods whose own signature names it: no functools.wraps.
        def run(self, request, grpc_context: RayServegRPCContext):
            tenant = None
            with self.metrics.timed(self.metrics.request_seconds, {"method": method.__name__}):
                try:
                    tenant = self.tenants.tenant_of(grpc_context.invocation_metadata())
                    if isinstance(request, Undecodable):
                        raise request.invalid()
                    return method(self, request, tenant)
                except Exception as e:
                    if not report(grpc_context, e, tenant, method.__name__, self.metrics.errors):
                        raise
                    return response_type()
        run.__name__, run.__doc__ = method.__name__, method.__doc__
        return run
    return wrap


def streaming(method):
    """unary's counterpart for a server-streaming method: method(self, request, tenant) is a generator.
    On Serve's gRPC proxy a streaming method's status reaches the client only if it raises after
    set_code (a code set after the last yield, followed by a plain return, arrives as OK)."""
    def run(self, request, grpc_context: RayServegRPCContext):
        tenant = None
        start = time.perf_counter()
        try:
            tenant = self.tenants.tenant_of(grpc_context.invocation_metadata())
            if isinstance(request, Undecodable):
                raise request.invalid()
            yield from method(self, request, tenant)
        except Exception as e:
            report(grpc_context, e, tenant, method.__name__, self.metrics.errors)
            raise
        finally:
            self.metrics.request_seconds.observe(time.perf_counter() - start, tags={"method": method.__name__})
    run.__name__, run.__doc__ = method.__name__, method.__doc__
    return run


def require_memory_id(memory_id: str, field: str = "memory_id") -> str:
    if not memory_id:
        raise ValueError(f"{field} is required")
    if not MEMORY_ID.match(memory_id):
        raise ValueError(f"{field} '{memory_id[:140]}' must be 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return memory_id


@serve.deployment
class Gateway:
    def __init__(self, config: dict, encoder, reader):
        from transformers import AutoTokenizer

        self.config = LongMemConfig.from_dict(config).validate()
        self.tenants = Tenants(load_keys(self.config.serve))
        self.metrics = metrics(tuple(self.config.serve.latency_buckets_s))
        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone_path(self.config.backbone))
        dims = model_dims(self.config.backbone)
        self.runner = LongMemRunner(self.config, RemoteEncoder(encoder), RemoteReader(reader),
                                    RemoteBank(self.config), tokenizer, dims.vocab_size)
        self.conversation = Conversation(self.runner)

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

    @staticmethod
    def _memory(tenant: str, memory_id: str, field: str = "memory_id") -> str:
        return scope(tenant, require_memory_id(memory_id, field))

    def _optional_memory(self, tenant: str, memory_id: str) -> str | None:
        return self._memory(tenant, memory_id) if memory_id else None

    def _info(self, tenant: str, scoped_id: str, stats: MemoryStats | None = None) -> pb.MemoryInfo:
        info = stats_to_proto(stats or self.runner.memory_stats(scoped_id))
        info.memory_id = unscope(tenant, scoped_id)
        return info

    # ---- memories -------------------------------------------------------------------------------
    @unary(pb.MemoryInfo)
    def CreateMemory(self, request: pb.CreateMemoryRequest, tenant: str) -> pb.MemoryInfo:
        memory_id = self._memory(tenant, request.memory_id or uuid.uuid4().hex)
        if request.capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be positive, got {request.capacity_tokens}")
        if request.num_shards < 0:
            raise ValueError(f"num_shards must be positive, got {request.num_shards}")
        self.runner.create_memory(memory_id, request.capacity_tokens or None, request.num_shards or None)
        return self._info(tenant, memory_id)

    @unary(pb.MemoryInfo)
    def GetMemory(self, request: pb.GetMemoryRequest, tenant: str) -> pb.MemoryInfo:
        return self._info(tenant, self._memory(tenant, request.memory_id))

    @unary(pb.ListMemoriesResponse)
    def ListMemories(self, request: pb.ListMemoriesRequest, tenant: str) -> pb.ListMemoriesResponse:
        memories = []
        for stats in self.runner.list_memories():
            own = unscope(tenant, stats.memory_id)
            if own is not None:
                info = stats_to_proto(stats)
                info.memory_id = own
                memories.append(info)
        return pb.ListMemoriesResponse(memories=memories)

    @unary(pb.DeleteMemoryResponse)
    def DeleteMemory(self, request: pb.DeleteMemoryRequest, tenant: str) -> pb.DeleteMemoryResponse:
        self.runner.delete_memory(self._memory(tenant, request.memory_id))
        return pb.DeleteMemoryResponse(memory_id=request.memory_id, deleted=True)

    @unary(pb.MemoryInfo)
    def ResetMemory(self, request: pb.ResetMemoryRequest, tenant: str) -> pb.MemoryInfo:
        memory_id = self._memory(tenant, request.memory_id)
        self.runner.reset_memory(memory_id)
        return self._info(tenant, memory_id)

    # ---- reading --------------------------------------------------------------------------------
    @unary(pb.AppendResponse)
    def Append(self, request: pb.AppendRequest, tenant: str) -> pb.AppendResponse:
        memory_id = self._memory(tenant, request.memory_id)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters")
        if request.request_id.startswith(TURN_REQUEST):
            raise ValueError(f"request_id must not start with {TURN_REQUEST!r}: Chat's turns use it")
        n = self.runner.append(memory_id, token_ids=self._ids(request.text, request.token_ids),
                               request_id=request.request_id or None)
        self.metrics.tokens_appended.inc(n, tags={"source": "grpc"})
        return pb.AppendResponse(memory=self._info(tenant, memory_id), tokens_appended=n)

    @unary(pb.ScoreResponse)
    def Score(self, request: pb.ScoreRequest, tenant: str) -> pb.ScoreResponse:
        memory_id = self._optional_memory(tenant, request.memory_id)
        use_memory = request.use_memory if request.HasField("use_memory") else True
        if request.append and memory_id is None:
            raise ValueError("append=true needs a memory_id")
        ids = self._ids(request.text, request.token_ids)
        if len(ids) < 2:
            raise ValueError("text must have at least 2 tokens to score")
        r = self.runner.score_batch([ids], [memory_id], use_memory, request.append,
                                    backbone_logprobs=not request.skip_backbone_logprobs)[0]
        self.metrics.tokens_scored.inc(len(ids), tags={"source": "grpc"})
        if request.append:
            self.metrics.tokens_appended.inc(len(ids), tags={"source": "grpc"})
        return pb.ScoreResponse(token_ids=ids, logprobs=r.logprobs.tolist(), perplexity=r.perplexity,
                                num_scored_tokens=len(r.logprobs), backbone_logprobs=r.backbone_logprobs.tolist(),
                                backbone_perplexity=r.backbone_perplexity)

    @unary(pb.ScoreChoicesResponse)
    def ScoreChoices(self, request: pb.ScoreChoicesRequest, tenant: str) -> pb.ScoreChoicesResponse:
        memory_id = self._optional_memory(tenant, request.memory_id)
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
        self.metrics.tokens_scored.inc(sum(n for _, n in scored), tags={"source": "grpc"})
        out = [pb.ChoiceScore(choice=c, logprob=lp, num_tokens=n, mean_logprob=lp / n) for c, (lp, n) in zip(choices, scored)]
        best = max(range(len(out)), key=lambda i: out[i].logprob)
        return pb.ScoreChoicesResponse(choices=out, best_index=best)

    def _generation(self, max_new_tokens: int, temperature: float, top_k: int) -> None:
        limit = self.config.serve.max_new_tokens_limit
        if not 0 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be in [0, {limit}], got {max_new_tokens}")
        if temperature < 0 or top_k < 0:
            raise ValueError("temperature and top_k must not be negative")

    @streaming
    def Generate(self, request: pb.GenerateRequest, tenant: str) -> Iterator[pb.GenerateResponse]:
        memory_id = self._optional_memory(tenant, request.memory_id)
        ids = self._ids(request.prompt, None, field="prompt")
        self._generation(request.max_new_tokens, request.temperature, request.top_k)
        use_memory = request.use_memory if request.HasField("use_memory") else True
        reread = self.runner.answer_spans("generate", memory_id, ids, use_memory,
                                          request.reread if request.HasField("reread") else None)
        tokens = self.runner.generate(
            token_ids=ids, memory_id=memory_id, max_new_tokens=request.max_new_tokens or None,
            temperature=request.temperature, top_k=request.top_k,
            seed=request.seed if request.HasField("seed") else None, use_memory=use_memory, reread=reread)
        generated: list[int] = []
        shown = ""
        spans = [span_to_proto(s) for s in reread]  # sent with the first chunk
        for token in tokens:
            generated.append(token)
            text = self.runner.decode(generated)
            yield pb.GenerateResponse(text=text[len(shown):], token_ids=[token], reread=spans)
            shown, spans = text, []
        eos = self.runner.tokenizer.eos_token_id
        yield pb.GenerateResponse(finish_reason="eos" if generated and generated[-1] == eos else "length",
                                  reread=spans)

    @streaming
    def Chat(self, request: pb.ChatRequest, tenant: str) -> Iterator[pb.ChatResponse]:
        # The turn is appended after the reply's last piece was sent: a stream whose cancellation reaches
        # this replica first stops at a yield (the generator is closed there) and appends nothing.
        session = self._memory(tenant, request.session_id, "session_id")
        self._ids(request.message, None, field="message")
        self._generation(request.max_new_tokens, request.temperature, request.top_k)
        if len(request.turn_id) > MAX_REQUEST_ID_CHARS:
            raise ValueError(f"turn_id must be at most {MAX_REQUEST_ID_CHARS} characters")
        turn = self.conversation.turn(
            session, request.message, request.turn_id or None, request.max_new_tokens, request.temperature,
            request.top_k, request.seed if request.HasField("seed") else None,
            request.reread if request.HasField("reread") else None)
        head = pb.ChatResponse(turn_id=turn.turn_id, history_tokens=turn.history_tokens,
                               reread=[span_to_proto(s) for s in turn.reread], replayed=turn.replayed)
        for text, token_ids in turn.pieces:
            chunk = head if head is not None else pb.ChatResponse(replayed=turn.replayed)
            chunk.text, chunk.token_ids[:] = text, token_ids
            head = None
            yield chunk
        last = head if head is not None else pb.ChatResponse(replayed=turn.replayed)
        last.finish_reason, last.saved = turn.finish_reason, turn.saved
        last.turn_token_ids[:] = turn.stored
        if turn.saved and not turn.replayed:
            self.metrics.tokens_appended.inc(len(turn.stored), tags={"source": "grpc"})
        last.memory.CopyFrom(self._info(tenant, session, turn.stats))
        yield last

    @unary(pb.RetrieveResponse)
    def Retrieve(self, request: pb.RetrieveRequest, tenant: str) -> pb.RetrieveResponse:
        memory_id = self._memory(tenant, request.memory_id)
        if request.max_spans < 0:
            raise ValueError(f"max_spans must not be negative, got {request.max_spans}")
        ids = self._ids(request.text, None)
        return spans_to_proto(self.runner.retrieve(memory_id, token_ids=ids, max_spans=request.max_spans or None),
                              self.runner.answer_spans("generate", memory_id, ids, True))
