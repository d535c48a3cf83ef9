"""`longmem batch` on a real local Ray cluster with Ray Data actor pools and the tiny model: good,
empty, undecodable and too-long documents; ingest into the bank, scores equal to the core, re-runs
that skip what is done; text directories, JSONL and Parquet."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import ray
from hypothesis import given
from hypothesis import strategies as st

from conftest import TEXT, tiny_config
from longmem import data
from longmem.data import load_corpus
from longmem.model import LongMem
from services.auth import scope
from services.bank import RemoteBank, stop_bank
from services.batch import INVALID, OK, memory_id_for, read_corpus, read_results, run_batch
from services.gateway import MEMORY_ID

MAX_DOC_TOKENS = 600


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir, tmp_path_factory):
    config = tiny_config(tiny_llama_dir)
    config.serve.storage_uri = str(tmp_path_factory.mktemp("storage"))
    config.serve.num_shards = 2
    config.batch.max_doc_tokens = MAX_DOC_TOKENS
    config.batch.encoder_actors = [1, 2]
    config.batch.reader_actors = [1, 2]
    config.batch.actor_num_cpus = 0.5
    ray.init(address="local", num_cpus=4, namespace=config.serve.namespace)
    try:
        yield config
    finally:
        stop_bank(config)
        ray.shutdown()


def write_corpus(root, good: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 5)
    (root / "huge.txt").write_text(TEXT * 40)
    (root / "notes.bin").write_bytes(b"\x00\x01")  # not a text extension: not read


GOOD = {"a.txt": TEXT * 3, "sub/b.md": TEXT * 6 + "The end.", "c.rst": "Short. " + TEXT}


def test_both_modes_ingest_into_the_bank_and_score_like_the_core(cluster, tmp_path):
    config = cluster
    corpus, out = tmp_path / "corpus", str(tmp_path / "out")
    write_corpus(corpus, GOOD)
    summary = run_batch(config, str(corpus), out, progress=False)
    rows = read_results(out, "parquet").set_index("doc_id")
    assert set(rows.index) == {*GOOD, "empty.txt", "latin1.txt", "huge.txt"}
    assert summary.documents == 6 and summary.ok == 3 and summary.invalid == 3 and summary.errors == 0
    assert "not UTF-8" in rows.loc["latin1.txt", "error"]
    assert "empty" in rows.loc["empty.txt", "error"]
    assert f"batch.max_doc_tokens is {MAX_DOC_TOKENS}" in rows.loc["huge.txt", "error"]
    assert (rows.loc[["empty.txt", "latin1.txt", "huge.txt"], "status"] == INVALID).all()

    model = LongMem(config)
    bank = RemoteBank(config)
    for name, text in GOOD.items():
        row = rows.loc[name]
        ids = model.tokenize(text)
        assert row["status"] == OK and row["tokens"] == len(ids) and row["scored_tokens"] == len(ids) - 1
        want = model.score(token_ids=ids)
        assert row["perplexity"] == pytest.approx(want.perplexity, rel=1e-4)
        assert row["backbone_perplexity"] == pytest.approx(want.backbone_perplexity, rel=1e-4)
        assert row["nll"] == pytest.approx(float(-want.logprobs.sum()), rel=1e-4)
        stats = bank.stats(scope(config.batch.tenant, row["memory_id"]))
        assert stats.tokens_held == row["memory_tokens"] > 0
        assert stats.tokens_held + stats.pending_tokens + stats.tokens_evicted <= len(ids)
    assert summary.tokens == sum(rows.loc[list(GOOD), "tokens"])

    # A re-run skips everything done; a new document is the only one processed.
    again = run_batch(config, str(corpus), out, progress=False)
    assert (again.documents, again.skipped) == (0, 6)
    (corpus / "d.txt").write_text(TEXT * 2)
    third = run_batch(config, str(corpus), out, progress=False)
    assert (third.documents, third.ok, third.skipped) == (1, 1, 6)
    all_rows = read_results(out, "parquet")
    assert len(all_rows) == 7 and all_rows["doc_id"].is_unique


def test_jsonl_and_parquet_inputs_with_bad_records(cluster, tmp_path):
    config = cluster
    config.batch.output_format = "jsonl"
    config.batch.mode = "score"
    try:
        jsonl = tmp_path / "docs.jsonl"
        lines = [json.dumps({"id": "first", "text": TEXT * 2}), "{not json", json.dumps({"title": "no text"}),
                 json.dumps({"text": TEXT})]
        jsonl.write_text("\n".join(lines) + "\n")
        out = str(tmp_path / "out-jsonl")
        summary = run_batch(config, str(jsonl), out, progress=False)
        rows = read_results(out, "jsonl").set_index("doc_id")
        assert (summary.ok, summary.invalid) == (2, 2)
        assert rows.loc["first", "status"] == OK and np.isfinite(rows.loc["first", "perplexity"])
        assert "not a JSON object" in rows.loc["docs.jsonl:2", "error"]
        assert "no string field 'text'" in rows.loc["docs.jsonl:3", "error"]
        assert (rows["mode"] == "score").all() and (rows["memory_id"] == "").all()

        parquet = tmp_path / "docs.parquet"
        pd.DataFrame({"name": ["p1", "p2", "p3"], "text": [TEXT, "", None]}).to_parquet(parquet)
        out = str(tmp_path / "out-parquet")
        summary = run_batch(config, str(parquet), out, progress=False)
        rows = read_results(out, "jsonl").set_index("doc_id")
        assert rows.loc["p1", "status"] == OK
        assert rows.loc["p2", "status"] == INVALID and "empty" in rows.loc["p2", "error"]
        assert [s for s in rows["status"]].count(INVALID) == 2
    finally:
        config.batch.output_format = "parquet"
        config.batch.mode = "both"


def test_batch_names_records_as_training_does(cluster, tmp_path):
    """One corpus reader: `longmem batch` and `longmem train`/`eval` (load_corpus) give a corpus the
    same documents under the same ids, for JSONL and Parquet, with and without id fields."""
    config = cluster
    records = [{"id": "i1", "name": "n1", "text": "first"}, {"name": "n2", "text": "second"},
               {"text": "third, with no id"}, {"id": 4, "text": "fourth"}]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    parquet = tmp_path / "c.parquet"
    pd.DataFrame({"id": ["i1", None, None, "4"], "name": ["n1", "n2", None, None],
                  "text": [r["text"] for r in records]}).to_parquet(parquet)
    for path in (jsonl, parquet):
        rows = read_corpus(str(path), config).to_pandas()
        want = load_corpus(str(path), config.corpus)
        assert sorted(zip(rows["doc_id"], rows["text"])) == sorted((d.name, d.text) for d in want), path
        assert data.text_id("third, with no id") in set(rows["doc_id"])


@given(st.text(min_size=1, max_size=300))
def test_memory_ids_for_documents_are_valid_and_distinct(doc_id):
    memory_id = memory_id_for(doc_id, "doc-")
    assert MEMORY_ID.match(memory_id)
    assert memory_id_for(doc_id + "x", "doc-") != memory_id
    assert memory_id_for(doc_id.replace("/", "_") + "/", "doc-") != memory_id
