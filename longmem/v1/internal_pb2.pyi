from longmem.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Segment(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchList(_message.Message):
    __slots__ = ("memory_ids",)
    MEMORY_IDS_FIELD_NUMBER: _ClassVar[int]
    memory_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, memory_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("segments",)
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class Encoded(_message.Message):
    __slots__ = ("hidden", "mem_keys", "mem_values", "last")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MEM_KEYS_FIELD_NUMBER: _ClassVar[int]
    MEM_VALUES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    mem_keys: _tensor_pb2.Tensor
    mem_values: _tensor_pb2.Tensor
    last: _tensor_pb2.Tensor
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mem_keys: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mem_values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., last: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("memory_id", "segments", "append_ids")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    APPEND_IDS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    append_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, memory_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., append_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("segments", "search", "fill", "targets", "backbone")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    search: _containers.RepeatedCompositeFieldContainer[SearchList]
    fill: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedCompositeFieldContainer[Segment]
    backbone: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., search: _Optional[_Iterable[_Union[SearchList, _Mapping]]] = ..., fill: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., backbone: _Optional[_Iterable[bool]] = ...) -> None: ...

class SegmentScores(_message.Message):
    __slots__ = ("logprobs", "backbone_logprobs")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _tensor_pb2.Tensor
    backbone_logprobs: _tensor_pb2.Tensor
    def __init__(self, logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., backbone_logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[SegmentScores]
    def __init__(self, rows: _Optional[_Iterable[_Union[SegmentScores, _Mapping]]] = ...) -> None: ...

class ReadGenerateRequest(_message.Message):
    __slots__ = ("token_ids", "memory_id", "max_new_tokens", "temperature", "top_k", "seed", "use_memory", "prefix_token_ids")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    USE_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    memory_id: str
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int
    use_memory: bool
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., memory_id: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., use_memory: _Optional[bool] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadRetrieveRequest(_message.Message):
    __slots__ = ("memory_id", "token_ids", "max_spans")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SPANS_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_spans: int
    def __init__(self, memory_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_spans: _Optional[int] = ...) -> None: ...

class ChunkBatch(_message.Message):
    __slots__ = ("keys", "values", "token_ids", "positions", "seqs")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    keys: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    positions: _tensor_pb2.Tensor
    seqs: _tensor_pb2.Tensor
    def __init__(self, keys: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., positions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seqs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Hits(_message.Message):
    __slots__ = ("scores", "seqs", "positions", "token_ids", "keys", "values", "rows")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    scores: _tensor_pb2.Tensor
    seqs: _tensor_pb2.Tensor
    positions: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    keys: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    rows: _tensor_pb2.Tensor
    def __init__(self, scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seqs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., positions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., keys: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rows: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BankAppendRequest(_message.Message):
    __slots__ = ("memory_id", "keys", "values", "token_ids", "skip_first", "request_id")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIRST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    keys: _tensor_pb2.Tensor
    values: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    skip_first: int
    request_id: str
    def __init__(self, memory_id: _Optional[str] = ..., keys: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., skip_first: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecentRequest(_message.Message):
    __slots__ = ("memory_id", "request_id")
    MEMORY_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    memory_id: str
    request_id: str
    def __init__(self, memory_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecentTokens(_message.Message):
    __slots__ = ("token_ids", "start_position", "request_position", "request_applied")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_POSITION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_APPLIED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _tensor_pb2.Tensor
    start_position: int
    request_position: int
    request_applied: bool
    def __init__(self, token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., start_position: _Optional[int] = ..., request_position: _Optional[int] = ..., request_applied: _Optional[bool] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[SearchList]
    def __init__(self, rows: _Optional[_Iterable[_Union[SearchList, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("store_id", "shards")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, store_id: _Optional[str] = ..., shards: _Optional[_Iterable[str]] = ...) -> None: ...

class RouteList(_message.Message):
    __slots__ = ("routes",)
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RouteList]
    def __init__(self, rows: _Optional[_Iterable[_Union[RouteList, _Mapping]]] = ...) -> None: ...

class ShardCreateRequest(_message.Message):
    __slots__ = ("store_id", "capacity_chunks")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    capacity_chunks: int
    def __init__(self, store_id: _Optional[str] = ..., capacity_chunks: _Optional[int] = ...) -> None: ...

class ShardStoredRequest(_message.Message):
    __slots__ = ("store_id", "seqs")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    seqs: _tensor_pb2.Tensor
    def __init__(self, store_id: _Optional[str] = ..., seqs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class StoredTokens(_message.Message):
    __slots__ = ("seqs", "token_ids", "positions")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    seqs: _tensor_pb2.Tensor
    token_ids: _tensor_pb2.Tensor
    positions: _tensor_pb2.Tensor
    def __init__(self, seqs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., positions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ShardFrequenciesRequest(_message.Message):
    __slots__ = ("store_id", "terms")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    terms: _tensor_pb2.Tensor
    def __init__(self, store_id: _Optional[str] = ..., terms: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class TermFrequencies(_message.Message):
    __slots__ = ("chunks_with_term", "live_chunks")
    CHUNKS_WITH_TERM_FIELD_NUMBER: _ClassVar[int]
    LIVE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks_with_term: _tensor_pb2.Tensor
    live_chunks: int
    def __init__(self, chunks_with_term: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., live_chunks: _Optional[int] = ...) -> None: ...

class ShardLexicalRequest(_message.Message):
    __slots__ = ("store_id", "terms", "k", "k1", "idf")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    K1_FIELD_NUMBER: _ClassVar[int]
    IDF_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    terms: _tensor_pb2.Tensor
    k: int
    k1: float
    idf: _tensor_pb2.Tensor
    def __init__(self, store_id: _Optional[str] = ..., terms: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., k: _Optional[int] = ..., k1: _Optional[float] = ..., idf: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class LexicalHits(_message.Message):
    __slots__ = ("seqs", "scores")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    seqs: _tensor_pb2.Tensor
    scores: _tensor_pb2.Tensor
    def __init__(self, seqs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scores: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ShardAddRequest(_message.Message):
    __slots__ = ("store_id", "chunks", "min_seq")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    chunks: ChunkBatch
    min_seq: int
    def __init__(self, store_id: _Optional[str] = ..., chunks: _Optional[_Union[ChunkBatch, _Mapping]] = ..., min_seq: _Optional[int] = ...) -> None: ...

class ShardSyncRequest(_message.Message):
    __slots__ = ("capacity_chunks",)
    class CapacityChunksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CAPACITY_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    capacity_chunks: _containers.ScalarMap[str, int]
    def __init__(self, capacity_chunks: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ShardSyncResponse(_message.Message):
    __slots__ = ("last_seq",)
    class LastSeqEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: _containers.ScalarMap[str, int]
    def __init__(self, last_seq: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ShardSearchRequest(_message.Message):
    __slots__ = ("store_id", "queries", "k_chunks")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    queries: _tensor_pb2.Tensor
    k_chunks: int
    def __init__(self, store_id: _Optional[str] = ..., queries: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., k_chunks: _Optional[int] = ...) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("name", "node_id", "budget_bytes", "reserved_bytes", "num_stores", "live_chunks", "search_cpu_seconds", "searches")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_STORES_FIELD_NUMBER: _ClassVar[int]
    LIVE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    name: str
    node_id: str
    budget_bytes: int
    reserved_bytes: int
    num_stores: int
    live_chunks: int
    search_cpu_seconds: float
    searches: int
    def __init__(self, name: _Optional[str] = ..., node_id: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., num_stores: _Optional[int] = ..., live_chunks: _Optional[int] = ..., search_cpu_seconds: _Optional[float] = ..., searches: _Optional[int] = ...) -> None: ...
