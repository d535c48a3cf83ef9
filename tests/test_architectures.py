"""The SideNet on every tested architecture (tiny random configs that transformers builds, loaded by
path): the identity start gives the backbone's log-probs; each block computes what the backbone's own
layer computes with the backbone's own masks and positions; memory keys are the memory layer's own
keys before positions; score with memory, greedy generation with KV caches and retrieve run; a batch of
two documents equals each alone. Falcon, whose attention bypasses transformers' attention interface,
is refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEXT, W, tiny_config
from longmem import layers
from tiny import architecture_configs, save_architecture

ARCHITECTURES = [a for a in architecture_configs(300) if a != "falcon"]
OTHER = "Quiet rivers carve deep canyons over many years; stones remember the water. " * 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch, init -> a LongMem on a tiny random model of that architecture, built once."""
    from longmem.model import LongMem

    cache = {}

    def get(arch: str, init: str):
        if (arch, init) not in cache:
            path = tmp_path_factory.mktemp(arch) / "model"
            if not path.exists():
                save_architecture(path, arch)
            config = tiny_config(path, init, batch_segments=2)
            config.sidenet.checkpoint = None
            config.sidenet.gate_init = 1.0
            cache[(arch, init)] = LongMem(config)
        return cache[(arch, init)]

    return get


def ids_of(model, text: str, n: int) -> list[int]:
    ids = model.tokenize(text)
    while len(ids) < n:
        ids += ids
    return ids[:n]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_identity_start_gives_the_backbone(models, arch, fresh_memory):
    model = models(arch, "zero")
    memory = fresh_memory(model)
    model.append(memory, OTHER)
    r = model.score(token_ids=ids_of(model, TEXT, 2 * W + 9))
    np.testing.assert_allclose(r.logprobs, r.backbone_logprobs, atol=1e-4, rtol=0)
    names = {n for n, _ in model.sidenet.named_parameters()}
    assert set(model.sidenet.output_parameter_names()) <= names and model.sidenet.output_parameter_names()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_window_logprobs_are_the_models_own(models, arch):
    """The backbone alone over windows (Backbone.window_logprobs: the base model, then the LM head in
    blocks) gives the model's own next-token log-probs, and over W-token windows LongMem's baseline."""
    model = models(arch, "zero")
    ids = ids_of(model, TEXT, 2 * W + 9)
    with torch.no_grad():
        logits = model.backbone.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(model.backbone.window_logprobs(ids, len(ids)), want, atol=1e-4)
    np.testing.assert_allclose(model.backbone.window_logprobs(ids, W), model.score(token_ids=ids).backbone_logprobs,
                               atol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_compute_their_source_layer_with_the_backbones_masks_and_positions(models, arch):
    model = models(arch, "backbone")
    bb, side = model.backbone, model.sidenet
    ids = torch.tensor([ids_of(model, TEXT, W)])
    sources = [bb.memory_layer if i == side.memory_block else 2 * i + 1 for i in range(side.num_blocks)]
    backbone_calls, side_calls = {}, {}
    hooks = [bb.layers[s].register_forward_pre_hook(
        lambda m, a, k, s=s: backbone_calls.__setitem__(s, k), with_kwargs=True) for s in sources]
    hooks += [block.layer.register_forward_hook(
        lambda m, a, k, out, i=i: side_calls.__setitem__(i, (a, k, out)), with_kwargs=True)
        for i, block in enumerate(side.blocks)]
    try:
        with torch.no_grad():
            out, _ = bb.encode(ids)
            model.reader.read_state(out, None)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for i, source in enumerate(sources):
            args, _, got = side_calls[i]
            kwargs = {k: v for k, v in backbone_calls[source].items() if k not in ("past_key_values", "use_cache")}
            want = bb.layers[source](args[0], **kwargs)
            want, got = (x[0] if isinstance(x, tuple) else x for x in (want, got))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_memory_keys_are_the_memory_layers_own_before_positions(models, arch):
    model = models(arch, "backbone")
    bb = model.backbone
    attention = layers.attention_of(bb.layers[bb.memory_layer])
    ids = torch.tensor([ids_of(model, TEXT, W)])
    recorded = {}
    hook = attention.register_forward_pre_hook(lambda m, a, k: recorded.update(args=a, kwargs=k), with_kwargs=True)
    try:
        out, _ = bb.encode(ids)
    finally:
        hook.remove()
    kwargs = {k: v for k, v in recorded["kwargs"].items() if k not in ("past_key_values", "use_cache")}
    if kwargs.get("position_embeddings") is not None:  # the same call at no rotation
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (torch.ones_like(cos), torch.zeros_like(sin))
    seen = {}
    capture, attention.longmem_hook = attention.longmem_hook, lambda m, call: seen.update(k=call.key, v=call.value)
    try:
        with torch.no_grad():
            attention(*recorded["args"], **kwargs)
    finally:
        attention.longmem_hook = capture
    torch.testing.assert_close(out.mem_keys, seen["k"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mem_values, seen["v"].transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert out.mem_keys.shape[2] == bb.num_kv_heads == (1 if arch == "gemma" else 2 if arch not in ("gpt2", "gpt_neox") else 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_memory_generation_retrieval_and_batches(models, arch, fresh_memory):
    model = models(arch, "backbone")
    mem_a, mem_b = fresh_memory(model), fresh_memory(model)
    model.append(mem_a, OTHER * 2)
    model.append(mem_b, TEXT * 3)
    doc_a, doc_b = ids_of(model, TEXT, 3 * W + 7), ids_of(model, OTHER, 2 * W + 5)
    alone_a = model.score(token_ids=doc_a, memory_id=mem_a)
    alone_b = model.score(token_ids=doc_b, memory_id=mem_b)
    batch = model.score_batch([doc_a, doc_b], [mem_a, mem_b])
    for got, want in ((batch[0], alone_a), (batch[1], alone_b)):
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4, rtol=0)
    without = model.score(token_ids=doc_a)
    assert np.abs(without.logprobs - alone_a.logprobs).max() > 1e-3  # memory is read
    tokens = list(model.generate(token_ids=doc_a[:W + 5], memory_id=mem_a, max_new_tokens=6, temperature=0.0))
    assert 1 <= len(tokens) <= 6
    assert model.retrieve(mem_a, token_ids=doc_a[:W])


def test_an_architecture_whose_attention_longmem_cannot_read_is_refused(tmp_path):
    from longmem.backbone import Backbone
    from longmem.config import BackboneConfig

    path = save_architecture(tmp_path / "falcon", "falcon")
    with pytest.raises(ValueError, match="'falcon' is not supported: its attention does not go through"):
        Backbone(BackboneConfig(name_or_path=str(path)))


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_weights_read_with_memory(tmp_path, fresh_memory, dtype, tol):
    """A backbone loaded in bf16/fp16 (`backbone.dtype`): the memory math runs in float32 and hands
    back the layer's dtype; the identity start stays within half-precision rounding of the backbone."""
    from longmem.model import LongMem

    config = tiny_config(save_architecture(tmp_path / "model", "qwen3"), "zero", batch_segments=2)
    config.sidenet.checkpoint, config.backbone.dtype = None, dtype
    model = LongMem(config)
    assert model.backbone.model.dtype == next(model.sidenet.blocks.parameters()).dtype == getattr(torch, dtype)
    memory = fresh_memory(model)
    model.append(memory, OTHER)
    ids = ids_of(model, TEXT, 2 * W + 9)
    r = model.score(token_ids=ids, memory_id=memory)
    assert np.isfinite(r.logprobs).all()
    np.testing.assert_allclose(r.logprobs, r.backbone_logprobs, atol=tol, rtol=0)
    assert len(list(model.generate(token_ids=ids[:20], memory_id=memory, max_new_tokens=4))) == 4
    assert model.retrieve(memory, token_ids=ids[:W])
