"""`longmem bench`: runs the parts, writes bench.json (with the `headline` ratios), bench.md and
bench.png. The core parts run without services/; the service parts are imported only when asked for."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..config import BENCH_PARTS, LongMemConfig
from ..model import LongMem
from ..report import markdown_table
from .common import log, tokens_label

# `longmem bench --parts` name -> the module measuring it (each has run, table, plot, PANELS)
MODULES = {"roofline": "longmem.bench.roofline", "eviction": "longmem.bench.eviction",
           "memory": "longmem.bench.memory_cost", "long_context": "longmem.bench.long_context",
           "service": "services.bench.service", "search": "services.bench.search",
           "retrieval": "longmem.bench.retrieval"}
assert tuple(MODULES) == BENCH_PARTS
PARTS = {part: {"memory": "memory_cost"}.get(part, part) for part in BENCH_PARTS}  # name -> result key
BENCH_FILES = ("bench.json", "bench.md", "bench.png")
PLOT_COLUMNS = 3  # subplots per row of the PNG


def part_module(key: str) -> ModuleType:
    """The module of a part, by result key (services/ is imported only for its own parts)."""
    return importlib.import_module(MODULES[{v: k for k, v in PARTS.items()}[key]])


def format_table(results: dict[str, dict]) -> str:
    """The parts present in `results` (keyed by result key), each as a titled table."""
    return "\n\n".join(part_module(key).table(r) for key, r in results.items()) + "\n"


def plot(results: dict[str, dict], path: str | Path) -> Path:
    """One PNG with each part's subplots (PANELS of them), PLOT_COLUMNS to a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    modules = {key: part_module(key) for key in results}
    count = sum(m.PANELS for m in modules.values())
    cols = min(count, PLOT_COLUMNS)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.4 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = list(np.atleast_1d(fig.subplots(rows, cols)).ravel())
    for key, r in results.items():
        modules[key].plot(axes[:modules[key].PANELS], r)
        axes = axes[modules[key].PANELS:]
    for ax in axes:  # the grid's unused cells
        fig.delaxes(ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def headline(results: dict[str, dict]) -> list[list[str]]:
    """One ratio or a few per part, both sides measured in this run: [part, figure, value] rows."""
    out = []
    if r := results.get("roofline"):
        for path in ("ingest", "score"):
            out.append(["roofline", f"{path}: measured tokens/s / FLOP bound", f"{r[path]['fraction']:.1%}"])
        e = r["early_exit"]
        out.append(["roofline", "full encode time / encode_memory time (FLOP ratio)",
                    f"{e['speedup']:.2f}x ({e['flop_ratio']:.2f}x)"])
    if r := results.get("eviction"):
        big = r["rows"][-1]
        out.append(["eviction", f"remove_ids + shift / ring buffer, {tokens_label(big['tokens'])} tokens",
                    f"{big['ratio']:,.0f}x"])
    if r := results.get("memory_cost"):
        fp32 = r["rows"][0]
        for x in r["rows"][1:]:
            out.append(["memory cost", f"{x['name']}: bytes/token vs {fp32['name']}, recall@{r['k_chunks']}",
                        f"{x['bytes_per_token'] / fp32['bytes_per_token']:.2f}x, {x['recall']:.3f}"])
    if r := results.get("long_context"):
        both = [x for x in r["rows"] if x["longmem"] and x["full_attention"]]
        if both:
            x = both[-1]
            lm, fa = x["longmem"], x["full_attention"]
            n = tokens_label(x["tokens"])
            out.append(["long context", f"LongMem / full attention, time per token, {n}",
                        f"{lm['s_per_token'] / fa['s_per_token']:.2f}x"])
            if fa["bytes_per_token"] > 0:
                out.append(["long context", f"LongMem / full attention, peak memory per token, {n}",
                            f"{lm['bytes_per_token'] / fa['bytes_per_token']:.2f}x"])
        first, last = r["rows"][0], r["rows"][-1]
        if len(r["rows"]) > 1:
            span = f"{tokens_label(last['tokens'])} / {tokens_label(first['tokens'])}"
            out.append(["long context", f"LongMem time per token, {span}",
                        f"{last['longmem']['s_per_token'] / first['longmem']['s_per_token']:.2f}x"])
    if r := results.get("service"):
        out.append(["service", "append tokens/s, gRPC + Ray / in-process", f"{r['ratio']['append']:.2f}x"])
        out.append(["service", "score tokens/s, gRPC + Ray / in-process", f"{r['ratio']['score']:.2f}x"])
        out.append(["service", "max |log p, gRPC + Ray - in-process|", f"{r['max_abs_logprob_diff']:.1e}"])
    if r := results.get("search"):
        big = r["rows"][-1]
        n = tokens_label(big["tokens"])
        most = big["sharded"][-1]
        out.append(["search", f"{n} tokens, {most['shards']} shards / {r['base_shards']} shard",
                    f"{most['vs_base']:.2f}x"])
        out.append(["search", f"{n} tokens, {most['shards']} shards: measured / ideal", f"{most['vs_ideal']:.2f}x"])
        out.append(["search", f"{n} tokens, {most['shards']} shards: busiest shard's CPU / ideal",
                    f"{most['cpu_vs_ideal']:.2f}x"])
        out.append(["search", f"{n} tokens, {r['base_shards']} shard / in-process",
                    f"{big['sharded'][0]['vs_in_process']:.2f}x"])
    if r := results.get("retrieval"):
        small, big = r["rows"][0], r["rows"][-1]
        span = f"{tokens_label(big['tokens'])} / {tokens_label(small['tokens'])}"
        out.append(["retrieval", f"time per segment's search, {span} ({big['method']} / {small['method']})",
                    f"{r['largest_over_smallest']:.2f}x"])
        out.append(["retrieval", f"{tokens_label(big['tokens'])} tokens: recall@{r['k_chunks']} vs exact, "
                    "time vs exact", f"{big['recall']:.3f}, {big['search_s'] / big['exact_search_s']:.2f}x"])
    return out


def headline_object(results: dict[str, dict]) -> dict[str, float]:
    """bench.json's `headline`: the issue's bars by name, for the parts this run measured."""
    out: dict[str, float] = {}
    if r := results.get("roofline"):
        out.update(ingest_roofline=r["ingest"]["fraction"], score_roofline=r["score"]["fraction"])
    if r := results.get("service"):
        out.update(service_score_ratio=r["ratio"]["score"], service_append_ratio=r["ratio"]["append"])
    if r := results.get("retrieval"):
        sizes = {row["tokens"]: row for row in r["rows"]}
        if 65_536 in sizes and 1_048_576 in sizes:
            out["retrieval_1m_over_64k"] = sizes[1_048_576]["search_s"] / sizes[65_536]["search_s"]
        if 1_048_576 in sizes:
            out["retrieval_recall_1m"] = sizes[1_048_576]["recall"]
    if r := results.get("search"):  # the largest memory: how far the busiest shard's CPU is from 1/S
        out["shard_cpu_scaling_error"] = max(abs(x["cpu_vs_ideal"] - 1) for x in r["rows"][-1]["sharded"])
    return out


def package_version(package: str) -> str:
    """The installed version of `package`, without importing it (the core parts run without Ray)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_info(config: LongMemConfig) -> dict[str, Any]:
    import faiss

    device = config.backbone.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or "",
        "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
                     "ray": package_version("ray"), "transformers": package_version("transformers")},
    }


def machine_table(machine: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {x}" for k, x in v.items())
        if isinstance(v, list):
            return " / ".join(map(str, v))
        return str(v)

    return markdown_table(["machine", ""], [[k, cell(v)] for k, v in machine.items()])


def render(report: dict[str, Any]) -> str:
    """bench.md: the machine, the headline ratios, then every part's table."""
    results = report["results"]
    parts = [f"# LongMem benchmark\n\nCommand: `{report['command']}`\n", machine_table(report["machine"])]
    if results:
        rows = [[part, figure, value] for part, figure, value in headline(results)]
        parts += ["## Ratios (both sides measured in this run)\n\n"
                  + markdown_table(["part", "figure", "value"], rows),
                  format_table(results).rstrip()]
    walls = ", ".join(f"{p} {s:.0f} s" for p, s in report["wall_s"].items())
    parts.append(f"Wall time: {report['total_wall_s']:.0f} s ({walls}).")
    return "\n\n".join(parts) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"headline": headline_object(report["results"]), **report},
                                               indent=1) + "\n")
    (out / "bench.md").write_text(render(report))
    if report["results"]:
        plot(report["results"], out / "bench.png")


def run_bench(config: LongMemConfig, parts: Sequence[str] = tuple(PARTS), out: str | Path | None = None,
              command: str = "longmem bench") -> dict[str, Any]:
    """Runs `parts` (names of PARTS) with the sizes of config.bench, in this process; loads the LongMem
    once for the parts that take a model. After every part writes bench.json (everything measured so
    far, the machine, the sizes), bench.md (the tables) and bench.png to `out` (default
    config.bench.out_dir); prints each part's table to stderr as it finishes. Returns the report."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown benchmark parts {sorted(unknown)}; known: {list(PARTS)}")
    out = Path(out or config.bench.out_dir)
    b = config.bench
    t_start = time.perf_counter()
    report: dict[str, Any] = {"command": command, "machine": machine_info(config), "sizes": {
        k: v for k, v in config.to_dict()["bench"].items() if k not in ("quick", "out_dir")},
        "results": {}, "wall_s": {}, "total_wall_s": 0.0}
    model = None
    if {"roofline", "memory", "service", "retrieval"} & set(parts):
        log(f"loading LongMem ({config.backbone.name_or_path})")
        t0 = time.perf_counter()
        model = LongMem(config)
        report["machine"]["model_load_s"] = round(time.perf_counter() - t0, 2)
        report["machine"]["device"] = str(model.backbone.device)
    runs = {  # each part with its sizes from config.bench
        "roofline": lambda m: m.run(config, b.roofline_tokens, model=model),
        "eviction": lambda m: m.run(b.eviction_sizes),
        "memory": lambda m: m.run(config, b.memory_cost_tokens, model=model),
        "long_context": lambda m: m.run(config, b.long_context_lengths),
        "service": lambda m: m.run(config, b.service_tokens, model=model),
        "search": lambda m: m.run(config, b.search_sizes, b.search_shards, repeats=b.search_repeats),
        "retrieval": lambda m: m.run(config, b.retrieval_sizes, b.retrieval_repeats, model=model),
    }
    for part, key in PARTS.items():  # always in this order
        if part not in parts:
            continue
        log(f"part {part}")
        t0 = time.perf_counter()
        result = runs[part](importlib.import_module(MODULES[part]))
        report["wall_s"][part] = time.perf_counter() - t0
        report["results"][key] = result
        report["total_wall_s"] = time.perf_counter() - t_start
        print(format_table({key: result}), file=sys.stderr, flush=True)
        write_report(report, out)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = time.perf_counter() - t_start
    write_report(report, out)
    return report
