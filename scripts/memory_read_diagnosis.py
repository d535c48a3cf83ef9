"""Where recall misses come from: the search (the answer's entry not retrieved) or the read (retrieved,
but the memory attention lands elsewhere). Prints numbers and writes them as JSON; not a test.

- curriculum: the training recall examples (python-docs filler) at several memory sizes: greedy exact
  match and the retrieval hit rate (Trainer.recall: the share of (answer token, head) pairs whose
  retrieved entries hold the answer token);
- passkey: the evaluation's pass-key prompt in unseen filler (the essays and the Jargon File),
  teacher-forced: per answer token the hit rate, the memory attention's mass on the key's tokens and
  on the right one, and token and exact-match accuracy.

    .venv/bin/python scripts/memory_read_diagnosis.py --out results/diagnosis/memory_read.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_CONFIG = ROOT / "configs" / "train_recall_kl.yaml"  # the shipped checkpoint's curriculum


def curriculum(sizes: list[int], examples: int, batch: int, seed: int) -> list[dict]:
    from longmem.config import LongMemConfig
    from longmem.train import KINDS, Trainer

    config = LongMemConfig.load(str(TRAIN_CONFIG), ["sidenet.checkpoint=auto", "train.val_every=0"])  # the shipped one
    trainer = Trainer(config, Path("/tmp") / "longmem-diagnosis")
    rng = random.Random(seed)
    rows = []
    for n in sizes:
        filler = trainer._filler_segments(n, rng)
        items = [trainer.curriculum.example(rng, KINDS[i % len(KINDS)]) for i in range(examples)]
        correct, hits = [], []
        for a in range(0, examples, batch):
            result = trainer.recall(items[a:a + batch], filler)
            correct += result.correct
            hits.append(result.hit_rate)
        rows.append({"memory_tokens": n, "examples": examples, "exact_match": float(np.mean(correct)),
                     "hit_rate": float(np.mean(hits))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def passkey(sizes: list[int], trials: int, seed: int) -> list[dict]:
    from longmem.config import LongMemConfig
    from longmem.data import passkey_prompt_parts, random_key
    from longmem.evaluate.common import eval_data
    from longmem.evaluate.harness import unseen_filler
    from longmem.memory import round_up
    from longmem.memory import hits_to_retrieved
    from longmem.model import LongMem
    from longmem.roles import pad_segments
    from longmem.sidenet import memory_log_probs

    config = LongMemConfig.load(None, [])
    model = LongMem(config)
    rng = random.Random(seed)
    filler = unseen_filler(model, config, eval_data(config), sizes, False)
    reader, side = model.reader, model.sidenet
    rows = []
    for n in sizes:
        hit, on_key, on_answer, token_ok, exact = [], [], [], [], []
        for _ in range(trials):
            key = random_key(rng)
            intro, question, answer = passkey_prompt_parts(key)
            intro_ids, q, a = model.tokenize(intro), model.tokenize(question), model.tokenize(answer)
            ids = q + a
            memory = model.create_memory(capacity_tokens=round_up(len(intro_ids) + n, config.memory.chunk_size))
            try:
                filler.fill(memory, intro_ids, n)
                recorded, seen = [], []
                search = reader.retrieval([[memory]], recorded)

                def retrieve(queries: torch.Tensor):  # keeps the memory block's queries
                    seen.append(queries)
                    return search(queries)
                with torch.no_grad():
                    out, _ = model.backbone.encode(pad_segments([ids], model.backbone.device))
                    state = reader.read_state(out, retrieve)
                    predicted = model.backbone.lm_head(state[0]).argmax(-1)
                    probs = memory_log_probs(seen[0].transpose(1, 2).float(), hits_to_retrieved(recorded),
                                             side.memory_scaling)[0].exp().numpy()  # [Hq, T, K]
            finally:
                model.delete_memory(memory)
            hits = recorded[0]
            all_ok = True
            for j in range(len(q), len(ids)):  # the state at j - 1 predicts token j
                tokens = hits.token_ids[j - 1].reshape(hits.token_ids.shape[1], -1)  # [Hq, K]
                in_key = hits.positions[j - 1].reshape(tokens.shape) < len(intro_ids)
                right = in_key & (tokens == ids[j])
                hit.append(right.any(axis=1).mean())
                on_key.append((probs[:, j - 1] * in_key).sum(axis=1).mean())
                on_answer.append((probs[:, j - 1] * right).sum(axis=1).mean())
                ok = int(predicted[j - 1]) == ids[j]
                token_ok.append(ok)
                all_ok &= ok
            exact.append(all_ok)
        rows.append({"filler_tokens": n, "trials": trials, "hit_rate": float(np.mean(hit)),
                     "attention_on_key": float(np.mean(on_key)), "attention_on_answer": float(np.mean(on_answer)),
                     "token_accuracy": float(np.mean(token_ok)), "exact_match": float(np.mean(exact))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curriculum-sizes", default="2048,16384,65536,131072")
    parser.add_argument("--curriculum-examples", type=int, default=24)
    parser.add_argument("--passkey-sizes", default="4096,16384,65536")
    parser.add_argument("--passkey-trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="results/diagnosis/memory_read.json")
    args = parser.parse_args()
    ints = lambda text: [int(x) for x in text.split(",")]
    torch.set_grad_enabled(False)
    result = {"checkpoint": "shipped (longmem/checkpoints/smollm2-135m)",
              "curriculum": curriculum(ints(args.curriculum_sizes), args.curriculum_examples, 8, args.seed),
              "passkey": passkey(ints(args.passkey_sizes), args.passkey_trials, args.seed)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
