"""Long context: LongMem (window W + memory) against the backbone reading the whole text with full
attention: time and peak memory per token, each measurement in a fresh process."""

from __future__ import annotations

import gc
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

import torch

from ..config import LongMemConfig
from ..model import LongMem
from ..report import markdown_table
from .common import in_fresh_process, text_ids, timed, tokens_label

CONTEXT_WARMUP_TOKENS = 16  # an untimed read this long before each long-context measurement
KIB = 1024  # Linux reports VmHWM and ru_maxrss in KiB
PANELS = 2  # subplots of this part in bench.png


class Read(TypedDict):
    """One read of n tokens, in a fresh process."""
    device: str
    seconds: float
    baseline_bytes: int
    peak_bytes: int
    s_per_token: float
    bytes_per_token: float


class Row(TypedDict):
    tokens: int
    longmem: Read
    full_attention: Read | None  # None past the backbone's position limit


class Result(TypedDict):
    window: int
    max_positions: int
    torch_threads: int
    memory: str  # what "peak" measures
    rows: list[Row]


def _memory_mark(device: torch.device) -> int:
    """Resets the peak-memory counter; returns the memory in use now, in bytes (CPU: resident set)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak RSS to the RSS now
    return _memory_peak(device)


def _memory_peak(device: torch.device) -> int:
    """Peak memory since the last _memory_mark, in bytes. CPU: VmHWM of /proc/self/status, the high-water
    mark clear_refs resets. Not ru_maxrss: a spawned process inherits its parent's peak through exec
    there, which clear_refs does not reset, so a child of a big process would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KIB  # "VmHWM:   123456 kB"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def _read_context(config: dict, method: str, ids: list[int], threads: int) -> Read:
    """Runs in a fresh process: loads the model, reads `ids` with `method` ("longmem" or
    "full_attention") after a short warm-up, and reports time and peak memory above the loaded model."""
    torch.set_num_threads(threads)
    model = LongMem(LongMemConfig.from_dict(config))
    device = model.backbone.device
    read = (lambda x: model.score(token_ids=x)) if method == "longmem" else \
        (lambda x: model.backbone.window_logprobs(x, len(x)))
    read(ids[:CONTEXT_WARMUP_TOKENS])
    baseline = _memory_mark(device)
    seconds, _ = timed(lambda: read(ids), device)
    peak = _memory_peak(device)
    return {"device": str(device), "seconds": seconds, "baseline_bytes": baseline, "peak_bytes": peak,
            "s_per_token": seconds / len(ids), "bytes_per_token": (peak - baseline) / len(ids)}


def run(config: LongMemConfig, lengths: Sequence[int]) -> Result:
    """Time and peak memory per token of reading the first n tokens of the essays, for each n:
    LongMem (score with no memory id: W-token windows, earlier windows in a scratch memory) and the
    backbone with full attention over all n tokens (one forward pass; only up to its position
    limit). Both compute the log-probability of every token. Every measurement runs in a fresh
    spawned process with this process's torch thread count; memory is the peak above what the
    loaded model holds: CPU resident set (VmHWM, its high-water mark reset after loading), or
    torch.cuda.max_memory_allocated."""
    from transformers import AutoTokenizer

    from ..backbone import model_dims, resolve_backbone_path

    max_positions = model_dims(config.backbone).max_positions
    ids = text_ids(AutoTokenizer.from_pretrained(resolve_backbone_path(config.backbone)), max(lengths))
    threads = torch.get_num_threads()
    rows = []
    for n in lengths:
        row = {"tokens": n}
        for method in ("longmem", "full_attention"):
            fits = method == "longmem" or n <= max_positions
            row[method] = in_fresh_process(_read_context, config.to_dict(), method, ids[:n], threads) if fits else None
        rows.append(row)
    cuda = rows[0]["longmem"]["device"].startswith("cuda")
    return {"window": config.read.segment_tokens, "max_positions": max_positions, "torch_threads": threads,
            "memory": "CUDA max_memory_allocated" if cuda else "peak RSS above the loaded model", "rows": rows}


def table(r: Result) -> str:
    def cells(m: dict | None) -> list[str]:
        if m is None:
            return ["-"] * 3
        return [f"{1e3 * m['s_per_token']:.2f}", f"{m['bytes_per_token'] / KIB:,.1f}",
                f"{(m['peak_bytes'] - m['baseline_bytes']) / KIB**2:,.0f}"]

    rows = [[tokens_label(x["tokens"]), *cells(x["longmem"]), *cells(x["full_attention"])] for x in r["rows"]]
    title = (f"## Long context: LongMem (window {r['window']} + memory) vs full attention (limit "
             f"{r['max_positions']:,} positions); memory = {r['memory']}")
    return "\n".join([
        title, "",
        markdown_table(["tokens", "LongMem ms/token", "KiB/token", "MiB", "full attention ms/token", "KiB/token", "MiB"],
               rows)])


def plot(axes, r: Result) -> None:
    for ax, key, scale, label in ((axes[0], "s_per_token", 1e3, "ms per token"),
                                  (axes[1], "bytes_per_token", 1 / KIB, "peak KiB per token")):
        for method, name in (("longmem", "LongMem"), ("full_attention", "full attention")):
            points = [(x["tokens"], scale * x[method][key]) for x in r["rows"] if x[method] is not None]
            ax.plot(*zip(*points), "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.set_title("long context", fontsize=10)
        ax.legend(fontsize=7)
