"""What the evaluation's parts share: the data they read (held-out and unseen documents), formatting, plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import LongMemConfig
from ..data import Document, load_corpus, split_heldout


def md_literal(text: str) -> str:
    """Generated text shown safely in Markdown: its Python repr, with backticks escaped."""
    return repr(text).replace("`", "\\`")


def fmt_ppl(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:,.2f}"


def fmt_acc(correct: int, total: int) -> str:
    return f"{correct / total:.1%} ({correct}/{total})" if total else "n/a"


def heldout_documents(config: LongMemConfig) -> list[Document]:
    return split_heldout(load_corpus(config.eval.corpus, config.corpus), config.train.heldout_fraction)[1]


@dataclass
class EvalData:
    """What the parts read: held-out documents of a training corpus (`eval.corpus`: ChapterBreak needs
    its reST sections) and every document of corpora the training never saw (`eval.unseen_corpora`:
    perplexity, and the filler of passkey and recall)."""

    heldout: list[Document]
    unseen: dict[str, list[Document]]

    @property
    def unseen_documents(self) -> list[Document]:
        return [d for docs in self.unseen.values() for d in docs]


def eval_data(config: LongMemConfig) -> EvalData:
    trained = sorted(set(config.eval.unseen_corpora) & set(config.train.corpora))
    if trained:
        raise ValueError(f"eval.unseen_corpora {trained} are in train.corpora: they are not unseen text")
    heldout = heldout_documents(config)
    if not heldout:
        raise ValueError(f"corpus {config.eval.corpus!r} has no held-out documents at fraction "
                         f"{config.train.heldout_fraction}")
    return EvalData(heldout, {name: load_corpus(name, config.corpus) for name in config.eval.unseen_corpora})


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def figure(width: float = 6.4, height: float = 4.0):
    """A matplotlib figure on the Agg canvas, without pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def save_plot(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    return name


def bar_plot(out_dir: Path, name: str, title: str, labels: list[str], values: list[float],
              reference: tuple[str, float] | None = None) -> str:
    fig, ax = figure(6.4, 3.6)
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    if reference is not None:
        ax.axhline(reference[1], color="gray", linestyle="--", label=reference[0])
        ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    return save_plot(fig, out_dir, name)
