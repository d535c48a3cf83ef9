"""Memory-augmented adaptation: train the SideNet to read from memory, the backbone frozen.

Each batch row reads a different document, segment after segment, with a memory of its own that
holds that document's earlier segments and is reset when the row moves to the next document (the
official code mixes all rows into one memory and never resets). For each step a row's next segment
is encoded by the frozen backbone, read by the SideNet (retrieving from the row's memory), scored
against its next tokens, and only then appended to the row's memory.

What trains: the memory block and the `train.train_blocks - 1` blocks after it, the gates and the
final norm (`train_blocks = 0`: every block). The checkpoint stores just those, in fp16.

Training documents are real text (held-out documents excluded by a stable hash of their name) mixed
with synthetic key-value recall documents, whose answers are only predictable from far back: the
long-range dependencies that teach the reader to use its memory.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .backbone import Backbone
from .checkpoint import save_checkpoint
from .config import LongMemConfig
from .data import Document, filler_text, load_corpus, recall_document, split_heldout
from .model import LocalReader, build_sidenet, fill_memory, make_bank, pad_segments
from .sidenet import SideNet

log = logging.getLogger("longmem.train")

STATE = "trainer_state.pt"


def trainable_names(sidenet: SideNet, train_blocks: int) -> list[str]:
    first = sidenet.memory_block
    last = sidenet.num_blocks if train_blocks == 0 else min(sidenet.num_blocks, first + train_blocks)
    blocks = range(0 if train_blocks == 0 else first, last)
    prefixes = tuple(f"blocks.{i}." for i in blocks) + ("final_norm.",)
    return [name for name, _ in sidenet.named_parameters() if name.startswith(prefixes)]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then linear decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - min_ratio) * progress


@dataclass
class RowStream:
    """The documents one batch row reads, in a shuffled order of its own, segment by segment."""

    docs: list[Document]
    filler: str
    rng: random.Random
    tokenize: object
    segment_tokens: int
    synthetic_fraction: float
    synthetic_chars: int
    min_doc_tokens: int
    ids: list[int] = field(default_factory=list)
    cursor: int = 0
    documents_read: int = 0

    def _next_document(self) -> list[int]:
        if self.rng.random() < self.synthetic_fraction:
            return self.tokenize(recall_document(self.rng, self.filler, self.synthetic_chars).text)
        ids: list[int] = []
        while len(ids) < self.min_doc_tokens:  # short documents are joined into one
            ids += self.tokenize(self.rng.choice(self.docs).text + "\n\n")
        return ids

    def next_segment(self) -> tuple[list[int], list[int], bool]:
        """(segment, its next-token targets, whether it starts a new document)."""
        new = self.cursor + 1 >= len(self.ids)
        if new:
            self.ids, self.cursor = self._next_document(), 0
            self.documents_read += 1
        w = self.segment_tokens
        segment = self.ids[self.cursor:self.cursor + w]
        targets = self.ids[self.cursor + 1:self.cursor + w + 1]
        self.cursor += w
        return segment[:len(targets)], targets, new


class Trainer:
    def __init__(self, config: LongMemConfig, out_dir: str | Path | None = None):
        self.config = config.validate()
        tc = config.train
        self.out = Path(out_dir or tc.out_dir)
        torch.manual_seed(config.seed)
        self.backbone = Backbone(config.backbone)
        self.sidenet = build_sidenet(self.backbone, config).train()
        self.names = trainable_names(self.sidenet, tc.train_blocks)
        params = dict(self.sidenet.named_parameters())
        self.sidenet.requires_grad_(False)
        for name in self.names:
            params[name].requires_grad_(True)
        self.params = {n: params[n] for n in self.names}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=tc.lr, betas=tuple(tc.betas),
                                           eps=tc.eps, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
        self.bank = make_bank(config, self.backbone)
        self.reader = LocalReader(self.backbone, self.sidenet, self.bank, config)  # its retrieval and SideNet pass
        self.step, self.tokens = 0, 0
        self.rows = self._rows()

    def _rows(self) -> list[RowStream]:
        tc = self.config.train
        docs = [d for spec in tc.corpora for d in load_corpus(spec)]
        train_docs, _ = split_heldout(docs, tc.heldout_fraction)
        if not train_docs:
            raise ValueError(f"no training documents in {tc.corpora}")
        rng = random.Random(self.config.seed)
        filler = filler_text(train_docs, 4 * tc.synthetic_tokens * 8, rng)
        tokenize = lambda text: self.backbone.tokenizer.encode(text, add_special_tokens=False)
        rows = []
        for b in range(tc.batch_rows):
            rows.append(RowStream(train_docs, filler, random.Random(self.config.seed * 1000 + b), tokenize,
                                  self.config.read.segment_tokens, tc.synthetic_fraction,
                                  4 * tc.synthetic_tokens, tc.min_doc_tokens))
            self.bank.create(f"row-{b}")
        return rows

    def meta(self) -> dict:
        return {"backbone": self.config.backbone.name_or_path, "memory_layer": self.sidenet.memory_layer,
                "num_blocks": self.sidenet.num_blocks, "init": self.config.sidenet.init,
                "train_blocks": self.config.train.train_blocks, "trained_parameters": self.names,
                "steps": self.step, "tokens": self.tokens, "segment_tokens": self.config.read.segment_tokens,
                "chunk_size": self.config.memory.chunk_size, "topk_tokens": self.config.memory.topk_tokens,
                "corpora": self.config.train.corpora}

    def save(self) -> None:
        save_checkpoint(self.out / "checkpoint", self.params, self.meta(), self.config.train.checkpoint_dtype)
        torch.save({"params": {n: p.detach().clone() for n, p in self.params.items()},
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "tokens": self.tokens, "torch_rng": torch.get_rng_state(),
                    "rows": [(r.rng.getstate(), r.documents_read) for r in self.rows]}, self.out / STATE)

    def resume(self) -> bool:
        path = self.out / STATE
        if not path.exists():
            return False
        state = torch.load(path, weights_only=False)
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens = state["step"], state["tokens"]
        torch.set_rng_state(state["torch_rng"])
        for row, (rng_state, read) in zip(self.rows, state["rows"]):
            row.rng.setstate(rng_state)  # rows continue with their next documents; memories restart
            row.documents_read = read
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def train_step(self) -> float:
        batch = []
        for b, row in enumerate(self.rows):
            segment, targets, new = row.next_segment()
            if new:
                self.bank.reset(f"row-{b}")
            batch.append((segment, targets))
        device = self.backbone.device
        input_ids = pad_segments([s for s, _ in batch], device)  # [B, T]
        labels = torch.full(input_ids.shape, -100, dtype=torch.long, device=device)
        for b, (_, targets) in enumerate(batch):
            labels[b, :len(targets)] = torch.tensor(targets, device=device)
        out, _ = self.backbone.encode(input_ids)
        state = self.reader.read_state(out, self.reader.retriever([[f"row-{i}"] for i in range(len(batch))]))
        logits = self.backbone.lm_head(state).float()  # [B, T, V]
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        for i, (segment, _) in enumerate(batch):
            fill_memory(self.bank, f"row-{i}", out, i, segment, self.config.memory.sink_tokens)
        self.step += 1
        self.tokens += int((labels != -100).sum())
        return loss.item()

    def run(self, progress: bool = True) -> dict:
        tc = self.config.train
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        start, start_tokens = time.perf_counter(), self.tokens
        history = self.out / "train_log.jsonl"
        bar = tqdm(total=tc.steps, initial=self.step, desc="training", unit="step", disable=not progress)
        stopped = "steps"
        with history.open("a") as log_file:
            while self.step < tc.steps:
                loss = self.train_step()
                elapsed = time.perf_counter() - start
                rate = (self.tokens - start_tokens) / elapsed
                gate = torch.sigmoid(self.sidenet.gate).mean().item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", gate=f"{gate:.3f}")
                log_file.write(json.dumps({"step": self.step, "loss": loss, "tokens": self.tokens,
                                           "lr": self.scheduler.get_last_lr()[0], "gate": gate,
                                           "seconds": elapsed}) + "\n")
                log_file.flush()
                if self.step % tc.checkpoint_every == 0:
                    self.save()
                if tc.max_minutes and elapsed > 60 * tc.max_minutes:
                    stopped = "time"
                    break
        bar.close()
        self.save()
        elapsed = time.perf_counter() - start
        summary = {"steps": self.step, "tokens": self.tokens, "seconds": elapsed, "stopped_by": stopped,
                   "tokens_per_second": (self.tokens - start_tokens) / max(elapsed, 1e-9),
                   "device": str(self.backbone.device), "checkpoint": str(self.out / "checkpoint")}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(config: LongMemConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    return Trainer(config, out_dir).run(progress)
