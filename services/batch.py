"""`longmem batch`: a corpus through Ray Data, on a cluster that grows and shrinks with the work.

    corpus ──read──▶ documents ──skip done──▶ [ingest: encoder actor pool] ──▶ [score: reader actor pool] ──▶ Parquet / JSONL

- ingest: each document goes into its own memory in the bank (the same memories the gRPC API serves,
  named `batch.memory_prefix` + the document id, for `batch.tenant`). The encoder actors run the
  backbone only up to the memory layer.
- score: each document is read segment by segment with LongMem, every segment retrieving from the
  document's own earlier segments (the paper's long-document perplexity); the reader actors hold the
  backbone and the SideNet, so hidden states never leave the actor (a 1,024-token segment's hidden
  states are ~38 MB for SmolLM2), and the memory is an in-process scratch memory.
- both: the two stages stream side by side, each pool scaling on its own between its [min, max].

Every document yields one output row: its id, status ("ok", "invalid": empty, undecodable or too long,
"error": failed while processing) with the reason, token counts, the memory it went into and its
perplexities. A re-run with the same output skips documents already done (status ok or invalid for
the same mode) and retries errors. A bad document never stops the job.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from longmem.backbone import Backbone, model_dims
from longmem.config import BatchConfig, CorpusConfig, LongMemConfig
from longmem.data import NAMED_CORPORA, InvalidRecord, jsonl_documents, named_corpus, record_document
from longmem.memory import MemoryExists, MemoryNotFound
from longmem.encoder import LocalEncoder, ingest_tokens
from longmem.model import LongMem
from longmem.roles import memory_capacity

from .auth import scope
from .bank import RemoteBank, start_bank
from .metrics import metrics
from .remote import set_replica_threads

OK, INVALID, ERROR = "ok", "invalid", "error"
DONE = (OK, INVALID)  # statuses a re-run skips; errors are retried
# Output columns and their values before a stage fills them in.
COLUMNS: dict[str, Any] = {
    "doc_id": "", "source": "", "mode": "", "run_id": "", "status": OK, "error": "", "tokens": -1,
    "memory_id": "", "memory_tokens": -1, "perplexity": math.nan, "backbone_perplexity": math.nan,
    "nll": math.nan, "scored_tokens": -1, "ingest_seconds": math.nan, "score_seconds": math.nan,
}
ID_HASH_CHARS = 8


def _arrow_type(value: Any) -> pa.DataType:
    return pa.string() if isinstance(value, str) else pa.int64() if isinstance(value, int) else pa.float64()


# Read back with this schema: a block with no rows can be written with null-typed columns.
SCHEMA = pa.schema([(name, _arrow_type(value)) for name, value in COLUMNS.items()])


# ---- reading ----------------------------------------------------------------------------------
def _strip_scheme(uri: str) -> str:
    return uri.split("://", 1)[-1] if "://" in uri else os.path.abspath(uri)


def input_format(source: str, cfg: BatchConfig) -> str:
    if cfg.input_format != "auto":
        return cfg.input_format
    name = source.rstrip("/").lower()
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _rows(records: list[dict[str, Any]], source: str) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=["doc_id", "text", "status", "error"])
    df["source"] = source
    return df


def _relative(path: str, root: str) -> str:
    return path[len(root) + 1:] if path.startswith(root + "/") else path


def _decode_files(batch: pd.DataFrame, root: str, source: str) -> pd.DataFrame:
    records = []
    for path, data in zip(batch["path"], batch["bytes"]):
        try:
            records.append((_relative(path, root), data.decode("utf-8"), OK, ""))
        except UnicodeDecodeError as e:
            records.append((_relative(path, root), "", INVALID, f"not UTF-8 text (byte {e.start})"))
    return _rows(records, source)


def _jsonl_records(batch: pd.DataFrame, root: str, source: str, cfg: CorpusConfig) -> pd.DataFrame:
    records = []
    for path, data in zip(batch["path"], batch["bytes"]):
        for doc in jsonl_documents(data, _relative(path, root), cfg):
            records.append((doc.where, "", INVALID, doc.why) if isinstance(doc, InvalidRecord)
                           else (doc.name, doc.text, OK, ""))
    return _rows(records, source)


def _parquet_records(batch: pd.DataFrame, root: str, source: str, cfg: CorpusConfig) -> pd.DataFrame:
    records = []
    for record in batch.to_dict("records"):
        try:
            doc = record_document(record, _relative(record["path"], root), cfg)
            records.append((doc.name, doc.text, OK, ""))
        except InvalidRecord as e:
            records.append((e.where, "", INVALID, e.why))
    return _rows(records, source)


def read_corpus(source: str, config: LongMemConfig) -> ray.data.Dataset:
    """A named corpus (longmem.data), or a directory of text files, JSONL or Parquet (local path or
    any URI pyarrow reads: s3://, gs://, ...) read as config.corpus says, as rows doc_id / source /
    text / status / error. Records are named as `longmem train` and `longmem eval` name them."""
    cfg, corpus = config.batch, config.corpus
    if source in NAMED_CORPORA:
        return ray.data.from_pandas(_rows([(d.name, d.text, OK, "") for d in named_corpus(source)], source))
    fmt, root = input_format(source, cfg), _strip_scheme(source).rstrip("/")
    if fmt == "parquet":
        root = os.path.dirname(root) if root.endswith(".parquet") else root
        ds = ray.data.read_parquet(source, include_paths=True, num_cpus=cfg.io_num_cpus)
        return ds.map_batches(_parquet_records, batch_format="pandas", num_cpus=cfg.io_num_cpus,
                              fn_kwargs={"root": root, "source": source, "cfg": corpus})
    extensions = ["jsonl", "json"] if fmt == "jsonl" else [e.lstrip(".") for e in corpus.text_extensions] or None
    ds = ray.data.read_binary_files(source, include_paths=True, file_extensions=extensions, num_cpus=cfg.io_num_cpus)
    if root.endswith(tuple(extensions or ())):
        root = os.path.dirname(root)
    if fmt == "jsonl":
        return ds.map_batches(_jsonl_records, batch_format="pandas", num_cpus=cfg.io_num_cpus,
                              fn_kwargs={"root": root, "source": source, "cfg": corpus})
    return ds.map_batches(_decode_files, batch_format="pandas", num_cpus=cfg.io_num_cpus,
                          fn_kwargs={"root": root, "source": source})


def _prepare(batch: pd.DataFrame, mode: str, run_id: str, done: frozenset[str]) -> pd.DataFrame:
    batch = batch[~batch["doc_id"].isin(done)].reset_index(drop=True)
    for column, default in COLUMNS.items():
        if column not in batch:
            batch[column] = default
    batch["mode"], batch["run_id"] = mode, run_id
    return batch


# ---- output -----------------------------------------------------------------------------------
def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def read_results(out: str, output_format: str) -> pd.DataFrame:
    """Every row written to `out` so far (all runs), or an empty frame."""
    import pyarrow.dataset as pads

    fs, path = _filesystem(out)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return pd.DataFrame(columns=list(COLUMNS))
    fmt = "parquet" if output_format == "parquet" else "json"
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(f".{fmt}")]
    if not files:
        return pd.DataFrame(columns=list(COLUMNS))
    return pads.dataset(files, schema=SCHEMA, format=fmt, filesystem=fs).to_table().to_pandas()


def done_ids(previous: pd.DataFrame, mode: str) -> frozenset[str]:
    """Documents a run in `mode` can skip: done (ok or invalid) by a run in the same mode or "both"."""
    if previous.empty:
        return frozenset()
    done = previous[previous["status"].isin(DONE) & previous["mode"].isin((mode, "both"))]
    return frozenset(done["doc_id"].astype(str))


# ---- the actor pools --------------------------------------------------------------------------
def memory_id_for(doc_id: str, prefix: str) -> str:
    """A valid memory id for a document: its id with other characters as '_', plus a short hash of
    the id when that changed or shortened it (so distinct documents never share a memory)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{prefix}{doc_id}")
    if not name[0].isalnum():
        name = f"m{name}"
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HASH_CHARS]
    limit = 128 - ID_HASH_CHARS - 1
    if name != f"{prefix}{doc_id}" or len(name) > 128:
        name = f"{name[:limit]}-{digest}"
    return name


class _Stage:
    """Tokenizes and checks each document; a subclass processes the good ones."""

    seconds_column: str

    def __init__(self, config: dict[str, Any]):
        self.config = LongMemConfig.from_dict(config).validate()
        set_replica_threads(self.config.batch.actor_torch_threads)
        self.metrics = metrics(tuple(self.config.serve.latency_buckets_s))

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def process(self, batch: pd.DataFrame, i: int, doc_id: str, ids: list[int]) -> None:
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        limit = self.config.batch.max_doc_tokens
        for i, row in batch.iterrows():
            if row["status"] == INVALID:
                continue
            ids = self.tokenize(row["text"])
            batch.at[i, "tokens"] = len(ids)
            if not ids:
                batch.loc[i, ["status", "error"]] = INVALID, "empty document (no tokens)"
                continue
            if len(ids) > limit:
                batch.loc[i, ["status", "error"]] = INVALID, f"{len(ids):,} tokens; batch.max_doc_tokens is {limit:,}"
                continue
            start = time.perf_counter()
            try:
                self.process(batch, i, row["doc_id"], ids)
            except Exception as e:
                batch.loc[i, ["status", "error"]] = ERROR, f"{type(e).__name__}: {e}"
            batch.at[i, self.seconds_column] = time.perf_counter() - start
        return batch


class IngestStage(_Stage):
    """Encoder actor: the backbone up to the memory layer, appending to the document's memory."""

    seconds_column = "ingest_seconds"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.backbone = Backbone(self.config.backbone)
        self.bank = RemoteBank(self.config)
        self.encoder = LocalEncoder(self.backbone, self.bank, self.config)

    def tokenize(self, text: str) -> list[int]:
        return self.backbone.tokenizer.encode(text, add_special_tokens=False)

    def _fresh_memory(self, memory_id: str, num_tokens: int) -> None:
        """An empty memory sized for the document (or batch.memory_capacity_tokens); a memory left by
        an interrupted earlier run is replaced, so a re-run never appends a document twice."""
        capacity = self.config.batch.memory_capacity_tokens or memory_capacity(self.config, num_tokens)
        try:
            self.bank.create(memory_id, capacity)
        except MemoryExists:
            try:
                self.bank.delete(memory_id)
            except MemoryNotFound:
                pass
            self.bank.create(memory_id, capacity)

    def process(self, batch: pd.DataFrame, i: int, doc_id: str, ids: list[int]) -> None:
        cfg = self.config
        memory_id = memory_id_for(doc_id, cfg.batch.memory_prefix)
        scoped = scope(cfg.batch.tenant, memory_id)
        self._fresh_memory(scoped, len(ids))
        stats = ingest_tokens(self.encoder, scoped, ids, cfg)
        batch.at[i, "memory_id"] = memory_id
        batch.at[i, "memory_tokens"] = stats.tokens_held
        self.metrics.tokens_appended.inc(len(ids), tags={"source": "batch"})


class ScoreStage(_Stage):
    """Reader actor: LongMem reading the document with its own earlier segments in memory."""

    seconds_column = "score_seconds"

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.model = LongMem(self.config)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def process(self, batch: pd.DataFrame, i: int, doc_id: str, ids: list[int]) -> None:
        if len(ids) < 2:
            raise ValueError("a document needs at least 2 tokens to be scored")
        result = self.model.score(token_ids=ids)
        batch.at[i, "perplexity"] = result.perplexity
        batch.at[i, "backbone_perplexity"] = result.backbone_perplexity
        batch.at[i, "nll"] = float(-result.logprobs.sum())
        batch.at[i, "scored_tokens"] = len(result.logprobs)
        self.metrics.tokens_scored.inc(len(ids), tags={"source": "batch"})


# ---- the job ----------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    run_id: str
    out: str
    seconds: float
    documents: int
    ok: int
    invalid: int
    errors: int
    skipped: int  # done by an earlier run
    tokens: int  # of the documents processed ok
    bad: list[tuple[str, str, str]]  # (doc_id, status, error) of invalid and failed documents

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def table(self, max_bad: int = 10) -> str:
        lines = [f"run {self.run_id}: {self.documents} documents in {self.seconds:.1f} s -> {self.out}",
                 f"  ok {self.ok}, invalid {self.invalid}, errors {self.errors}, skipped (done before) {self.skipped}",
                 f"  {self.tokens:,} tokens, {self.tokens_per_second:,.0f} tokens/s"]
        lines += [f"  {status}: {doc_id}: {error}" for doc_id, status, error in self.bad[:max_bad]]
        if len(self.bad) > max_bad:
            lines.append(f"  ... and {len(self.bad) - max_bad} more (see the output)")
        return "\n".join(lines)


def _pool(sizes: list[int]) -> ray.data.ActorPoolStrategy:
    return ray.data.ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])


def run_batch(config: LongMemConfig, source: str, out: str, progress: bool = True) -> BatchSummary:
    """Runs the batch job on the connected Ray cluster (ray.init first) and returns its summary."""
    cfg = config.validate().batch
    ray.data.DataContext.get_current().enable_progress_bars = progress
    previous = read_results(out, cfg.output_format)
    done = done_ids(previous, cfg.mode)
    run_id = uuid.uuid4().hex[:12]
    start = time.perf_counter()
    ds = read_corpus(source, config).map_batches(_prepare, batch_format="pandas", num_cpus=cfg.io_num_cpus,
                                              fn_kwargs={"mode": cfg.mode, "run_id": run_id, "done": done})
    stage_args = {"batch_format": "pandas", "batch_size": cfg.docs_per_call, "num_cpus": cfg.actor_num_cpus,
                  "fn_constructor_kwargs": {"config": config.to_dict()}}
    if cfg.mode in ("ingest", "both"):
        dims = model_dims(config.backbone)
        start_bank(config, dims.num_kv_heads, dims.head_dim)
        ds = ds.map_batches(IngestStage, compute=_pool(cfg.encoder_actors), **stage_args)
    if cfg.mode in ("score", "both"):
        ds = ds.map_batches(ScoreStage, compute=_pool(cfg.reader_actors), **stage_args)
    ds = ds.drop_columns(["text"], num_cpus=cfg.io_num_cpus)
    write_args = {"ray_remote_args": {"num_cpus": cfg.io_num_cpus}}
    if cfg.output_format == "parquet":
        ds.write_parquet(out, **write_args)
    else:
        ds.write_json(out, **write_args)
    seconds = time.perf_counter() - start
    results = read_results(out, cfg.output_format)
    mine = results[results["run_id"] == run_id]
    bad = mine[mine["status"] != OK]
    return BatchSummary(
        run_id=run_id, out=out, seconds=seconds, documents=len(mine), ok=int((mine["status"] == OK).sum()),
        invalid=int((mine["status"] == INVALID).sum()), errors=int((mine["status"] == ERROR).sum()),
        skipped=len(done), tokens=int(mine.loc[mine["status"] == OK, "tokens"].sum()),
        bad=list(zip(bad["doc_id"], bad["status"], bad["error"])))

