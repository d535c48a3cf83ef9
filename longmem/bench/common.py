"""What the benchmark parts share: timing, real text and real queries, number labels, plot axes,
fresh processes, logging."""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import essays_document
from ..memory import Retrieved, round_up
from ..model import LongMem
from ..roles import segments

CHARS_PER_TOKEN_GUESS = 5  # how much essay text to tokenize first when n tokens are needed
SEED = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """(seconds, result) of one call; with a device, waiting for it to finish."""
    if device is not None:
        sync(device)
    start = time.perf_counter()
    out = call()
    if device is not None:
        sync(device)
    return time.perf_counter() - start, out


def median_time(call: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timed(call)[0] for _ in range(repeats))


def text_ids(tokenizer, num_tokens: int) -> list[int]:
    """The first `num_tokens` tokens of Paul Graham's essays (longmem.data.essays_document)."""
    text = essays_document()
    chars = num_tokens * CHARS_PER_TOKEN_GUESS
    while True:
        # Cut before a space, so no word is split and the tokens are a prefix of the whole text's.
        cut = len(text) if chars >= len(text) else text.rfind(" ", 0, chars)
        ids = tokenizer.encode(text[:cut], add_special_tokens=False)
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
        if cut == len(text):
            raise ValueError(f"the essays have {len(ids):,} tokens, {num_tokens:,} needed")
        chars *= 2


def memory_queries(model: LongMem, ids: list[int]) -> np.ndarray:
    """The pre-rotary queries the SideNet's memory block sends to memory for `ids`, [T, Hq, d],
    read segment by segment with an empty memory."""
    captured = []

    def record(queries: torch.Tensor) -> Retrieved:  # [B, T, Hq, d]
        captured.append(queries[0].float().cpu().numpy())
        b, t, h, d = queries.shape
        empty = queries.new_zeros(b, h, t, 1, d)  # one masked slot: the block reads locally only
        return Retrieved(empty, empty, torch.zeros(b, h, t, 1, dtype=torch.bool, device=queries.device))

    w = model.config.read.segment_tokens
    with torch.no_grad():
        for seg in segments(ids, w):
            encoded = model.encoder.encode([seg])
            model.reader.read_state(encoded, record)
    return np.concatenate(captured)


def bench_text_ids(tokenizer, num_tokens: int) -> list[int]:
    """`num_tokens` tokens of real text: the essays, then as many Python documentation sources (in name
    order) as it takes."""
    from ..data import named_corpus

    ids = tokenizer.encode(essays_document(), add_special_tokens=False)[:num_tokens]
    if len(ids) < num_tokens:  # only then is the Python documentation (a Debian package) needed
        for doc in named_corpus("python-docs"):
            ids += tokenizer.encode("\n\n" + doc.text, add_special_tokens=False)
            if len(ids) >= num_tokens:
                break
    if len(ids) < num_tokens:
        raise ValueError(f"the essays and the Python docs have {len(ids):,} tokens, {num_tokens:,} needed")
    return ids[:num_tokens]


def real_memory(model: LongMem, num_tokens: int, query_tokens: int, cache_dir: str | Path) -> dict[str, np.ndarray]:
    """The token keys/values of `num_tokens` tokens of real text (bench_text_ids) as the ingest path
    stores them ([N, Hkv, c, d] float16, sinks dropped: held_chunks), and the memory block's queries for
    the next `query_tokens` tokens ([T, Hq, d] float32). Encoding a million tokens takes ~30 min on 2 cores, so
    the result is kept in `cache_dir` under the backbone, memory layer, checkpoint weights and sizes."""
    import hashlib
    import json

    from ..checkpoint import resolve_checkpoint
    from ..evaluate.run import checkpoint_digest

    c = model.config
    checkpoint = resolve_checkpoint(c)
    weights = checkpoint_digest(checkpoint) if checkpoint else None
    digest = hashlib.sha256(json.dumps([c.backbone.name_or_path, model.backbone.memory_layer, weights,
                                        c.memory.chunk_size, c.memory.sink_tokens, c.read.segment_tokens,
                                        num_tokens, query_tokens]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"real-memory-{digest}.npz"
    if path.exists():
        with np.load(path) as saved:
            return dict(saved)
    ids = bench_text_ids(model.tokenizer, num_tokens + query_tokens)
    memory = model.create_memory(capacity_tokens=round_up(num_tokens, c.memory.chunk_size))
    try:
        model.append(memory, token_ids=ids[:num_tokens])
        store = model.bank.get(memory).store
        arrays = {"keys": store.keys[:store.filled].astype(np.float16),
                  "values": store.values[:store.filled].astype(np.float16)}
    finally:
        model.delete_memory(memory)
    arrays["queries"] = memory_queries(model, ids[num_tokens:])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), **arrays)
    path.with_suffix(".tmp.npz").replace(path)
    return arrays


def si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def tokens_label(n: int) -> str:
    for scale, suffix in ((1024**2, "M"), (1024, "k")):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return f"{n:,}"


def latency_axes(ax, ylabel: str, title: str) -> None:
    """Log-log axes of a latency against memory tokens."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("memory tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)


def in_fresh_process(fn: Callable, *args) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def log(msg: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
