"""Pass keys and facts about people recalled through the services from memories of up to a million tokens
striped over several shards of a simulated cluster, asked over gRPC with Generate, beside the BM25 prompt
baseline on the same items; and what re-reading costs a Generate.

Each trial: a fresh memory striped over --shards shards (a ray.cluster_utils.Cluster with one node per
shard: services/chaos.simulated_cluster); its intro (the pass key, or the fact about a person in a training
phrasing, as `longmem eval` states them) goes in over gRPC (Append), then N tokens of unseen filler whose
keys/values this process encoded once (evaluate.harness.FillerMemory) go to the shards through the bank
(RemoteBank.append, under the insecure local mode's tenant), exactly as Append would have put them (the
filler alone never depends on what precedes it). The question is asked over gRPC with Generate, greedy,
with re-reading and without it; a trial counts when the answer starts the reply. Latency is the wall time
of the whole Generate call. The baseline (longmem/baseline.py) reads the same document's best BM25
windows before the question with the backbone alone, in this process.

Usage: python scripts/recall_services.py --out results/recall_services --lengths 65536 1048576 --trials 5 \
           --kinds passkey person --shards 4 --filler-tokens 262144 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from longmem.baseline import BM25Prompt
from longmem.checkpoint import resolve_checkpoint
from longmem.client import LongMemClient
from longmem.config import LongMemConfig
from longmem.curriculum import Curriculum, curriculum_config
from longmem.data import passkey_prompt_parts, random_key
from longmem.evaluate.common import eval_data, jsonable
from longmem.evaluate.harness import RECALL_EXTRA_TOKENS, FillerMemory, RecallItem, answer_matches, passkey_filler_ids
from longmem.evaluate.recall import recall_item
from longmem.memory import round_up
from longmem.model import LongMem
from longmem.roles import segments
from longmem.report import markdown_table
from services.auth import LOCAL_TENANT, scope
from services.bank import RemoteBank
from services.bench.common import free_port
from services.chaos import simulated_cluster

KINDS = ("passkey", "person")


class AppendOverGrpc:
    """The Encoder role's ingest as the public Append RPC: the head segments of a trial's document."""

    def __init__(self, client: LongMemClient):
        self.client = client

    def ingest(self, memory_id: str, segments: list[list[int]]):
        return self.client.append(memory_id, token_ids=[t for s in segments for t in s])


class ScopedBank:
    """The bank's append and stats under a tenant's ids, as the gateway scopes them."""

    def __init__(self, bank: RemoteBank, tenant: str):
        self.bank, self.tenant = bank, tenant

    def append(self, memory_id: str, *args, **kwargs):
        return self.bank.append(scope(self.tenant, memory_id), *args, **kwargs)

    def stats(self, memory_id: str):
        return self.bank.stats(scope(self.tenant, memory_id))


def ask(client: LongMemClient, memory_id: str, question: str, new_tokens: int, reread: bool) -> tuple[str, float, list]:
    """Generate over gRPC: (text, seconds, the re-read spans of the first chunk)."""
    t0 = time.perf_counter()
    chunks = list(client.generate(question, memory_id=memory_id, max_new_tokens=new_tokens, temperature=0.0,
                                  reread=reread))
    return "".join(c.text for c in chunks), time.perf_counter() - t0, list(chunks[0].reread) if chunks else []


class Items:
    """The evaluation's items of one kind, as `longmem eval` draws them: a pass key (its intro and
    question) or one fact about a person in a training phrasing (the recall part's `person` set)."""

    def __init__(self, model: LongMem, filler: FillerMemory, rng: random.Random):
        self.model, self.rng, self.w = model, rng, model.config.read.segment_tokens
        self.filler_text = model.decode(filler.ids)
        self.curriculum = Curriculum(segments(filler.ids, self.w), model.tokenize, model.decode,
                                     curriculum_config(model.config, sys.maxsize))

    def draw(self, kind: str, rng: random.Random | None = None) -> RecallItem:
        rng = rng or self.rng
        if kind == "person":
            example = self.curriculum.example(rng, "person", False, 1)
            return recall_item(self.model, example, self.curriculum.filler(rng, self.w))
        key = random_key(rng)
        while key in self.filler_text:
            key = random_key(rng)
        intro, question, _ = passkey_prompt_parts(key)
        return RecallItem(self.model.tokenize(intro), self.model.tokenize(question), question, key, {"key": key})

    def intro_tokens(self, kind: str) -> int:
        """How long this kind's intro is (every item of a kind has the same length, so one filler phase)."""
        return len(self.draw(kind, random.Random(0)).intro_ids)  # a draw of its own: items' rng untouched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 1048576])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--filler-tokens", type=int, default=262144, help="unique filler encoded once; longer memories repeat it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = LongMemConfig.load(None, [f"serve.num_shards={args.shards}", f"serve.grpc_port={free_port()}",
                                       f"serve.http_port={free_port()}", "serve.storage_uri=none", *args.set]).validate()
    rng = random.Random(config.eval.seed)
    model = LongMem(config)
    filler = FillerMemory(model, passkey_filler_ids(model, eval_data(config).unseen_documents, args.filler_tokens, rng))
    items = Items(model, filler, rng)
    t0 = time.perf_counter()
    for kind in args.kinds:  # before the cluster takes the cores
        filler.encoded(filler.phase(items.intro_tokens(kind), max(args.lengths)))
    encode_s = time.perf_counter() - t0
    trials = []
    with simulated_cluster(config) as sim, LongMemClient(sim.target) as client:
        client.wait_ready(timeout_s=600)
        bank = RemoteBank(config)
        for n in args.lengths:
            for kind in args.kinds:
                for _ in range(args.trials):
                    trials.append(trial(model, client, bank, filler, items.draw(kind), kind, n, args.shards))
                    print(json.dumps(trials[-1]), flush=True)
                    write(out, model, args, encode_s, len(filler.ids), trials)


def trial(model: LongMem, client: LongMemClient, bank: RemoteBank, filler: FillerMemory, item: RecallItem,
          kind: str, n: int, shards: int) -> dict:
    """One item through the services (re-reading, then the memory read alone) and by the BM25 baseline."""
    new_tokens = len(model.tokenize(" " + item.answer)) + RECALL_EXTRA_TOKENS
    capacity = round_up(len(item.intro_ids) + n, model.config.memory.chunk_size)
    memory_id = client.create_memory(capacity_tokens=capacity, num_shards=shards).memory_id
    t0 = time.perf_counter()
    filler.fill(memory_id, item.intro_ids, n, encoder=AppendOverGrpc(client), bank=ScopedBank(bank, LOCAL_TENANT))
    fill_s = time.perf_counter() - t0
    info = client.get_memory(memory_id)
    result = {"kind": kind, "filler_tokens": n, "answer": item.answer, "tokens_held": info.tokens_held,
              "shards": info.num_shards, "fill_seconds": fill_s}
    question = model.decode(item.question_ids)
    for reread in (True, False):
        text, seconds, spans = ask(client, memory_id, question, new_tokens, reread)
        name = "reread" if reread else "memory_read_only"
        result.update({f"{name}_generated": text, f"{name}_match": answer_matches(text, item.answer),
                       f"{name}_seconds": seconds})
        if reread:
            result["reread_spans"] = [[s.start_position, s.end_position] for s in spans]
            result["reread_hit"] = any(item.answer in s.text for s in spans)
            result["reread_top1_hit"] = bool(spans) and item.answer in max(spans, key=lambda s: s.score).text
    client.delete_memory(memory_id)
    selection = BM25Prompt.from_config(filler.document_ids(item.intro_ids, n), model.decode, model.tokenize,
                                       model.config.eval).select(item.query)
    bm25 = model.decode(model.backbone.generate_greedy(selection.ids + item.question_ids, new_tokens))
    result.update({"bm25_generated": bm25, "bm25_match": answer_matches(bm25, item.answer),
                   "bm25_hit": any(item.answer in t for t in selection.texts)})
    return result


def write(out: Path, model: LongMem, args, encode_s: float, filler_tokens: int, trials: list[dict]) -> None:
    rows = []
    for kind, n in sorted({(t["kind"], t["filler_tokens"]) for t in trials}, key=lambda x: (x[1], x[0])):
        ts = [t for t in trials if t["filler_tokens"] == n and t["kind"] == kind]
        with_r = statistics.median(t["reread_seconds"] for t in ts)
        without = statistics.median(t["memory_read_only_seconds"] for t in ts)
        rows.append({"kind": kind, "filler_tokens": n, "trials": len(ts), "tokens_held": max(t["tokens_held"] for t in ts),
                     "correct": sum(t["reread_match"] for t in ts), "reread_hits": sum(t["reread_hit"] for t in ts),
                     "reread_top1_hits": sum(t["reread_top1_hit"] for t in ts),
                     "correct_without_reread": sum(t["memory_read_only_match"] for t in ts),
                     "bm25_correct": sum(t["bm25_match"] for t in ts), "bm25_hits": sum(t["bm25_hit"] for t in ts),
                     "generate_seconds_median": with_r, "generate_seconds_median_without_reread": without,
                     "reread_cost_ratio": with_r / without, "fill_seconds_median": statistics.median(t["fill_seconds"] for t in ts)})
    result = {"shards": args.shards, "filler_tokens_encoded": filler_tokens, "filler_encode_seconds": encode_s,
              "extra_tokens": RECALL_EXTRA_TOKENS, "sidenet_checkpoint": str(resolve_checkpoint(model.config)),
              "memory_read": model.sidenet.memory_read, "overrides": args.set, "by_length": rows, "trials": trials}
    (out / "results.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    table = markdown_table(
        ["kind", "memory tokens N", "trials", "recall, re-reading (default)", "re-read spans hold the answer",
         "best-ranked span holds it",
         "recall, memory read only", "BM25 prompt", "BM25 windows hold the answer", "Generate s (median), re-reading",
         "Generate s, memory read only", "ratio", "fill s (median)"],
        [[r["kind"], f"{r['filler_tokens']:,}", r["trials"], f"{r['correct']}/{r['trials']}",
          f"{r['reread_hits']}/{r['trials']}", f"{r['reread_top1_hits']}/{r['trials']}",
          f"{r['correct_without_reread']}/{r['trials']}",
          f"{r['bm25_correct']}/{r['trials']}", f"{r['bm25_hits']}/{r['trials']}", f"{r['generate_seconds_median']:.2f}",
          f"{r['generate_seconds_median_without_reread']:.2f}", f"{r['reread_cost_ratio']:.2f}x",
          f"{r['fill_seconds_median']:.1f}"] for r in rows])
    (out / "report.md").write_text("\n\n".join([
        "# Recall through the services", __doc__.split("\n\nUsage")[0],
        f"Memories striped over {args.shards} shards (one simulated node each); {filler_tokens:,} tokens of "
        f"unseen filler encoded once ({encode_s:.0f} s), repeating in longer memories; greedy answers "
        f"{RECALL_EXTRA_TOKENS} tokens longer than the answer; overrides {args.set or 'none'}.", table]) + "\n")


if __name__ == "__main__":
    main()
