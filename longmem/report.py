"""What the benchmark and evaluation reports share: Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

JUSTIFY = {"l": str.ljust, "r": str.rjust, "c": str.center}
RULE = {"l": ":{}-", "r": "-{}:", "c": ":{}:"}


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table, padded to read well on a terminal too. `align` holds one of l/r/c per column
    (default: the first left, the rest right); cells are str()-ed with '|' escaped."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [headers, *rows]]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(headers))]
    line = lambda row: "| " + " | ".join(JUSTIFY[a](c, w) for c, w, a in zip(row, widths, align)) + " |"
    rule = "|" + "|".join(RULE[a].format("-" * w) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])
