"""longmem.data: corpus loading, the held-out split, the passkey prompt, the sentiment lexicon.

The Debian corpora's loaders run here on miniatures of their layout; the tests marked `corpora` read
the real packages (python3.11-doc, jargon-text), which `make data` installs: `make test-corpora` runs
them, `make test` does not need them. The lexicon test reads the vaderSentiment wheel."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from longmem import data
from longmem.config import CorpusConfig
from longmem.data import Document

SMOLLM2 = Path("/root/.cache/longmem/models/smollm2-135m-instruct")


# ---- loading from paths ------------------------------------------------------------------------

CORPUS = CorpusConfig()


def test_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "beta text", "id": 7}, {"text": "alpha text", "name": "a"}, {"text": "no name"},
            {"text": "both", "name": "by-name", "id": "by-id"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = data.load_corpus(str(path), CORPUS)
    assert sorted(docs, key=lambda d: d.text) == [
        Document("a", "alpha text"), Document("7", "beta text"), Document("by-id", "both"),
        Document(data.text_id("no name"), "no name")]
    assert [d.name for d in docs] == sorted(d.name for d in docs)


def test_the_id_rule_is_the_config(tmp_path):
    """The first present of corpus.id_fields names a record, else the hash of its text; the text
    comes from corpus.text_field."""
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "the text", "name": "n", "id": "i"}) + "\n", encoding="utf-8")
    cfg = CorpusConfig(text_field="body", id_fields=["name", "id"])
    assert data.load_corpus(str(path), cfg) == [Document("n", "the text")]
    assert data.load_corpus(str(path), CorpusConfig(text_field="body", id_fields=[])) == [
        Document(data.text_id("the text"), "the text")]
    assert data.text_id("the text") == data.text_id("the text") != data.text_id("the text.")


def test_jsonl_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        data.load_corpus(str(path), CORPUS)
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        data.load_corpus(str(path), CORPUS)
    path.write_text('{"text": "one", "id": "x"}\n{"text": "two", "id": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="two documents named 'x'"):
        data.load_corpus(str(path), CORPUS)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["zulu", "yankee", "xray"], "id": ["z", None, "x"],
                             "other": [1, 2, 3]}), path)
    assert sorted(data.load_corpus(str(path), CORPUS), key=lambda d: d.text) == [
        Document("x", "xray"), Document(data.text_id("yankee"), "yankee"), Document("z", "zulu")]
    pq.write_table(pa.table({"body": ["no text column"]}), path)
    with pytest.raises(ValueError, match="no 'text' column"):
        data.load_corpus(str(path), CORPUS)


def test_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "sub" / "a.md").write_text("# a", encoding="utf-8")
    (tmp_path / "c.rst").write_text("see", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert data.load_corpus(str(tmp_path), CORPUS) == [
        Document("b.txt", "bee"), Document("c.rst", "see"), Document("sub/a.md", "# a")]
    assert [d.name for d in data.load_corpus(str(tmp_path), CorpusConfig(text_extensions=[".md"]))] == ["sub/a.md"]


def test_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus 'no-such-corpus'"):
        data.load_corpus("no-such-corpus", CORPUS)
    with pytest.raises(ValueError, match="unknown corpus"):
        data.load_corpus(str(tmp_path / "missing.jsonl"), CORPUS)
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported corpus file"):
        data.load_corpus(str(tmp_path / "c.csv"), CORPUS)


def test_missing_debian_corpus_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PYTHON_DOCS_DIR", tmp_path / "none")
    monkeypatch.setattr(data, "JARGON_FILE", tmp_path / "none.txt.gz")
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        data.named_corpus("python-docs")
    with pytest.raises(FileNotFoundError, match="apt-get install jargon-text"):
        data.named_corpus("jargon")


# ---- the Jargon File parser on a miniature of its layout --------------------------------------

MINI_JARGON = """\
                                The Jargon File

   Table of Contents

   Welcome to the Jargon File

   I. Introduction

   This is the Jargon File, a compendium of hacker slang.

Chapter\u00a01.\u00a0Hacker Slang

   Chapter one prose.

   Part II. The Jargon Lexicon

Glossary

   0

   ABEND

  0

   0

   :0:

   Numeric zero.

  A

   ABEND

   :ABEND: /a'bend/, n.

   [ABnormal END] Abnormal termination.

  *
  * a code comment inside an entry

   :ACK: /ak/, interj.

   Acknowledge.

Appendix\u00a0A.\u00a0Hacker Folklore

   Table of Contents

   The Meaning of Hack

   This appendix contains legends.

The Meaning of Hack

   A story.
"""


def test_jargon_units():
    units = data.jargon_units(MINI_JARGON)
    assert units == [
        "The Jargon File\n\nThis is the Jargon File, a compendium of hacker slang.",
        "Chapter 1. Hacker Slang\n\nChapter one prose.\n\nPart II. The Jargon Lexicon",
        ":0:\n\nNumeric zero.",
        ":ABEND: /a'bend/, n.\n\n[ABnormal END] Abnormal termination.\n\n*\n* a code comment inside an entry",
        ":ACK: /ak/, interj.\n\nAcknowledge.",
        "Appendix A. Hacker Folklore\n\nThis appendix contains legends.",
        "The Meaning of Hack\n\nA story.",
    ]
    with pytest.raises(ValueError, match="unexpected Jargon File layout"):
        data.jargon_units("no structure here")


def test_pack_units():
    assert data.pack_units([], 10, 20) == []
    # closes at min_chars (sizes count the blank-line separator), never goes past max_chars
    assert data.pack_units(["aaaa"] * 5, 10, 20) == ["aaaa\n\naaaa", "aaaa\n\naaaa\n\naaaa"]
    assert data.pack_units(["a" * 8, "b" * 15, "c"], 10, 20) == ["a" * 8, "b" * 15 + "\n\nc"]
    assert data.pack_units(["x" * 50, "y"], 10, 20) == ["x" * 50, "y"]  # too long: alone


# ---- the named corpora ---------------------------------------------------------------------------

def test_python_docs_loader_on_a_miniature(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PYTHON_DOCS_DIR", tmp_path)
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "os.rst.txt").write_text("os\n==\n\n" + "Files. " * 100, encoding="utf-8")
    (tmp_path / "short.rst.txt").write_text("too short", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("Not a source. " * 100, encoding="utf-8")
    assert data.named_corpus("python-docs") == [Document("library/os.rst.txt", "os\n==\n\n" + "Files. " * 100)]


def test_jargon_loader_on_a_miniature(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setattr(data, "JARGON_FILE", tmp_path / "jargon.txt.gz")
    with gzip.open(data.JARGON_FILE, "wt", encoding="utf-8") as f:
        f.write(MINI_JARGON)
    units = data.jargon_units(MINI_JARGON)
    assert data.named_corpus("jargon") == [Document("jargon/0001", "\n\n".join(units))]


@pytest.mark.corpora
def test_python_docs():
    docs = data.named_corpus("python-docs")
    assert len(docs) >= 400
    names = [d.name for d in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "library/os.rst.txt" in names
    assert all(len(d.text) >= data.PYTHON_DOCS_MIN_CHARS for d in docs)
    assert sum(len(d.text) for d in docs) > 5_000_000


@pytest.mark.corpora
def test_jargon():
    docs = data.named_corpus("jargon")
    assert len(docs) >= 10
    assert [d.name for d in docs] == [f"jargon/{i:04d}" for i in range(1, len(docs) + 1)]
    sizes = [len(d.text) for d in docs]
    assert all(10_000 <= s <= 50_000 for s in sizes), sizes
    text = "\n\n".join(d.text for d in docs)
    assert len(re.findall(r"^:[^:\n]+:", text, re.M)) > 2000  # the lexicon entries
    assert ":hacker: n." in text and "The Story of Mel" in text
    assert "\u00a0" not in text


def test_essays_corpus():
    docs = data.named_corpus("essays")
    assert len(docs) == len(data.essays()) > 10
    assert all(d.name.startswith("essays/") for d in docs)


# ---- held-out split and stats ------------------------------------------------------------------

def test_split_heldout_stable_disjoint_fraction():
    docs = [Document(f"doc-{i}", "x") for i in range(4000)]
    train, heldout = data.split_heldout(docs, 0.1)
    assert {d.name for d in train}.isdisjoint(d.name for d in heldout)
    assert len(train) + len(heldout) == len(docs)
    assert 0.08 < len(heldout) / len(docs) < 0.12
    assert data.split_heldout(list(reversed(docs)), 0.1)[1] == list(reversed(heldout))  # stable
    subset = docs[::3]  # the assignment does not depend on the other documents
    assert data.split_heldout(subset, 0.1)[1] == [d for d in heldout if d in subset]
    # a larger fraction only adds documents to the held-out set
    assert {d.name for d in heldout} <= {d.name for d in data.split_heldout(docs, 0.2)[1]}
    assert data.split_heldout(docs, 0.0)[1] == [] and data.split_heldout(docs, 1.0)[0] == []
    with pytest.raises(ValueError, match="fraction"):
        data.split_heldout(docs, 1.5)


def test_heldout_score_is_pinned():
    # SHA-256 of the salted name: the same on every machine and Python version (not hash()).
    assert data.heldout_score("library/os.rst.txt") == pytest.approx(0.9135913, abs=1e-6)


def test_corpus_stats():
    docs = [Document("a", "one two three"), Document("b", "four")]
    assert data.corpus_stats(docs) == {"documents": 2, "characters": 17, "min_characters": 4,
                                       "max_characters": 13}
    assert data.corpus_stats(docs, str.split)["tokens"] == 4
    assert data.corpus_stats([]) == {"documents": 0, "characters": 0, "min_characters": 0,
                                     "max_characters": 0}


# ---- passkey prompt ----------------------------------------------------------------------------

def test_passkey_prompt_parts():
    intro, question, answer = data.passkey_prompt_parts("12345")
    assert intro == "The pass key is 12345. Remember it. 12345 is the pass key.\n"
    assert question == "\nWhat is the pass key? The pass key is"
    assert answer == " 12345"


def test_filler_text():
    docs = [Document(str(i), f"document {i} " * 10) for i in range(5)]
    text = data.filler_text(docs, 2000, random.Random(0))
    assert len(text) >= 2000  # repeats documents once all are used
    assert data.filler_text(docs, 2000, random.Random(0)) == text
    with pytest.raises(ValueError, match="non-empty"):
        data.filler_text([Document("e", "  ")], 10, random.Random(0))


@pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 tokenizer not in the model cache")
def test_passkey_answer_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    _, question, answer = data.passkey_prompt_parts("90817")
    q = tok.encode(question, add_special_tokens=False)
    qa = tok.encode(question + answer, add_special_tokens=False)
    assert qa[:len(q)] == q and 1 <= len(qa) - len(q) <= 8  # a handful of tokens, same boundary


# ---- sentiment lexicon (vaderSentiment wheel, installed by the project setup) -----------------

def test_sentiment_lexicon():
    lexicon = data.sentiment_lexicon()
    words = [w for w, _ in lexicon]
    assert words == sorted(words) and len(set(words)) == len(words)
    assert len(lexicon) > 3000
    labels = dict(lexicon)
    assert labels["good"] == 1 and labels["love"] == 1 and labels["bad"] == 0 and labels["hate"] == 0
    assert "okay" not in labels  # mean valence 0.9: neutral at the default threshold
    assert all(w.isalpha() and w.isascii() for w in words)
    assert set(labels.values()) == {0, 1}
    assert 0.3 < sum(labels.values()) / len(labels) < 0.7
