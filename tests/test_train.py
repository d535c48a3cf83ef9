"""Training on a tiny random model: what trains, what stays frozen, memories per row, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from longmem.config import LongMemConfig
from longmem.model import LongMem
from longmem.reader import build_sidenet
from longmem.sidenet import SideNet
from longmem.train import Trainer, lr_factor, trainable_names


def tiny_config(model_dir, **train) -> LongMemConfig:
    return LongMemConfig.from_dict({
        "backbone": {"name_or_path": str(model_dir)},
        "read": {"segment_tokens": 256},
        "memory": {"capacity_tokens": 1024, "topk_tokens": 8},
        "sidenet": {"init": "zero", "checkpoint": None},
        "train": {"corpora": ["essays"], "steps": 4, "batch_rows": 2, "lm_tokens": 3000, "min_doc_tokens": 64,
                  "max_doc_tokens": 1200, "lm_loss_tokens": 48, "recall_rows": 2, "recall_memory_tokens": [256, 1024],
                  "recall_prefix_tokens": 8, "recall_gap_tokens": 4, "recall_suffix_tokens": 4,
                  "recall_local_tokens": 8, "recall_max_facts": 2, "val_every": 2, "val_items": 3,
                  "val_memory_tokens": [256], "val_heldout_tokens": 256,
                  "checkpoint_every": 2, "warmup_steps": 2, "lr": 1e-3, **train},
    })


def test_lr_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_only_the_memory_block_and_those_after_it_train(tiny_llama_dir, tmp_path):
    trainer = Trainer(tiny_config(tiny_llama_dir, train_blocks=1), tmp_path)
    mem = trainer.sidenet.memory_block
    side = trainer.sidenet
    assert all(n.startswith((side.block_prefix(mem), side.final_norm_prefix())) or n == "gate" for n in trainer.names)
    assert "gate" in trainer.names
    before = {n: p.detach().clone() for n, p in trainer.sidenet.named_parameters()}
    backbone_before = {n: p.detach().clone() for n, p in trainer.backbone.model.named_parameters()}
    losses = [trainer.train_step() for _ in range(3)]
    assert all(np.isfinite(losses))
    for name, p in trainer.sidenet.named_parameters():
        changed = not torch.equal(before[name], p)
        if name not in trainer.names:
            assert not changed, f"{name} is frozen but changed"
    assert any(not torch.equal(before[n], trainer.params[n]) for n in trainer.names)
    for name, p in trainer.backbone.model.named_parameters():
        assert torch.equal(backbone_before[name], p), f"backbone {name} changed"
    assert trainable_names(side, 0) == [n for n, _ in side.named_parameters()
                                        if n.startswith((f"model.{side.layers_name}.", side.final_norm_prefix()))
                                        or n == "gate"]


def test_each_row_has_its_own_memory_reset_at_document_boundaries(tiny_llama_dir, tmp_path):
    trainer = Trainer(tiny_config(tiny_llama_dir, max_doc_tokens=600), tmp_path)  # short documents
    for _ in range(16):
        trainer.train_step()
        for b, row in enumerate(trainer.rows):
            # the row's memory holds exactly the current document's segments read so far
            assert trainer.bank.stats(f"row-{b}").tokens_appended == min(row.cursor, len(row.ids) - 1)
    assert all(r.documents_read >= 2 for r in trainer.rows), "rows should have moved on to new documents"


def test_checkpoint_resume_and_load_by_path(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, steps=2)
    first = Trainer(config, tmp_path)
    summary = first.run(progress=False)
    assert summary["steps"] == 2
    meta = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert meta["init"] == "zero" and meta["trained_parameters"] == first.names and meta["steps"] == 2

    resumed = Trainer(tiny_config(tiny_llama_dir, steps=4), tmp_path)
    assert resumed.resume() and resumed.step == 2
    for name, p in resumed.params.items():
        assert torch.equal(p, first.params[name])
    assert resumed.run(progress=False)["steps"] == 4
    # stop_step ends a run early, its learning rate still on the schedule of `steps`
    early_config = tiny_config(tiny_llama_dir, steps=6, stop_step=3)
    early = Trainer(early_config, tmp_path / "early")
    assert early.run(progress=False)["steps"] == 3
    tc = early_config.train
    assert early.scheduler.get_last_lr()[0] == pytest.approx(tc.lr * lr_factor(3, tc.warmup_steps, 6, tc.min_lr_ratio))
    assert lr_factor(3, tc.warmup_steps, 6, tc.min_lr_ratio) != lr_factor(3, tc.warmup_steps, 3, tc.min_lr_ratio)
    log_lines = (tmp_path / "train_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log_lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    validated = [r for r in records if "val_256" in r]  # val_every 2: an accuracy and a hit rate per set
    assert [r["step"] for r in validated] == [2, 4]
    assert all(0 <= r[f"{name}_hit"] <= 1 for r in validated for name in ("val_256", "val_unseen_256"))
    assert (tmp_path / "train_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    trained = LongMem(LongMemConfig.from_dict({**config.to_dict(), "sidenet": {"checkpoint": str(tmp_path / "checkpoint")}}))
    for name, p in resumed.params.items():
        loaded = dict(trained.sidenet.named_parameters())[name]
        torch.testing.assert_close(loaded, p.detach().half().float(), rtol=0, atol=0)
    untrained = LongMem(LongMemConfig.from_dict({**config.to_dict(), "sidenet": {"init": "zero", "checkpoint": None}}))
    text = "Memory lets a model read far back. " * 6
    assert not np.allclose(trained.score(text).logprobs, untrained.score(text).logprobs)


def test_checkpoint_for_another_backbone_is_refused(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    Trainer(tiny_config(tiny_llama_dir, steps=1), tmp_path).run(progress=False)
    config = tiny_config(tiny_gpt2_dir)
    config.backbone.memory_layer = 1
    config.sidenet.checkpoint = str(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="trained for"):
        LongMem(config)


def test_retrieval_loss_is_the_attention_on_the_answer_entries_of_the_fact_memory():
    from longmem.memory import ChunkHits, hits_to_retrieved
    from longmem.sidenet import memory_log_probs
    from longmem.train import retrieval_loss

    rng = np.random.default_rng(0)
    t, hq, k, c, d = 3, 2, 2, 2, 4
    n = t * hq * k  # a table row of its own for every hit, with random keys
    hits = ChunkHits(np.zeros((t, hq, k), np.float32), np.zeros((t, hq, k), np.int64),
                     np.arange(n, dtype=np.int32).reshape(t, hq, k), np.zeros((n, c), np.int64),
                     np.tile(np.array([[7, 8], [7, 9]], np.int32), (n // k, 1)),  # per chunk: its c tokens
                     rng.standard_normal((n, c, d)).astype(np.float32), np.zeros((n, c, d), np.float32))
    sources = np.zeros((t, hq, k), np.int64)
    sources[:, :, 1] = 1  # chunk 1 comes from the fact memory
    memory = hits_to_retrieved([hits])
    queries = torch.randn(1, t, hq, d, requires_grad=True)
    probs = memory_log_probs(queries.transpose(1, 2), memory, 0.25).exp()  # [1, Hq, T, K]
    # token 7 at position 2: only entry 2 (chunk 1, first token) counts, not entry 0 of the filler
    loss, hit_rate = retrieval_loss(queries, memory, 0.25, [hits], [sources], 1, [0], [2], [7])
    assert loss.item() == pytest.approx(-probs[0, :, 2, 2].log().mean().item(), rel=1e-5)
    assert hit_rate == 1.0  # every head retrieved the fact chunk holding token 7
    loss.backward()
    assert queries.grad[0, 2].abs().sum() > 0 and queries.grad[0, :2].abs().sum() == 0
    # a token the fact memory's retrieved entries do not hold adds nothing, and is a miss
    loss, hit_rate = retrieval_loss(queries, memory, 0.25, [hits], [sources], 1, [0], [1], [8])
    assert loss.item() == 0.0 and hit_rate == 0.0


def test_the_retrieval_loss_trains_the_queries_from_the_first_step(tiny_llama_dir, tmp_path):
    """Zero-initialised output projections give the memory block's queries no gradient from the
    answer loss at first; the retrieval loss does."""
    def query_grad(retrieval_weight):
        trainer = Trainer(tiny_config(tiny_llama_dir, batch_rows=0, recall_rows=4, val_every=0,
                                      recall_kinds={"passkey": 1.0}, retrieval_weight=retrieval_weight), tmp_path)
        q_proj = trainer.sidenet.blocks[trainer.sidenet.memory_block].layer.self_attn.q_proj.weight
        trainer.train_step()
        assert trainer.metrics["retrieval_loss"] > 0 and 0 < trainer.metrics["retrieval_hit"] <= 1
        return q_proj.grad.abs().max().item()

    assert query_grad(0.0) == 0.0
    assert query_grad(1.0) > 0.0


def test_the_ranking_loss_is_the_attention_from_a_question_token_on_the_chunks_of_the_answers_statement():
    from longmem.memory import ChunkHits, hits_to_retrieved
    from longmem.sidenet import memory_log_probs
    from longmem.train import ranking_loss

    rng = np.random.default_rng(1)
    t, hq, k, c, d = 2, 2, 3, 2, 4
    n = t * hq * k
    # hit j of every (token, head) is chunk j: stream positions [2j, 2j + 2)
    positions = np.tile(np.array([[0, 1], [2, 3], [4, 5]], np.int64), (n // k, 1))
    hits = ChunkHits(np.zeros((t, hq, k), np.float32), np.tile(np.arange(k), (t, hq, 1)),
                     np.arange(n, dtype=np.int32).reshape(t, hq, k), positions, np.zeros((n, c), np.int32),
                     rng.standard_normal((n, c, d)).astype(np.float32), np.zeros((n, c, d), np.float32))
    sources = np.ones((t, hq, k), np.int64)
    sources[:, :, 0] = 0  # chunk 0 is the filler's
    memory = hits_to_retrieved([hits])
    queries = torch.randn(1, t, hq, d, requires_grad=True)
    probs = memory_log_probs(queries.transpose(1, 2), memory, 0.25).exp()  # [1, Hq, T, K]
    # the statement at positions [3, 5): chunk 1 (holds position 3) and chunk 2 (position 4), both entries each
    loss, top = ranking_loss(queries, memory, 0.25, [hits], [sources], 1, [0], [1], [(3, 5)])
    assert loss.item() == pytest.approx(-probs[0, :, 1, 2:].sum(-1).log().mean().item(), rel=1e-5)
    assert top == (probs[0, :, 1].argmax(-1) >= 2).float().mean().item()
    loss.backward()
    assert queries.grad[0, 1].abs().sum() > 0 and queries.grad[0, 0].abs().sum() == 0
    # a statement only the filler's chunk covers is not the fact memory's: nothing to rank, no loss
    loss, top = ranking_loss(queries, memory, 0.25, [hits], [sources], 1, [0], [1], [(0, 2)])
    assert loss.item() == 0.0 and top == 0.0


def test_the_ranking_loss_trains_the_queries_and_ranks_the_statement_better_on_the_same_examples(tiny_llama_dir,
                                                                                                  tmp_path):
    """With only the ranking loss (and no answer loss) the queries move, and a few steps on one batch
    raise the attention of the question's tokens on the answer's statement."""
    trainer = Trainer(tiny_config(tiny_llama_dir, batch_rows=0, recall_rows=4, val_every=0, recall_weight=0.0,
                                  recall_kinds={"passkey": 1.0}, ranking_weight=1.0, lr=1e-2, warmup_steps=0),
                      tmp_path)
    examples = [trainer.curriculum.example(trainer.rng, "passkey") for _ in range(4)]
    filler = trainer._filler_segments(512, trainer.rng)
    first = trainer.recall(examples, filler)
    for _ in range(6):
        batch = trainer.recall(examples, filler)
        trainer.optimizer.zero_grad(set_to_none=True)
        batch.ranking.backward()
        trainer.optimizer.step()
    with torch.no_grad():
        last = trainer.recall(examples, filler)
    assert first.ranking.item() > 0 and last.ranking.item() < first.ranking.item()


def test_distillation_is_zero_for_the_identity_sidenet_and_pulls_a_trained_one_back(tiny_llama_dir, tmp_path):
    trainer = Trainer(tiny_config(tiny_llama_dir, recall_rows=0, val_every=0, lm_weight=1.0, distill_weight=0.0,
                                  output_lr=0.05, lr=0.05), tmp_path)
    _, distill, _ = trainer.lm_loss()  # zero init: the SideNet gives the backbone's logits, memory or not
    assert distill.item() == pytest.approx(0.0, abs=1e-5)
    for _ in range(4):  # the LM loss alone moves the SideNet away from the backbone
        trainer.train_step()
    _, distill, _ = trainer.lm_loss()
    assert distill.item() > 1e-3 and "distill_loss" in trainer.metrics
    trainer.optimizer.zero_grad(set_to_none=True)
    distill.backward()
    grads = [p.grad for p in trainer.params.values() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "the KL term trains the SideNet"


def test_an_added_memory_read_is_the_backbone_without_memory_and_differs_only_through_it(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir, recall_rows=0, val_every=0)
    config.sidenet.memory_read = "added"
    trainer = Trainer(config, tmp_path)
    side = trainer.sidenet
    block = f"{side.block_prefix(side.memory_block)}layer."
    assert set(trainer.names) == {n for n, _ in side.named_parameters()  # its attention and norms, not its MLP
                                  if n.startswith(block) and not n.startswith(f"{block}mlp.")} | {"gate"}
    assert f"{block}input_layernorm.weight" in trainer.names and f"{block}self_attn.q_proj.weight" in trainer.names
    with torch.no_grad():  # any trained values
        for p in trainer.params.values():
            p.add_(0.3 * torch.randn_like(p))
    model = LongMem(config, backbone=trainer.backbone, sidenet=side.eval())
    rng, w, vocab = np.random.default_rng(0), config.read.segment_tokens, trainer.backbone.vocab_size
    ids = rng.integers(0, vocab, 3 * w).tolist()
    alone = model.score(token_ids=ids, use_memory=False)
    np.testing.assert_allclose(alone.logprobs, alone.backbone_logprobs, atol=1e-5)
    first = model.score(token_ids=ids)  # its first segment reads an empty memory
    np.testing.assert_allclose(first.logprobs[:w - 1], first.backbone_logprobs[:w - 1], atol=1e-5)
    memory = model.create_memory()
    model.append(memory, token_ids=rng.integers(0, vocab, w).tolist())
    read = model.score(token_ids=ids, memory_id=memory)
    assert np.abs(read.logprobs - read.backbone_logprobs).max() > 1e-3
    trainer.save()
    config.sidenet.checkpoint = str(tmp_path / "checkpoint")
    assert build_sidenet(trainer.backbone, config).memory_read == "added"
    config.sidenet.memory_read = "auto"  # as the checkpoint was trained; "joint" untrained
    assert build_sidenet(trainer.backbone, config).memory_read == "added"
    assert build_sidenet(trainer.backbone, dataclasses.replace(
        config, sidenet=dataclasses.replace(config.sidenet, checkpoint=None))).memory_read == "joint"
    config.sidenet.memory_read = "joint"
    with pytest.raises(ValueError, match="reads memory as 'added'"):
        build_sidenet(trainer.backbone, config)
    config.sidenet.memory_read, config.sidenet.checkpoint = "added", None
    config.train.train_blocks = 2
    with pytest.raises(ValueError, match="train_blocks must be 1"):
        Trainer(config, tmp_path / "two")
    with pytest.raises(ValueError, match="'added' with init 'zero'"):
        SideNet(trainer.backbone, "backbone", memory_read="added")


def test_a_run_starts_from_another_checkpoints_parameters_of_the_same_names(tiny_llama_dir, tmp_path):
    joint = Trainer(tiny_config(tiny_llama_dir, recall_rows=0, val_every=0), tmp_path / "joint")
    with torch.no_grad():  # any trained values
        for p in joint.params.values():
            p.add_(0.3 * torch.randn_like(p))
    joint.save()
    config = tiny_config(tiny_llama_dir, recall_rows=0, val_every=0, init_checkpoint=str(tmp_path / "joint" / "checkpoint"))
    config.sidenet.memory_read = "added"
    added = Trainer(config, tmp_path / "added")
    shared = set(added.names) & set(joint.names)
    assert "gate" in shared and any("q_proj" in n for n in shared) and set(joint.names) - shared  # its MLP, final norm
    for name in shared:
        torch.testing.assert_close(added.params[name], joint.params[name].half().float())
    model = LongMem(config, backbone=added.backbone, sidenet=added.sidenet.eval())  # still the backbone without memory
    ids = np.random.default_rng(0).integers(0, added.backbone.vocab_size, 300).tolist()
    alone = model.score(token_ids=ids, use_memory=False)
    np.testing.assert_allclose(alone.logprobs, alone.backbone_logprobs, atol=1e-5)
    config.train.init_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no SideNet checkpoint"):
        Trainer(config, tmp_path / "missing")
    config.sidenet.checkpoint = str(tmp_path / "joint" / "checkpoint")
    with pytest.raises(ValueError, match="sidenet.checkpoint must then be null"):
        Trainer(config, tmp_path / "both")


def test_training_refuses_a_half_precision_backbone(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir)
    config.backbone.dtype = "bfloat16"
    with pytest.raises(ValueError, match="backbone.dtype float32"):
        Trainer(config, tmp_path)


def test_re_read_examples_search_their_spans_alone_and_are_validated_as_such(tiny_llama_dir, tmp_path):
    """train.recall_reread_share: a re-read example's memory is its spans (Curriculum.reread), whatever the
    filler memory holds, where a plain example's read also searches the filler; training steps run on a
    mix, and each validation set has a re-read twin."""
    config = tiny_config(tiny_llama_dir, batch_rows=0, recall_rows=2, recall_reread_share=0.5,
                         retrieval_weight=1.0, recall_kinds={"passkey": 1.0})
    config.read.segment_tokens, config.read.reread_span_tokens = 512, 128  # 2 spans: the tiny tokenizer's statements are long
    trainer = Trainer(config, tmp_path)
    plain = [trainer.curriculum.example(trainer.rng, "passkey") for _ in range(2)]
    reread = [trainer.curriculum.reread(trainer.rng, e) for e in plain]
    small, large = trainer._filler_segments(256, trainer.rng), trainer._filler_segments(1024, trainer.rng)
    with torch.no_grad():
        spans = [trainer.recall(reread, f) for f in (small, large)]
        wide = [trainer.recall(plain, f) for f in (small, large)]
    assert spans[0].retrieval.item() == pytest.approx(spans[1].retrieval.item(), abs=1e-6)
    assert spans[0].hit_rate == spans[1].hit_rate > 0
    assert wide[0].retrieval.item() != pytest.approx(wide[1].retrieval.item(), abs=1e-6)
    names = [name for name, _, _ in trainer.val_sets]
    assert [n for n in names if n.startswith("val_reread_")] == [n.replace("val_", "val_reread_", 1)
                                                                  for n in names if not n.startswith("val_reread_")]
    trainer.train_step()
    assert set(trainer.validate()) >= {"val_reread_256", "val_reread_256_hit"}
    with pytest.raises(ValueError, match="recall_reread_share"):
        tiny_config(tiny_llama_dir, recall_reread_share=1.5).validate()
