"""Pass keys recalled through the services from memories of up to a million tokens striped over several
shards of a simulated cluster, asked over gRPC with Generate; and what re-reading costs a Generate.

Each trial: a fresh memory striped over --shards shards (a ray.cluster_utils.Cluster with one node per
shard: services/chaos.simulated_cluster); its pass-key intro goes in over gRPC (Append), then N tokens of
unseen filler whose keys/values this process encoded once (evaluate.harness.FillerMemory) go to the shards
through the bank (RemoteBank.append, under the insecure local mode's tenant), exactly as Append would have put them (the filler alone never
depends on what precedes it). The question is asked over gRPC with Generate, greedy, with re-reading and
without it; a trial counts when the answer is the key. Latency is the wall time of the whole Generate call.

Usage: python scripts/recall_services.py --out results/recall_services --lengths 65536 1048576 --trials 5 \
           --shards 4 --filler-tokens 262144 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from longmem.client import LongMemClient
from longmem.config import LongMemConfig
from longmem.data import passkey_prompt_parts, random_key
from longmem.evaluate.common import eval_data, jsonable
from longmem.evaluate.harness import FillerMemory, answer_matches, passkey_filler_ids
from longmem.memory import round_up
from longmem.model import LongMem
from longmem.report import markdown_table
from services.auth import LOCAL_TENANT, scope
from services.bank import RemoteBank
from services.bench.common import free_port
from services.chaos import simulated_cluster

NEW_TOKENS = 6  # greedy tokens per answer: a 5-digit key is 2-3 tokens, and a longer answer shows


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


def ask(client: LongMemClient, memory_id: str, question: str, reread: bool) -> tuple[str, float, list]:
    """Generate over gRPC: (text, seconds, the re-read spans of the first chunk)."""
    t0 = time.perf_counter()
    chunks = list(client.generate(question, memory_id=memory_id, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                  reread=reread))
    return "".join(c.text for c in chunks), time.perf_counter() - t0, list(chunks[0].reread) if chunks else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 1048576])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--filler-tokens", type=int, default=262144, help="unique filler encoded once; longer memories repeat it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = LongMemConfig.load(None, [f"serve.num_shards={args.shards}", f"serve.grpc_port={free_port()}",
                                       f"serve.http_port={free_port()}", *args.set]).validate()
    rng = random.Random(config.eval.seed)
    model = LongMem(config)
    filler = FillerMemory(model, passkey_filler_ids(model, eval_data(config).unseen_documents, args.filler_tokens, rng))
    filler_text = model.decode(filler.ids)
    intro_tokens = len(model.tokenize(passkey_prompt_parts(random_key(random.Random(0)))[0]))
    t0 = time.perf_counter()
    filler.encoded(filler.phase(intro_tokens, max(args.lengths)))  # before the cluster takes the cores
    encode_s = time.perf_counter() - t0
    question = passkey_prompt_parts("0")[1]
    trials = []
    with simulated_cluster(config) as sim, LongMemClient(sim.target) as client:
        client.wait_ready(timeout_s=600)
        bank = RemoteBank(config)
        for n in args.lengths:
            for _ in range(args.trials):
                key = random_key(rng)
                while key in filler_text:
                    key = random_key(rng)
                intro = model.tokenize(passkey_prompt_parts(key)[0])
                capacity = round_up(len(intro) + n, config.memory.chunk_size)
                memory_id = client.create_memory(capacity_tokens=capacity, num_shards=args.shards).memory_id
                t0 = time.perf_counter()
                filler.fill(memory_id, intro, n, encoder=AppendOverGrpc(client), bank=ScopedBank(bank, LOCAL_TENANT))
                fill_s = time.perf_counter() - t0
                info = client.get_memory(memory_id)
                trial = {"filler_tokens": n, "key": key, "tokens_held": info.tokens_held, "shards": info.num_shards,
                         "fill_seconds": fill_s}
                for reread in (True, False):
                    text, seconds, spans = ask(client, memory_id, question, reread)
                    name = "reread" if reread else "memory_read_only"
                    trial.update({f"{name}_generated": text, f"{name}_match": answer_matches(text, key),
                                  f"{name}_seconds": seconds})
                    if reread:
                        trial["reread_spans"] = [[s.start_position, s.end_position] for s in spans]
                        trial["reread_hit"] = any(key in s.text for s in spans)
                client.delete_memory(memory_id)
                trials.append(trial)
                print(json.dumps(trial), flush=True)
                write(out, config, args, encode_s, len(filler.ids), trials)


def write(out: Path, config: LongMemConfig, args, encode_s: float, filler_tokens: int, trials: list[dict]) -> None:
    rows = []
    for n in sorted({t["filler_tokens"] for t in trials}):
        ts = [t for t in trials if t["filler_tokens"] == n]
        with_r = statistics.median(t["reread_seconds"] for t in ts)
        without = statistics.median(t["memory_read_only_seconds"] for t in ts)
        rows.append({"filler_tokens": n, "trials": len(ts), "tokens_held": max(t["tokens_held"] for t in ts),
                     "correct": sum(t["reread_match"] for t in ts), "reread_hits": sum(t["reread_hit"] for t in ts),
                     "correct_without_reread": sum(t["memory_read_only_match"] for t in ts),
                     "generate_seconds_median": with_r, "generate_seconds_median_without_reread": without,
                     "reread_cost_ratio": with_r / without, "fill_seconds_median": statistics.median(t["fill_seconds"] for t in ts)})
    result = {"shards": args.shards, "filler_tokens_encoded": filler_tokens, "filler_encode_seconds": encode_s,
              "new_tokens": NEW_TOKENS, "sidenet_checkpoint": config.sidenet.checkpoint,
              "memory_read": config.sidenet.memory_read, "overrides": args.set, "by_length": rows, "trials": trials}
    (out / "results.json").write_text(json.dumps(jsonable(result), indent=1) + "\n")
    table = markdown_table(
        ["memory tokens N", "trials", "recall, re-reading (default)", "re-read spans hold the key",
         "recall, memory read only", "Generate s (median), re-reading", "Generate s, memory read only", "ratio",
         "fill s (median)"],
        [[f"{r['filler_tokens']:,}", r["trials"], f"{r['correct']}/{r['trials']}", f"{r['reread_hits']}/{r['trials']}",
          f"{r['correct_without_reread']}/{r['trials']}", f"{r['generate_seconds_median']:.2f}",
          f"{r['generate_seconds_median_without_reread']:.2f}", f"{r['reread_cost_ratio']:.2f}x",
          f"{r['fill_seconds_median']:.1f}"] for r in rows])
    (out / "report.md").write_text("\n\n".join([
        "# Pass keys through the services", __doc__.split("\n\nUsage")[0],
        f"Memories striped over {args.shards} shards (one simulated node each); {filler_tokens:,} tokens of "
        f"unseen filler encoded once ({encode_s:.0f} s), repeating in longer memories; {NEW_TOKENS} greedy tokens "
        f"per answer; overrides {args.set or 'none'}.", table]) + "\n")


if __name__ == "__main__":
    main()
