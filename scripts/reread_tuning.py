"""Chooses how re-reading ranks spans, on the training corpus only (held-out python-docs documents as the
filler), never on the unseen corpora `longmem eval` reports: the passkey and recall parts, run as the
evaluation runs them, for each setting given, with their BM25 baseline on the same items.

Usage: python scripts/reread_tuning.py --out results/reread_tuning --lengths 16384 65536 --trials 10 \
           --setting dense read.reread_lexical_weight=0 --setting mixed read.reread_lexical_weight=0.5 ...
A setting is a name and `--set`-style overrides; `sidenet.checkpoint=null` reads with no trained SideNet.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longmem.config import LongMemConfig
from longmem.evaluate import passkey, recall
from longmem.evaluate.common import EvalData, heldout_documents, jsonable
from longmem.model import LongMem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["passkey", "recall"], choices=["passkey", "recall"])
    parser.add_argument("--setting", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = None
    rows = []
    for name, *overrides in args.setting:
        sizes = [f"eval.{key}={args.lengths}" for key in ("passkey_lengths", "recall_lengths", "person_lengths",
                                                          "unseen_phrasing_lengths", "updated_lengths")]
        trials = [f"eval.{key}={args.trials}" for key in ("passkey_trials", "recall_trials")]
        config = LongMemConfig.load(None, sizes + trials + overrides).validate()
        heldout = heldout_documents(config)
        data = EvalData(heldout, {config.eval.corpus: heldout})
        (out / name).mkdir(exist_ok=True)
        model = LongMem(config, backbone=backbone)
        backbone = model.backbone
        for part, module in (("passkey", passkey), ("recall", recall)):
            if part not in args.parts:
                continue
            t0 = time.perf_counter()
            result = module.run(model, config, data, out / name, progress=False)
            by = result["by_length"] if part == "passkey" else result["by_set"]
            for b in by:
                rows.append({"setting": name, "overrides": overrides, "part": part, "set": b.get("set", "passkey"),
                             "filler_tokens": b["filler_tokens"], "trials": b["trials"], "longmem": b["correct"],
                             "bm25": b["bm25_correct"], "without_memory": b["control_correct"],
                             "reread_hits": sum(t["reread_hit"] for t in result["trials"]
                                                if t["filler_tokens"] == b["filler_tokens"]
                                                and t.get("set", "passkey") == b.get("set", "passkey")),
                             "seconds": time.perf_counter() - t0})
            (out / "tuning.json").write_text(json.dumps(jsonable(rows), indent=1))
            (out / name / f"{part}_trials.json").write_text(json.dumps(jsonable(result["trials"]), indent=1))
            for r in rows[-len(by):]:
                print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
