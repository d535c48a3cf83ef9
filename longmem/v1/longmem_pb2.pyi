from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemoryInfo(_message.Message):
    __slots__ = ("memory_id", "capacity_tokens", "num_shards", "tokens_held", "tokens_evicted", "tokens_appended", "pending_tokens")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_HELD_FIELD_NUMBER: _ClassVar[int]
    TOKENS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_APPENDED_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    capacity_tokens: int
    num_shards: int
    tokens_held: int
    tokens_evicted: int
    tokens_appended: int
    pending_tokens: int
    def __init__(self, memory_id: _Optional[str] = ..., capacity_tokens: _Optional[int] = ..., num_shards: _Optional[int] = ..., tokens_held: _Optional[int] = ..., tokens_evicted: _Optional[int] = ..., tokens_appended: _Optional[int] = ..., pending_tokens: _Optional[int] = ...) -> None: ...

class CreateMemoryRequest(_message.Message):
    __slots__ = ("memory_id", "capacity_tokens", "num_shards")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    capacity_tokens: int
    num_shards: int
    def __init__(self, memory_id: _Optional[str] = ..., capacity_tokens: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class GetMemoryRequest(_message.Message):
    __slots__ = ("memory_id",)
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    def __init__(self, memory_id: _Optional[str] = ...) -> None: ...

class ListMemoriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMemoriesResponse(_message.Message):
    __slots__ = ("memories",)
    MEMORIES_FIELD_NUMBER: _ClassVar[int]
    memories: _containers.RepeatedCompositeFieldContainer[MemoryInfo]
    def __init__(self, memories: _Optional[_Iterable[_Union[MemoryInfo, _Mapping]]] = ...) -> None: ...

class DeleteMemoryRequest(_message.Message):
    __slots__ = ("memory_id",)
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    def __init__(self, memory_id: _Optional[str] = ...) -> None: ...

class DeleteMemoryResponse(_message.Message):
    __slots__ = ("memory_id", "deleted")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    deleted: bool
    def __init__(self, memory_id: _Optional[str] = ..., deleted: _Optional[bool] = ...) -> None: ...

class ResetMemoryRequest(_message.Message):
    __slots__ = ("memory_id",)
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    def __init__(self, memory_id: _Optional[str] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("memory_id", "text", "token_ids", "request_id")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    def __init__(self, memory_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("memory", "tokens_appended")
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_APPENDED_FIELD_NUMBER: _ClassVar[int]
    memory: MemoryInfo
    tokens_appended: int
    def __init__(self, memory: _Optional[_Union[MemoryInfo, _Mapping]] = ..., tokens_appended: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("memory_id", "text", "token_ids", "use_memory", "append", "skip_backbone_logprobs")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    APPEND_FIELD_NUMBER: _ClassVar[int]
    SKIP_BACKBONE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    use_memory: bool
    append: bool
    skip_backbone_logprobs: bool
    def __init__(self, memory_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., use_memory: _Optional[bool] = ..., append: _Optional[bool] = ..., skip_backbone_logprobs: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "perplexity", "num_scored_tokens", "backbone_logprobs", "backbone_perplexity")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    NUM_SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    perplexity: float
    num_scored_tokens: int
    backbone_logprobs: _containers.RepeatedScalarFieldContainer[float]
    backbone_perplexity: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., perplexity: _Optional[float] = ..., num_scored_tokens: _Optional[int] = ..., backbone_logprobs: _Optional[_Iterable[float]] = ..., backbone_perplexity: _Optional[float] = ...) -> None: ...

class ScoreChoicesRequest(_message.Message):
    __slots__ = ("memory_id", "prefix", "choices", "use_memory")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    prefix: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    use_memory: bool
    def __init__(self, memory_id: _Optional[str] = ..., prefix: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., use_memory: _Optional[bool] = ...) -> None: ...

class ChoiceScore(_message.Message):
    __slots__ = ("choice", "logprob", "num_tokens", "mean_logprob")
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    choice: str
    logprob: float
    num_tokens: int
    mean_logprob: float
    def __init__(self, choice: _Optional[str] = ..., logprob: _Optional[float] = ..., num_tokens: _Optional[int] = ..., mean_logprob: _Optional[float] = ...) -> None: ...

class ScoreChoicesResponse(_message.Message):
    __slots__ = ("choices", "best_index")
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    BEST_INDEX_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[ChoiceScore]
    best_index: int
    def __init__(self, choices: _Optional[_Iterable[_Union[ChoiceScore, _Mapping]]] = ..., best_index: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("memory_id", "prompt", "max_new_tokens", "temperature", "top_k", "seed", "use_memory", "reread")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    USE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    REREAD_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    use_memory: bool
    reread: bool
    def __init__(self, memory_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., use_memory: _Optional[bool] = ..., reread: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "reread")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REREAD_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    reread: _containers.RepeatedCompositeFieldContainer[RetrievedSpan]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., reread: _Optional[_Iterable[_Union[RetrievedSpan, _Mapping]]] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("memory_id", "text", "max_spans")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_SPANS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    text: str
    max_spans: int
    def __init__(self, memory_id: _Optional[str] = ..., text: _Optional[str] = ..., max_spans: _Optional[int] = ...) -> None: ...

class RetrievedSpan(_message.Message):
    __slots__ = ("start_position", "end_position", "text", "score", "hits", "token_ids")
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    END_POSITION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    start_position: int
    end_position: int
    text: str
    score: float
    hits: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, start_position: _Optional[int] = ..., end_position: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., hits: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("spans", "reread")
    SPANS_FIELD_NUMBER: _ClassVar[int]
    REREAD_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[RetrievedSpan]
    reread: _containers.RepeatedCompositeFieldContainer[RetrievedSpan]
    def __init__(self, spans: _Optional[_Iterable[_Union[RetrievedSpan, _Mapping]]] = ..., reread: _Optional[_Iterable[_Union[RetrievedSpan, _Mapping]]] = ...) -> None: ...

class ChatRequest(_message.Message):
    __slots__ = ("session_id", "message", "max_new_tokens", "temperature", "top_k", "seed", "turn_id", "reread")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    REREAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    message: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    turn_id: str
    reread: bool
    def __init__(self, session_id: _Optional[str] = ..., message: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., turn_id: _Optional[str] = ..., reread: _Optional[bool] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("text", "token_ids", "turn_id", "history_tokens", "reread", "replayed", "finish_reason", "saved", "memory", "turn_token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REREAD_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SAVED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    TURN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    turn_id: str
    history_tokens: int
    reread: _containers.RepeatedCompositeFieldContainer[RetrievedSpan]
    replayed: bool
    finish_reason: str
    saved: bool
    memory: MemoryInfo
    turn_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., turn_id: _Optional[str] = ..., history_tokens: _Optional[int] = ..., reread: _Optional[_Iterable[_Union[RetrievedSpan, _Mapping]]] = ..., replayed: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., saved: _Optional[bool] = ..., memory: _Optional[_Union[MemoryInfo, _Mapping]] = ..., turn_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
