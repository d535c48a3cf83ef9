"""The baseline a user would build instead of LongMem: cut the document's tokens into overlapping
windows, index their text with BM25 (the `bm25s` package), and put the windows that best match the
question, in the order they occur in the document, before the question for the plain backbone to read.
No Ray, no model: token ids in, token ids out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import bm25s

from .config import EvalConfig

# bm25s sets its logger to DEBUG on import, which logs a line per index whatever the application asks;
# unset, it follows the application's logging configuration.
logging.getLogger("bm25s").setLevel(logging.NOTSET)


@dataclass
class BM25Selection:
    """The windows BM25 chose for one question."""

    starts: list[int]  # first token position of each chosen window, in stream order
    spans: list[tuple[int, int]]  # [start, end) token ranges of the chosen windows, overlapping or adjacent ones merged
    texts: list[str]  # each span's decoded text
    ids: list[int]  # each span's token ids followed by the separator's: what goes before the question


class BM25Prompt:
    """BM25 over windows of `window` tokens of a token stream, one starting every `stride` tokens (the
    last window reaches the stream's end), indexed once; `select` retrieves a question's top `windows`.

    ids: the document's token ids; decode: token ids -> text (what BM25 indexes); encode: text -> token
    ids (of the separator); stopwords: bm25s.tokenize's stopword list ("" for none)."""

    def __init__(self, ids: list[int], decode: Callable[[list[int]], str], encode: Callable[[str], list[int]],
                 window: int, stride: int, windows: int, separator: str, stopwords: str):
        if not 0 < stride <= window or windows < 1:
            raise ValueError(f"BM25 windows need 0 < stride ({stride}) <= window ({window}) and a count >= 1 "
                             f"({windows}): a larger stride would leave tokens unindexed")
        if not ids:
            raise ValueError("the document has no tokens")
        self.ids, self.decode, self.window, self.windows = ids, decode, window, windows
        self.separator_ids = encode(separator) if separator else []
        self.stopwords = stopwords or None
        last = max(0, len(ids) - window)  # the last window's start: it ends at the stream's end
        self.starts = list(range(0, last, stride)) + [last]  # [N] window starts, increasing
        corpus = bm25s.tokenize([decode(ids[s:s + window]) for s in self.starts], stopwords=self.stopwords,
                                show_progress=False)
        self.index = bm25s.BM25()
        self.index.index(corpus, show_progress=False)

    @classmethod
    def from_config(cls, ids: list[int], decode: Callable[[list[int]], str], encode: Callable[[str], list[int]],
                    ev: EvalConfig) -> "BM25Prompt":
        return cls(ids, decode, encode, ev.bm25_window_tokens, ev.bm25_stride_tokens, ev.bm25_windows,
                   ev.bm25_separator, ev.bm25_stopwords)

    def select(self, question: str) -> BM25Selection:
        """The top windows for `question` (those sharing no term with it are left out), in stream order."""
        query = bm25s.tokenize([question], stopwords=self.stopwords, return_ids=False, show_progress=False)
        k = min(self.windows, len(self.starts))
        found, scores = self.index.retrieve(query, k=k, show_progress=False)  # [1, k] window indices, scores
        chosen = sorted(self.starts[i] for i in found[0][scores[0] > 0])
        spans: list[tuple[int, int]] = []
        for s in chosen:
            e = min(s + self.window, len(self.ids))
            if spans and s <= spans[-1][1]:
                spans[-1] = (spans[-1][0], e)
            else:
                spans.append((s, e))
        texts = [self.decode(self.ids[a:b]) for a, b in spans]
        ids = [t for a, b in spans for t in self.ids[a:b] + self.separator_ids]
        return BM25Selection(chosen, spans, texts, ids)

