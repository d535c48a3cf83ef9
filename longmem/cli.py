"""The `longmem` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .client_cli import add_client_commands
from .config import BENCH_PARTS, EVAL_PARTS, LongMemConfig

log = logging.getLogger("longmem")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see longmem/config.py for every key)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set read.segment_tokens=512")


def load_config(args: argparse.Namespace) -> LongMemConfig:
    return LongMemConfig.load(args.config, args.overrides).validate()


def cmd_demo(args: argparse.Namespace) -> int:
    from .baseline import BM25Prompt
    from .checkpoint import resolve_checkpoint
    from .data import essays_document
    from .evaluate.harness import answer_matches
    from .model import LongMem

    config = load_config(args)
    demo = config.demo
    t0 = time.perf_counter()
    model = LongMem(config)
    t_load = time.perf_counter() - t0
    essay_ids = model.tokenize(essays_document())[:demo.tokens]
    # A fact stated near the start of the document, asked after the whole of it.
    ids = essay_ids[:demo.fact_position] + model.tokenize(demo.fact) + essay_ids[demo.fact_position:]
    print(f"backbone: {model.backbone.path} ({model.backbone.num_layers} layers, memory layer "
          f"{model.backbone.memory_layer}, SideNet {model.sidenet.num_blocks} blocks, memory block "
          f"{model.sidenet.memory_block}); loaded in {t_load:.1f} s")
    checkpoint = resolve_checkpoint(config)
    print(f"SideNet: {checkpoint or 'untrained'}")
    print(f"document: Paul Graham's essays, first {len(essay_ids):,} tokens, with {demo.fact!r} at token "
          f"{demo.fact_position:,}; read in segments of {config.read.segment_tokens} tokens")
    memory_id = model.create_memory("demo")
    t0 = time.perf_counter()
    result = model.score(token_ids=ids, memory_id=memory_id, append=True, progress=True)
    t_score = time.perf_counter() - t0
    without = model.score(token_ids=ids, use_memory=False, progress=True)
    stats = model.memory_stats(memory_id)
    w = config.read.segment_tokens
    print(f"perplexity, backbone with a {w}-token window: {result.backbone_perplexity:.3f}")
    print(f"perplexity, SideNet without memory:            {without.perplexity:.3f}")
    print(f"perplexity, LongMem with memory:               {result.perplexity:.3f}")
    print(f"read {len(ids):,} tokens with memory in {t_score:.1f} s ({len(ids) / t_score:.0f} tokens/s)")
    print(f"memory '{stats.memory_id}': {stats.tokens_held:,} tokens held of {stats.capacity_tokens:,}, "
          f"{stats.tokens_evicted:,} evicted, {stats.pending_tokens} pending, {stats.tokens_appended:,} appended")
    print(f"recall, {len(ids) - demo.fact_position:,} tokens after the fact: {demo.question!r}")

    def show(label: str, answer: str) -> None:
        verdict = "right" if answer_matches(answer, demo.answer) else "wrong"
        print(f"  {label}: {answer!r} ({verdict}; the fact says {demo.answer})")

    reread = model.answer_spans("generate", memory_id, model.tokenize(demo.question), True)
    for label, use_memory in (("LongMem with memory", True), ("SideNet without memory", False)):
        show(label, model.decode(list(model.generate(demo.question, memory_id=memory_id, use_memory=use_memory,
                                                     max_new_tokens=demo.answer_tokens,
                                                     reread=reread if use_memory else []))))
    for span in reread:
        print(f"    re-read: tokens {span.start_position}-{span.end_position}: {span.text!r}")
    # The baseline: the document's BM25 windows for the question before it, read by the backbone alone.
    selection = BM25Prompt.from_config(ids, model.decode, model.tokenize, config.eval).select(demo.question)
    prompt = selection.ids + model.tokenize(demo.question)
    held = "holding" if any(demo.answer in span for span in selection.texts) else "without"
    show(f"backbone with a BM25 prompt ({len(selection.spans)} spans, {len(selection.ids)} tokens, {held} the fact)",
         model.decode(model.backbone.generate_greedy(prompt, demo.answer_tokens)))
    t0 = time.perf_counter()
    spans = model.retrieve(memory_id, demo.query, max_spans=3)
    print(f"retrieve({demo.query!r}) in {time.perf_counter() - t0:.2f} s:")
    for span in spans:
        print(f"  tokens {span.start_position}-{span.end_position} hits={span.hits} score={span.score:.2f}: "
              f"{span.text!r}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    config = load_config(args)
    summary = train(config, args.out, progress=True)
    print(f"trained {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.0f} s "
          f"({summary['tokens_per_second']:.0f} tokens/s on {summary['device']}); "
          f"checkpoint: {summary['checkpoint']} (load it with --set sidenet.checkpoint=PATH)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.run import evaluate
    from .model import LongMem

    config = load_config(args)
    out = args.out or config.eval.out_dir
    evaluate(LongMem(config), config, out, parts=tuple(args.parts), progress=True)
    print(f"report: {out}/report.md")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .loadtest import run_load

    report = run_load(args.target, args.clients, args.seconds, args.max_requests, api_key=args.api_key)
    print(report.table())
    return 0 if not report.errors else 1


def cmd_soak(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from services.chaos import simulated_cluster, soak

    config = load_config(args)
    minutes = config.soak.minutes if args.minutes is None else args.minutes
    out = Path(args.out or config.soak.out_dir)
    with tempfile.TemporaryDirectory(prefix="longmem-soak-") as scratch:
        if not config.serve.storage_uri:  # never the storage of a server of yours
            config.serve.storage_uri = scratch
        with simulated_cluster(config) as sim:
            report = soak(sim, minutes, config.soak.seed, progress=lambda line: print(line, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    (out / "soak.txt").write_text(report.summary())
    print(report.summary(), end="")
    print(f"wrote {out}/soak.json, {out}/soak.txt")
    return 0 if report.ok else 1


def cmd_batch(args: argparse.Namespace) -> int:
    import ray

    from services.bank import stop_bank
    from services.batch import run_batch

    config = load_config(args)
    if args.mode:
        config.batch.mode = args.mode
    ray.init(address=args.address or "local", namespace=config.serve.namespace)
    try:
        summary = run_batch(config, args.corpus, args.out, progress=not args.no_progress)
    finally:
        if not args.address:
            stop_bank(config)  # the memories stay in serve.storage_uri; `longmem serve` restores them
        ray.shutdown()
    print(summary.table())
    return 0 if not summary.errors else 1


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    import shlex

    from .bench.run import BENCH_FILES, render, run_bench

    config = load_config(args)
    if args.quick:  # the quick sizes first, so that --set still overrides them
        quick = [f"bench.{key}={json.dumps(value)}" for key, value in config.bench.quick.items()]
        config = LongMemConfig.load(args.config, quick + args.overrides).validate()
    out = args.out or config.bench.out_dir
    command = shlex.join(["longmem", "bench", *(["--quick"] if args.quick else []), "--parts", *args.parts,
                          "--out", out, *(["--config", args.config] if args.config else []),
                          *[x for item in args.overrides for x in ("--set", item)]])
    report = run_bench(config, args.parts, out, command)
    print(render(report), end="")
    print("wrote " + ", ".join(f"{out}/{name}" for name in BENCH_FILES))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    import ray
    from ray import serve

    from longmem.storage import StorageLocked
    from services.app import APP_NAME, build, grpc_options, serve_environment
    from services.bank import stop_bank

    config = load_config(args)
    serve_environment(config)  # for the embedded cluster's Serve controller
    # "local" always starts an embedded cluster; a bare ray.init() would join any cluster it finds.
    ray.init(address=args.address or "local", namespace=config.serve.namespace)
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own handler
    front = None
    try:
        try:
            app = build(config)  # restores the memories first; refuses a storage another server uses
        except StorageLocked as e:
            print(f"longmem serve: {e}", file=sys.stderr, flush=True)
            return 1
        serve.start(grpc_options=grpc_options(config),
                    http_options={"host": config.serve.host, "port": config.serve.http_port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"LongMem gRPC API (longmem.v1.LongMem) on {config.serve.host}:{config.serve.grpc_port}. "
              "Ctrl-C or SIGTERM stops it.", flush=True)
        if config.serve.tls_cert_file and config.serve.tls_key_file:
            from services.tls import TlsFront

            with open(config.serve.tls_cert_file, "rb") as cert, open(config.serve.tls_key_file, "rb") as key:
                front = TlsFront(f"127.0.0.1:{config.serve.grpc_port}", config.serve.tls_port,
                                 cert.read(), key.read()).start()
            print(f"TLS on port {front.port}", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if front is not None:
            front.stop(grace_s=5)
        serve.shutdown()
        if not args.address:
            stop_bank(config)
        ray.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longmem", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="read a long real document with LongMem; print perplexities and memory stats")
    add_config_args(demo)
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train the SideNet to use memory (memory-augmented adaptation); resumable")
    add_config_args(train)
    train.add_argument("--out", default=None, help="run directory (default: train.out_dir)")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("eval", help="perplexity, ChapterBreak-style, in-context learning, passkey and "
                                           "recall; writes a Markdown report with plots")
    add_config_args(evaluate)
    evaluate.add_argument("--out", default=None, help="report directory (default: eval.out_dir)")
    evaluate.add_argument("--parts", nargs="+", default=list(EVAL_PARTS), choices=EVAL_PARTS, metavar="PART",
                          help=f"any of {', '.join(EVAL_PARTS)} (default: all); parts already in the "
                               "report directory from the same setup are kept, so parts can run in "
                               "separate processes side by side")
    evaluate.set_defaults(func=cmd_eval)
    serve = sub.add_parser("serve", help="run the services and the gRPC API on an embedded local Ray cluster "
                                         "(or on an existing one with --address)")
    add_config_args(serve)
    serve.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    serve.set_defaults(func=cmd_serve)
    batch = sub.add_parser("batch", help="ingest and/or score a whole corpus with Ray Data autoscaling actor pools; "
                                         "results to Parquet or JSONL; a re-run skips documents already done")
    add_config_args(batch)
    batch.add_argument("corpus", help="essays | python-docs | jargon, or a directory of text files, a .jsonl or "
                                      ".parquet file or directory (local path or URI, e.g. s3://bucket/corpus)")
    batch.add_argument("out", help="output directory (local path or URI), one row per document")
    batch.add_argument("--mode", choices=["ingest", "score", "both"], default=None,
                       help="default: batch.mode")
    batch.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    batch.add_argument("--no-progress", action="store_true")
    batch.set_defaults(func=cmd_batch)
    bench = sub.add_parser("bench", help="benchmark: roofline, eviction, memory cost, long context, service "
                                         "overhead, sharded search; a table, bench.json, bench.md and bench.png")
    add_config_args(bench)
    bench.add_argument("--parts", nargs="+", default=list(BENCH_PARTS), choices=BENCH_PARTS, metavar="PART",
                       help=f"parts to run, any of: {' '.join(BENCH_PARTS)} (default: all)")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes (bench.quick) for a smoke run of a minute or two")
    bench.add_argument("--out", default=None, help="report directory (default: bench.out_dir, results/bench)")
    bench.set_defaults(func=cmd_bench)
    load = sub.add_parser("loadtest", help="bounded mixed Append/Score/Generate load against an endpoint; "
                                           "throughput, p50/p99 latency and errors")
    load.add_argument("--target", default="localhost:9000")
    load.add_argument("--api-key", default=None)
    load.add_argument("--clients", type=int, default=32)
    load.add_argument("--seconds", type=float, default=60.0)
    load.add_argument("--max-requests", type=int, default=100_000)
    load.set_defaults(func=cmd_loadtest)
    soak = sub.add_parser("soak", help="the services on a simulated cluster on this machine under loopback load "
                                       "while shards, the bank, replicas and nodes are killed at random; checks "
                                       "every acknowledged append against a fault-free replay, then fuzzes the API")
    add_config_args(soak)
    soak.add_argument("--minutes", type=float, default=None, help="default: soak.minutes")
    soak.add_argument("--out", default=None, help="where soak.json and soak.txt go (default: soak.out_dir)")
    soak.set_defaults(func=cmd_soak)
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
