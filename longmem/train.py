"""Memory-augmented adaptation: train the SideNet to read from memory, the backbone frozen.

Every step sums these losses, weighted by `train.lm_weight`, `train.distill_weight`,
`train.recall_weight` and `train.retrieval_weight`:
- Language modelling. Each of `train.batch_rows` rows reads a different long document, segment after
  segment, with a memory of its own that holds that document's earlier segments and is reset when the
  row moves to the next document (the official code mixes all rows into one memory and never resets).
  A segment is read by the SideNet (retrieving from the row's memory), scored on `lm_loss_tokens`
  random positions, and only then appended to the row's memory.
- Distillation (`train.distill_weight`), at the same positions: KL(backbone || SideNet) of the
  next-token distributions, the backbone's from its last hidden state (in the cache). Without it the
  trained blocks drift from the backbone's language modelling on text unlike the training corpus.
- Recall curriculum (longmem/curriculum.py). `train.recall_rows` examples, each a fact segment in a
  memory of its own, searched together with a memory of cached filler segments shared by the batch
  (its size grows over training, `recall_memory_tokens`), and a short reading segment scored on the
  answer tokens only: a focused signal to read what is retrieved.
- Retrieval loss (`train.retrieval_weight`), on the same examples: at the query of each answer token,
  the memory block's attention over its retrieved entries (every head) should fall on the fact
  memory's entries holding that token. It teaches the queries directly: through the answer loss alone
  they learn only once the zero-initialised output projection has grown, a long plateau.
  The share of (answer token, head) pairs whose retrieved entries hold the answer token is logged
  as `retrieval_hit` (`val_*_hit` for the validation sets): it tells a search that missed from a
  read that missed.

Frozen-backbone cache (longmem/cache.py). Only SideNet blocks from the memory block on train, so what
they read for a document segment never changes: the training documents (`lm_tokens` of them) are
encoded once, before the first step, and read back from disk for every epoch; their memory-layer
keys/values are also the curriculum's filler. Only fact and reading segments, new in every example, go
through the backbone during training.

What trains: the memory block and the `train.train_blocks - 1` blocks after it, the gates and the
blocks' output projections (with learning rates of their own, `gate_lr` and `output_lr`) and the final
norm (`train_blocks = 0`: every block); with `sidenet.memory_read: added`, only the memory block outside
its MLP (its attention and norms) and the gates. The checkpoint stores just those, in fp16. Progress, with the
recall validation every `val_every` steps, goes to `train_log.jsonl` in the run directory, its curves
to `train_curves.png`; the full configuration to `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from . import layers
from .backbone import Backbone
from .cache import FrozenEncoder
from .checkpoint import read_meta, resolve_checkpoint, save_checkpoint, stored_parameters
from .config import LongMemConfig, TrainConfig
from .curriculum import KINDS, Curriculum, RecallExample, curriculum_config
from .data import Document, load_corpus, split_heldout
from .encoder import LocalEncoder
from .model import make_bank
from .reader import LocalReader, build_sidenet
from .roles import fill_memory, segments
from .memory import ChunkHits, Retrieved, round_up
from .sidenet import FrozenInputs, SideNet, memory_log_probs

log = logging.getLogger("longmem.train")

STATE = "trainer_state.pt"
CURVES = "train_curves.png"
FILLER = "filler"  # the curriculum's shared filler memory
def trainable_names(sidenet: SideNet, train_blocks: int) -> list[str]:
    if sidenet.memory_read == "added":  # the memory block outside its MLP (output biases stay zero), the gates
        if train_blocks != 1:
            raise ValueError(f"sidenet.memory_read 'added' trains the memory block only: train.train_blocks must "
                             f"be 1, not {train_blocks}")
        block = sidenet.blocks[sidenet.memory_block]
        prefix = f"{sidenet.block_prefix(sidenet.memory_block)}layer."
        names = {id(m): n for n, m in block.layer.named_modules()}
        attention = names[id(layers.attention_of(block.layer))]
        # the block's other output projection stays zero, and so does the module holding it (its MLP)
        others = [n for n in block.outputs if not n.startswith(f"{attention}.")]
        mlps = tuple(f"{prefix}{n}." for n in others) + tuple(f"{prefix}{n.rpartition('.')[0]}." for n in others if "." in n)
        fixed = {f"{prefix}{n}.bias" for n in block.outputs}
        return [name for name, _ in sidenet.named_parameters()
                if (name.startswith(prefix) and not name.startswith(mlps) and name not in fixed) or name == "gate"]
    first = first_trained_block(sidenet, train_blocks)
    last = sidenet.num_blocks if train_blocks == 0 else min(sidenet.num_blocks, first + train_blocks)
    prefixes = tuple(sidenet.block_prefix(i) for i in range(first, last)) + (sidenet.final_norm_prefix(),)
    return [name for name, _ in sidenet.named_parameters() if name.startswith(prefixes) or name == "gate"]


def first_trained_block(sidenet: SideNet, train_blocks: int) -> int:
    return 0 if train_blocks == 0 else sidenet.memory_block


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then linear decay to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - min_ratio) * progress


def memory_tokens(step: int, tc: TrainConfig, rng: random.Random) -> int:
    """Filler tokens in the curriculum's memory at `step`: log-uniform between recall_memory_tokens[0]
    and a top that grows log-linearly to recall_memory_tokens[1] over the first recall_ramp_fraction
    of the steps."""
    low, high = tc.recall_memory_tokens
    progress = min(1.0, step / max(1.0, tc.recall_ramp_fraction * tc.steps))
    top = low * (high / low) ** progress
    return round(math.exp(rng.uniform(math.log(low), math.log(top))))


def document_segments(ids: list[int], w: int) -> list[list[int]]:
    """The W-token segments a document is read in (its last token is only ever a target)."""
    return segments(ids[:-1], w)


def lm_documents(docs: list[Document], tokenize, tc: TrainConfig, rng: random.Random) -> list[list[int]]:
    """Token ids of the language-modelling documents: at least min_doc_tokens long, cut at
    max_doc_tokens, in a seeded order until they hold lm_tokens tokens (0: all)."""
    order = list(docs)
    rng.shuffle(order)
    chosen: list[list[int]] = []
    total = 0
    for doc in order:
        if tc.lm_tokens and total >= tc.lm_tokens:
            break
        ids = tokenize(doc.text)
        if len(ids) >= tc.min_doc_tokens:
            chosen.append(ids[:tc.max_doc_tokens])
            total += len(chosen[-1])
    return chosen


@dataclass
class RowStream:
    """The documents one batch row reads, in a random order of its own, segment by segment."""

    docs: list[list[int]]
    rng: random.Random
    segment_tokens: int
    ids: list[int] = field(default_factory=list)
    cursor: int = 0
    documents_read: int = 0

    def next_segment(self) -> tuple[list[int], list[int], bool]:
        """(segment, its next-token targets, whether it starts a new document)."""
        new = self.cursor + 1 >= len(self.ids)
        if new:
            self.ids, self.cursor = self.rng.choice(self.docs), 0
            self.documents_read += 1
        w = self.segment_tokens
        segment = self.ids[self.cursor:self.cursor + w]
        targets = self.ids[self.cursor + 1:self.cursor + w + 1]
        self.cursor += w
        return segment[:len(targets)], targets, new


def memory_share_loss(queries: torch.Tensor, memory: Retrieved, scaling: float, rows: list[int], cols: list[int],
                      positive: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Mean over the (query, head) pairs at (rows[i], cols[i]) of -log of the memory attention on the
    retrieved entries `positive` marks, pairs with no such entry retrieved adding nothing; the share of
    pairs that retrieved one (the hit rate); and the share whose most attended entry is one.

    queries: [B, T, Hq, d] the memory block's pre-rotary queries, memory what they retrieved and scaling
    the attention's (SideNet.memory_scaling); positive: [N, Hq, K] bool."""
    log_probs = memory_log_probs(queries.transpose(1, 2), memory, scaling)  # [B, Hq, T, K]
    picked = log_probs[rows, :, cols]  # [N, Hq, K]
    positive = positive.to(picked.device)
    found = positive.any(dim=-1)  # [N, Hq]
    top = positive.gather(-1, picked.argmax(dim=-1, keepdim=True)).squeeze(-1)  # [N, Hq]
    if not found.any():
        return picked.new_zeros(()), 0.0, 0.0
    on_positive = picked.masked_fill(~positive, float("-inf")).logsumexp(dim=-1)  # [N, Hq]
    return -on_positive[found].mean(), found.float().mean().item(), top.float().mean().item()


def retrieval_loss(queries: torch.Tensor, memory: Retrieved, scaling: float, hits: list[ChunkHits],
                   sources: list[np.ndarray], source: int, rows: list[int], cols: list[int],
                   targets: list[int]) -> tuple[torch.Tensor, float]:
    """memory_share_loss on the entries of memory `source` that hold the target token, and its hit rate:
    the query at (rows[i], cols[i]) predicts token targets[i]; hits, sources: each row's ChunkHits and
    the memory each hit came from (MemoryBank.search)."""
    c = hits[0].token_ids.shape[-1]
    positive = torch.stack([torch.from_numpy(
        (hits[b].token_ids[j].reshape(len(hits[b].token_ids[j]), -1) == target)  # [Hq, k, c] -> [Hq, K]
        & (sources[b][j] == source).repeat(c, axis=-1))
        for b, j, target in zip(rows, cols, targets)])  # [N, Hq, K]
    loss, hit_rate, _ = memory_share_loss(queries, memory, scaling, rows, cols, positive)
    return loss, hit_rate


def ranking_loss(queries: torch.Tensor, memory: Retrieved, scaling: float, hits: list[ChunkHits],
                 sources: list[np.ndarray], source: int, rows: list[int], cols: list[int],
                 spans: list[tuple[int, int]]) -> tuple[torch.Tensor, float]:
    """The span-ranking loss: memory_share_loss on every entry of the retrieved chunks of memory `source`
    that hold a token of the answer's statement (stream positions spans[i] = [start, end)), against every
    other retrieved chunk (other statements, the filler); the query at (rows[i], cols[i]) is a token of
    the question. Also the share of (query, head) pairs whose most attended entry is in such a chunk."""
    c = hits[0].token_ids.shape[-1]
    positive = []
    for b, j, (start, end) in zip(rows, cols, spans):
        positions = hits[b].positions[j]  # [Hq, k, c]
        in_span = ((positions >= start) & (positions < end)).any(axis=-1) & (sources[b][j] == source)  # [Hq, k]
        positive.append(torch.from_numpy(in_span.repeat(c, axis=-1)))  # [Hq, K]
    loss, _, top = memory_share_loss(queries, memory, scaling, rows, cols, torch.stack(positive))
    return loss, top


@dataclass
class RecallBatch:
    loss: torch.Tensor  # mean cross-entropy over the answer tokens
    retrieval: torch.Tensor  # retrieval_loss of the answer tokens
    hit_rate: float  # share of (answer token, head) pairs whose retrieved entries hold the answer token
    ranking: torch.Tensor  # ranking_loss of the question tokens
    ranking_top: float  # share of (question token, head) pairs most attending to the answer's statement
    correct: list[bool]  # per example: every answer token is the argmax (greedy exact match)
    filler_tokens: int  # tokens held by the filler memory


class Trainer:
    def __init__(self, config: LongMemConfig, out_dir: str | Path | None = None):
        self.config = config.validate()
        if config.backbone.dtype not in ("float32", "auto"):
            raise ValueError(f"training needs backbone.dtype float32 (got {config.backbone.dtype!r}): the "
                             "trained blocks, their optimizer state and the cache assume it")
        tc = config.train
        if tc.init_checkpoint and config.sidenet.checkpoint:
            raise ValueError("train.init_checkpoint starts a run from another checkpoint's parameters: "
                             "sidenet.checkpoint must then be null")
        self.out = Path(out_dir or tc.out_dir)
        torch.manual_seed(config.seed)
        self.backbone = Backbone(dataclasses.replace(config.backbone, dtype="float32"))  # "auto" trains in float32 too
        self.sidenet = build_sidenet(self.backbone, config).train()
        self.names = trainable_names(self.sidenet, tc.train_blocks)
        params = dict(self.sidenet.named_parameters())
        self.sidenet.requires_grad_(False)
        for name in self.names:
            params[name].requires_grad_(True)
        self.params = {n: params[n] for n in self.names}
        self._start_from(tc.init_checkpoint)
        gate = "gate"
        outputs = [n for n in self.sidenet.output_parameter_names() if n in self.params]
        groups = [{"params": [p for n, p in self.params.items() if n != gate and n not in outputs], "lr": tc.lr},
                  {"params": [self.params[n] for n in outputs], "lr": tc.output_lr},
                  {"params": [self.params[gate]], "lr": tc.gate_lr}]
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps, tc.min_lr_ratio))
        self.bank = make_bank(config, self.backbone)
        self.reader = LocalReader(self.backbone, self.sidenet, self.bank, config)  # its retrieval and SideNet pass
        self.encoder = LocalEncoder(self.backbone, self.bank, config)  # fact segments: keys/values only
        cache_dir = (tc.cache_dir or self.out / "cache") if tc.cache else None
        self.frozen = FrozenEncoder(self.reader, first_trained_block(self.sidenet, tc.train_blocks), cache_dir,
                                    tc.cache_dtype)
        self.step, self.tokens, self.examples = 0, 0, 0
        self.rng = random.Random(config.seed)  # the curriculum's draws
        self.metrics: dict[str, float] = {}
        self._data()

    @torch.no_grad()
    def _start_from(self, spec: str | None) -> None:
        """Copies a checkpoint's stored parameters into the trained ones of the same names (train.init_checkpoint)."""
        path = resolve_checkpoint(self.config, spec) if spec else None
        if spec and path is None:
            raise ValueError(f"train.init_checkpoint {spec!r}: no shipped checkpoint for this backbone")
        if path is None:
            return
        shared = {n: t for n, t in stored_parameters(self.sidenet, path, read_meta(path)).items() if n in self.params}
        if not shared:
            raise ValueError(f"train.init_checkpoint {path} stores none of the parameters this run trains")
        for name, value in shared.items():
            self.params[name].copy_(value.to(self.params[name].dtype))
        log.info("started %d of %d trained parameters from %s", len(shared), len(self.params), path)

    def tokenize(self, text: str) -> list[int]:
        return self.backbone.tokenizer.encode(text, add_special_tokens=False)

    def _data(self) -> None:
        tc, w = self.config.train, self.config.read.segment_tokens
        docs = [d for spec in tc.corpora for d in load_corpus(spec, self.config.corpus)]
        train_docs, _ = split_heldout(docs, tc.heldout_fraction)
        self.docs = lm_documents(train_docs, self.tokenize, tc, random.Random(self.config.seed))
        if not self.docs:
            raise ValueError(f"no training documents of at least {tc.min_doc_tokens} tokens in {tc.corpora}")
        self.rows = [RowStream(self.docs, random.Random(self.config.seed * 1000 + b), w)
                     for b in range(tc.batch_rows)]
        for b in range(tc.batch_rows):
            self.bank.create(f"row-{b}")
        self.pool = [seg for ids in self.docs for seg in document_segments(ids, w)]
        self.curriculum = Curriculum(self.pool, self.tokenize, self.backbone.tokenizer.decode,
                                     curriculum_config(self.config, w))
        largest = max([tc.recall_memory_tokens[1], tc.val_heldout_tokens, *tc.val_memory_tokens])
        c = self.config.memory.chunk_size
        self.bank.create(FILLER, round_up(largest + w, c))
        for b in range(max(tc.recall_rows, tc.val_items)):
            self.bank.create(f"facts-{b}", round_up(w, c))
        rng = random.Random(self.config.seed + 1)  # the validation items, the same in every run
        sets = [(f"val_{n}", n, False) for n in tc.val_memory_tokens] + [
            (f"val_unseen_{tc.val_heldout_tokens}", tc.val_heldout_tokens, True)]
        self.val_sets = [(name, self._filler_segments(n, rng),
                          [self.curriculum.example(rng, KINDS[i % len(KINDS)], heldout) for i in range(tc.val_items)])
                         for name, n, heldout in sets] if tc.val_every else []
        if tc.recall_reread_share > 0:  # the same items as re-reading answers them (their filler is not searched)
            self.val_sets += [(name.replace("val_", "val_reread_", 1), filler,
                               [self.curriculum.reread(rng, e) for e in examples])
                              for name, filler, examples in self.val_sets]

    def _filler_segments(self, tokens: int, rng: random.Random) -> list[int]:
        """Pool indices of distinct random segments holding about `tokens` tokens."""
        return rng.sample(range(len(self.pool)), min(len(self.pool), math.ceil(tokens / self.config.read.segment_tokens)))

    def warm_cache(self, progress: bool = False) -> int:
        """Encodes every training segment not yet in the cache; returns how many were encoded."""
        if self.frozen.dir is None:
            return 0
        todo = [seg for seg in self.pool if not self.frozen.cached(seg)]
        for seg in tqdm(todo, desc="caching segments", unit="segment", disable=not progress):
            self.frozen.encode([seg])
        return len(todo)

    def meta(self) -> dict:
        return {"format": 2, "backbone": self.config.backbone.name_or_path, "memory_layer": self.sidenet.memory_layer,
                "num_blocks": self.sidenet.num_blocks, "init": self.config.sidenet.init,
                "memory_read": self.sidenet.memory_read,
                "train_blocks": self.config.train.train_blocks, "trained_parameters": self.names,
                "steps": self.step, "tokens": self.tokens, "recall_examples": self.examples,
                "segment_tokens": self.config.read.segment_tokens,
                "chunk_size": self.config.memory.chunk_size, "topk_tokens": self.config.memory.topk_tokens,
                "corpora": self.config.train.corpora, "train": dataclasses.asdict(self.config.train)}

    def save(self) -> None:
        save_checkpoint(self.out / "checkpoint", self.params, self.meta(), self.config.train.checkpoint_dtype)
        torch.save({"params": {n: p.detach().clone() for n, p in self.params.items()},
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "tokens": self.tokens, "examples": self.examples,
                    "torch_rng": torch.get_rng_state(), "rng": self.rng.getstate(),
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
        self.step, self.tokens, self.examples = state["step"], state["tokens"], state["examples"]
        torch.set_rng_state(state["torch_rng"])
        self.rng.setstate(state["rng"])
        for row, (rng_state, read) in zip(self.rows, state["rows"]):
            row.rng.setstate(rng_state)  # rows continue with their next documents; memories restart
            row.documents_read = read
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _token_loss(self, state: torch.Tensor, rows: list[int], cols: list[int],
                    targets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy of targets[i] predicted at state[rows[i], cols[i]] (state: [B, T, D]), whether
        each is the argmax, and the logits: ([], [N] bool, [N, V])."""
        logits = self.backbone.lm_head(state[rows, cols]).float()  # [N, V]
        target = torch.tensor(targets, device=logits.device)
        return F.cross_entropy(logits, target), logits.argmax(-1) == target, logits

    def lm_loss(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Next-token loss of each row's next segment (then appended to the row's memory), its KL from
        the backbone's next-token distribution at the same positions, tokens read."""
        batch = []
        for b, row in enumerate(self.rows):
            segment, targets, new = row.next_segment()
            if new:
                self.bank.reset(f"row-{b}")
            batch.append((segment, targets))
        inputs = self.frozen.encode([s for s, _ in batch])  # FrozenInputs [B, T, ...]
        state = self.reader.read_state(inputs, self.reader.retrieval([[f"row-{b}"] for b in range(len(batch))]))
        rows, cols, targets = [], [], []
        k = self.config.train.lm_loss_tokens
        for b, (row, (_, tgt)) in enumerate(zip(self.rows, batch)):
            picked = sorted(row.rng.sample(range(len(tgt)), k)) if 0 < k < len(tgt) else range(len(tgt))
            rows += [b] * len(picked)
            cols += picked
            targets += [tgt[i] for i in picked]
        loss, _, logits = self._token_loss(state, rows, cols, targets)
        student = F.log_softmax(logits, dim=-1)  # [N, V]
        with torch.no_grad():
            teacher = F.log_softmax(self.backbone.logits(inputs.hidden[-1][rows, cols]).float(), dim=-1)  # [N, V]
        distill = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
        for b, (segment, _) in enumerate(batch):
            fill_memory(self.bank, f"row-{b}", inputs, b, segment, self.config.memory.sink_tokens)
        return loss, distill, sum(len(s) for s, _ in batch)

    def recall(self, examples: list[RecallExample], filler: list[int]) -> RecallBatch:
        """Reads a batch of examples, each with its fact segment in memory facts-b searched together
        with the filler memory holding the pool segments `filler`."""
        sink = self.config.memory.sink_tokens
        self.bank.reset(FILLER)
        for i in filler:
            fill_memory(self.bank, FILLER, self.frozen.memory(self.pool[i]), 0, self.pool[i], sink)
        for b, e in enumerate(examples):  # one at a time: fact segments differ much in length
            self.bank.reset(f"facts-{b}")
            self.encoder.ingest(f"facts-{b}", [e.fact_segment])
        inputs: FrozenInputs = self.frozen.encode_fresh([e.reading for e in examples])
        hits, sources, seen = [], [], []
        # a re-read example's memory is its spans alone (read.reread_memory_read "spans"); source 0: the facts
        search = self.reader.retrieval([[f"facts-{b}"] + ([] if e.reread else [FILLER]) for b, e in enumerate(examples)],
                                       hits, sources)

        def retrieve(queries: torch.Tensor) -> Retrieved:  # keeps the memory block's queries
            seen.append((queries, search(queries)))
            return seen[-1][1]
        state = self.reader.read_state(inputs, retrieve)
        rows, cols, targets, owner = [], [], [], []
        for b, e in enumerate(examples):
            n = len(e.reading)
            for j in range(n - e.answer_tokens, n):  # the state at j - 1 predicts token j
                rows.append(b)
                cols.append(j - 1)
                targets.append(e.reading[j])
                owner.append(b)
        loss, hit, _ = self._token_loss(state, rows, cols, targets)
        owner_t = torch.tensor(owner, device=hit.device)
        correct = [bool(hit[owner_t == b].all()) for b in range(len(examples))]
        (queries, memory), = seen
        retrieval, hit_rate = retrieval_loss(queries, memory, self.sidenet.memory_scaling, hits, sources, 0, rows,
                                             cols, targets)
        asking = [(b, j, e.answer_span) for b, e in enumerate(examples)
                  for j in range(len(e.reading) - e.answer_tokens - e.question_tokens, len(e.reading) - e.answer_tokens)]
        ranking, ranking_top = ranking_loss(queries, memory, self.sidenet.memory_scaling, hits, sources, 0,
                                            *map(list, zip(*asking)))
        return RecallBatch(loss, retrieval, hit_rate, ranking, ranking_top, correct, self.bank.stats(FILLER).tokens_held)

    def train_step(self) -> float:
        """One optimiser step; returns the weighted loss and leaves its parts in self.metrics."""
        tc = self.config.train
        terms = []
        self.metrics = {}
        if tc.batch_rows:
            lm, distill, tokens = self.lm_loss()
            terms.append(tc.lm_weight * lm + tc.distill_weight * distill)
            self.tokens += tokens
            self.metrics.update(lm_loss=lm.item(), distill_loss=distill.item())
        if tc.recall_rows:
            kinds = list(tc.recall_kinds)
            picked = self.rng.choices(kinds, weights=[tc.recall_kinds[k] for k in kinds], k=tc.recall_rows)
            examples = [self.curriculum.example(self.rng, kind) for kind in picked]
            examples = [self.curriculum.reread(self.rng, e) if self.rng.random() < tc.recall_reread_share else e
                        for e in examples]
            batch = self.recall(examples, self._filler_segments(memory_tokens(self.step, tc, self.rng), self.rng))
            terms.append(tc.recall_weight * batch.loss + tc.retrieval_weight * batch.retrieval
                         + tc.ranking_weight * batch.ranking)
            self.tokens += sum(len(e.reading) for e in examples)
            self.examples += len(examples)
            self.metrics.update(recall_loss=batch.loss.item(), retrieval_loss=batch.retrieval.item(),
                                retrieval_hit=batch.hit_rate, ranking_loss=batch.ranking.item(),
                                ranking_top=batch.ranking_top,
                                recall_acc=sum(batch.correct) / len(examples),
                                memory_tokens=batch.filler_tokens)
        loss = sum(terms)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Greedy exact-match accuracy of each validation set, and its retrieval hit rate (`_hit`)."""
        results = {}
        for name, filler, examples in self.val_sets:
            batch = self.recall(examples, filler)
            results[name] = sum(batch.correct) / len(examples)
            results[f"{name}_hit"] = batch.hit_rate
        return results

    def run(self, progress: bool = True) -> dict:
        tc = self.config.train
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.resume()
        t0 = time.perf_counter()
        encoded = self.warm_cache(progress)
        cache_seconds = time.perf_counter() - t0
        log.info("cache: %d segments encoded in %.0f s, %d in all", encoded, cache_seconds, len(self.pool))
        start, start_tokens = time.perf_counter(), self.tokens
        history = self.out / "train_log.jsonl"
        last = min(tc.steps, tc.stop_step) if tc.stop_step else tc.steps
        bar = tqdm(total=last, initial=self.step, desc="training", unit="step", disable=not progress)
        stopped = "steps"
        with history.open("a") as log_file:
            while self.step < last:
                loss = self.train_step()
                elapsed = time.perf_counter() - start
                rate = (self.tokens - start_tokens) / elapsed
                gate = torch.sigmoid(self.sidenet.gate).mean().item()
                record = {"step": self.step, "loss": loss, **self.metrics, "tokens": self.tokens,
                          "recall_examples": self.examples, "lr": self.scheduler.get_last_lr()[0], "gate": gate,
                          "tokens_per_second": rate, "seconds": elapsed}
                if tc.val_every and self.step % tc.val_every == 0:
                    record.update(self.validate())
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", gate=f"{gate:.3f}",
                                **{k[4:]: f"{v:.2f}" for k, v in record.items() if k.startswith("val_")})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if self.step % tc.checkpoint_every == 0:
                    self.save()
                if tc.max_minutes and elapsed > 60 * tc.max_minutes:
                    stopped = "time"
                    break
        bar.close()
        self.save()
        elapsed = time.perf_counter() - start
        summary = {"steps": self.step, "tokens": self.tokens, "recall_examples": self.examples,
                   "seconds": elapsed, "stopped_by": stopped,
                   "tokens_per_second": (self.tokens - start_tokens) / max(elapsed, 1e-9),
                   "cache_segments": len(self.pool), "cache_segments_encoded": encoded,
                   "cache_seconds": cache_seconds, "device": str(self.backbone.device),
                   "checkpoint": str(self.out / "checkpoint")}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(history, self.out / CURVES)
        return summary


def plot_curves(history: Path, out: Path, window: int = 25) -> None:
    """The run's learning curves from its train_log.jsonl: the losses (moving averages over `window`
    steps) and the recall validation accuracies and mean gate at each validation step."""
    from .evaluate.common import figure

    records = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    fig = figure(11, 4)[0]
    fig.clear()
    losses, accuracy = fig.subplots(1, 2)
    for key in ("lm_loss", "distill_loss", "recall_loss", "retrieval_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values
            losses.plot(steps[len(steps) - len(smooth):], smooth, label=key)
    losses.set_xlabel("step")
    losses.set_title(f"losses (moving average, {window} steps)", fontsize=10)
    losses.legend(fontsize=8)
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    for key in sorted({k for r in val for k in r if k.startswith("val_")}):
        accuracy.plot([r["step"] for r in val if key in r], [r[key] for r in val if key in r], marker=".", label=key)
    if val:
        accuracy.plot([r["step"] for r in val], [r["gate"] for r in val], color="gray", linestyle="--",
                      label="mean gate σ(g)")
    accuracy.set_ylim(0, 1)
    accuracy.set_xlabel("step")
    accuracy.set_title("recall validation: greedy exact match, retrieval hit rate (_hit)", fontsize=10)
    accuracy.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def train(config: LongMemConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    return Trainer(config, out_dir).run(progress)
