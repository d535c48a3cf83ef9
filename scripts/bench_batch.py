"""Throughput of `longmem batch` with 1 and 2 actors per pool, on the local cluster (prints numbers;
not a test). Each run starts a fresh local Ray instance and a fresh output directory.

    .venv/bin/python scripts/bench_batch.py --corpus essays --docs 12 --out results/batch/throughput.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODES = "ingest,score"
DEFAULT_ACTORS = "1,2"


def subset(corpus: str, docs: int, folder: Path) -> int:
    """The first `docs` documents of a named corpus as text files; returns their characters."""
    from longmem.data import named_corpus

    chars = 0
    for doc in named_corpus(corpus)[:docs]:
        path = folder / f"{doc.name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc.text)
        chars += len(doc.text)
    return chars


def main() -> int:
    import ray

    from longmem.config import LongMemConfig
    from longmem.report import markdown_table
    from services.bank import stop_bank
    from services.batch import run_batch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="essays")
    parser.add_argument("--docs", type=int, default=12, help="first N documents of the corpus")
    parser.add_argument("--modes", default=DEFAULT_MODES)
    parser.add_argument("--actors", default=DEFAULT_ACTORS, help="actors per pool, one run each")
    parser.add_argument("--out", default="results/batch/throughput.md")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    corpus = work / "corpus"
    chars = subset(args.corpus, args.docs, corpus)
    rows = []
    for mode in args.modes.split(","):
        for n in map(int, args.actors.split(",")):
            config = LongMemConfig.load(None, [*args.overrides, f"batch.mode={mode}",
                                               f"batch.encoder_actors=[{n},{n}]", f"batch.reader_actors=[{n},{n}]",
                                               f"serve.storage_uri={work / 'storage'}"]).validate()
            ray.init(address="local", namespace=config.serve.namespace)
            try:
                summary = run_batch(config, str(corpus), str(work / f"out-{mode}-{n}"), progress=False)
            finally:
                stop_bank(config)
                ray.shutdown()
            print(summary.table(), flush=True)
            rows.append((mode, n, summary))
    shutil.rmtree(work, ignore_errors=True)

    base = {mode: s.tokens_per_second for mode, n, s in rows if n == 1}
    lines = [f"# `longmem batch` throughput, {dt.date.today()}", "",
             f"{platform.machine()}, {os.cpu_count()} cores; first {args.docs} documents of `{args.corpus}` "
             f"({chars:,} characters); each model actor {config.batch.actor_num_cpus} CPU; "
             f"overrides: {args.overrides or 'none'}. Seconds include actor start-up (model load).", "",
             markdown_table(["mode", "actors per pool", "documents", "tokens", "seconds", "tokens/s", "vs 1 actor"],
                            [[mode, n, s.ok, f"{s.tokens:,}", f"{s.seconds:.1f}", f"{s.tokens_per_second:,.0f}",
                              f"{s.tokens_per_second / base[mode] if base.get(mode) else float('nan'):.2f}×"]
                             for mode, n, s in rows])]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
