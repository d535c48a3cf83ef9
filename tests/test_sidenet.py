"""SideNet: joint attention against a per-head formula, gates, zero init, weight copies, the memory
block by hand. (Every architecture, and blocks against their source layers: test_architectures.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TEXT, W, tiny_config
from longmem.memory import Memory, Retrieved, hits_to_retrieved
from longmem.sidenet import SideNet, joint_attention

FAMILIES = ("llama", "gpt2")


def reference_joint(local, q, keys, values, mask, gate):
    """out[b,h,t] = (1-σ(g_h)) local + σ(g_h) Σ_j softmax_j(q·k_j/√d) v_j over valid j; local if none."""
    b_, h_, t_, d = q.shape
    out = torch.empty(local.shape, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            share = 1.0 / (1.0 + math.exp(-float(gate[h])))
            for t in range(t_):
                a = local[b, h, t].double()
                valid = [j for j in range(keys.shape[3]) if mask[b, h, t, j]]
                if not valid:
                    out[b, h, t] = a
                    continue
                s = [float(q[b, h, t].double() @ keys[b, h, t, j].double()) / math.sqrt(d) for j in valid]
                top = max(s)
                e = [math.exp(x - top) for x in s]
                z = sum(e)
                m = sum((e_j / z) * values[b, h, t, j].double() for e_j, j in zip(e, valid))
                out[b, h, t] = (1 - share) * a + share * m
    return out


@pytest.mark.parametrize("gate", [[0.0, 0.0, 0.0], [1.5, -2.0, 0.3]])
def test_joint_attention_matches_per_head_formula(gate):
    g = torch.Generator().manual_seed(0)
    b, h, t, k, d = 2, 3, 5, 6, 8
    local = torch.randn(b, h, t, d, generator=g)
    q = torch.randn(b, h, t, d, generator=g)
    keys = torch.randn(b, h, t, k, d, generator=g)
    values = torch.randn(b, h, t, k, d, generator=g)
    mask = torch.rand(b, h, t, k, generator=g) < 0.6
    mask[0, 1, 2] = False  # a row with no memory at all: local only
    mask[1, 0, 4] = False
    mask[1, 2, 0] = True  # a full row
    # masked entries must not matter at all, however large
    keys = torch.where(mask[..., None], keys, torch.full_like(keys, 1e4))
    values = torch.where(mask[..., None], values, torch.full_like(values, -1e4))
    gate = torch.tensor(gate)
    got = joint_attention(local, q, Retrieved(keys, values, mask), gate, 1 / math.sqrt(d))
    want = reference_joint(local, q, keys, values, mask, gate)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 1, 2], local[0, 1, 2])  # no memory -> the local output unchanged
    if gate.abs().sum():
        # gates differ per head: the same inputs under a permuted gate give a different result
        other = joint_attention(local, q, Retrieved(keys, values, mask), gate.flip(0), 1 / math.sqrt(d))
        assert (other - got).abs().max() > 1e-3


def test_joint_attention_all_empty_is_local():
    local = torch.randn(1, 2, 3, 4)
    memory = Retrieved(torch.randn(1, 2, 3, 5, 4), torch.randn(1, 2, 3, 5, 4), torch.zeros(1, 2, 3, 5, dtype=torch.bool))
    out = joint_attention(local, torch.randn(1, 2, 3, 4), memory, torch.tensor([3.0, -1.0]), 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, local)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_gate_per_query_head_initialised_to_zero(tiny_models, family):
    model = tiny_models(family, "backbone")
    sidenet, bb = model.sidenet, model.backbone
    assert sidenet.num_blocks == bb.num_layers // 2 == 3
    assert sidenet.memory_block == bb.memory_layer // 2
    gate = sidenet.gate
    assert gate.shape == (bb.num_heads,)  # per query head, not per kv head (llama: 4 q, 2 kv)
    assert torch.count_nonzero(gate) == 0
    torch.testing.assert_close(torch.sigmoid(gate), torch.full_like(gate, 0.5))
    assert gate.requires_grad
    assert [n for n, _ in sidenet.named_parameters() if "gate" == n.split(".")[-1]] == ["gate"]
    custom = SideNet(bb, init="backbone", gate_init=0.75)
    torch.testing.assert_close(custom.gate.detach(), torch.full((bb.num_heads,), 0.75))


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n)[None]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_reproduces_backbone_logits(tiny_models, family, fresh_memory):
    model = tiny_models(family, "zero")
    bb = model.backbone
    ids = torch.tensor([model.tokenize(TEXT)[:W]])
    out, _ = bb.encode(ids)
    with torch.no_grad():
        side = bb.lm_head(model.sidenet(out.hidden, _positions(ids.shape[1])))
        base = bb.logits(out.last)
        hf = bb.model(input_ids=ids).logits
    torch.testing.assert_close(base, hf, atol=1e-4, rtol=0)  # the hooks see what HF computes
    assert (side - base).abs().max() < 1e-4
    assert (side - hf).abs().max() < 1e-4

    # and through score(), without and with memory (a memory with content, plus the scratch memory)
    text_ids = model.tokenize(TEXT * 2)
    assert len(text_ids) > 3 * W
    memory_id = fresh_memory(model)
    model.append(memory_id, TEXT)
    assert model.memory_stats(memory_id).tokens_held > 0
    for kwargs in ({"use_memory": False}, {"use_memory": True}, {"use_memory": True, "memory_id": memory_id}):
        r = model.score(token_ids=text_ids, **kwargs)
        assert np.abs(r.logprobs - r.backbone_logprobs).max() < 1e-4, kwargs
    # the backbone baseline itself equals HF's log-probs over the same windows
    r = model.score(token_ids=text_ids[:W + 1], use_memory=False)
    with torch.no_grad():
        hf_lp = torch.log_softmax(bb.model(input_ids=torch.tensor([text_ids[:W]])).logits[0].float(), -1)
    want = hf_lp[torch.arange(W), torch.tensor(text_ids[1:W + 1])].numpy()
    np.testing.assert_allclose(r.backbone_logprobs, want, atol=1e-5)


def _check_block_weights(sidenet, bb):
    for i, block in enumerate(sidenet.blocks):
        source = bb.memory_layer if i == sidenet.memory_block else 2 * i + 1
        want, state = bb.layers[source].state_dict(), block.layer.state_dict()
        assert set(state) == set(want)
        for name, value in want.items():
            torch.testing.assert_close(state[name], value, atol=0, rtol=0, msg=f"block {i} {name}")
            assert state[name].data_ptr() != value.data_ptr()  # a copy: training never touches the backbone
    for name, value in bb.final_norm.state_dict().items():
        torch.testing.assert_close(sidenet.final_norm.state_dict()[name], value, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_weights_copy_backbone_layers(tiny_models, family):
    model = tiny_models(family, "backbone")
    _check_block_weights(model.sidenet, model.backbone)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_block_comes_from_the_memory_layer(tiny_dirs, family):
    """memory_layer 2 (even): block 1 is the memory block and copies layer 2, not layer 3."""
    from longmem.model import LongMem

    config = tiny_config(tiny_dirs[family], "backbone")
    config.backbone.memory_layer = 2
    model = LongMem(config)
    assert model.backbone.memory_layer == 2 and model.sidenet.memory_block == 1
    _check_block_weights(model.sidenet, model.backbone)


def _causal_attention(q, k, v):
    """q: [Hq, T, d]; k, v: [Hkv, T, d] -> [Hq, T, d], by hand."""
    hq, t, d = q.shape
    group = hq // k.shape[0]
    out = torch.empty(q.shape, dtype=torch.float64)
    for h in range(hq):
        s = (q[h].double() @ k[h // group].double().T) / math.sqrt(d)
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        out[h] = s.softmax(-1) @ v[h // group].double()
    return out


def test_memory_block_by_hand(llama_bb):
    """The llama memory block with retrieval == norms, projections, rotary local attention, the per-head
    joint formula with pre-rotary queries against retrieved keys, output projection, MLP."""
    model = llama_bb
    bb, sidenet = model.backbone, model.sidenet
    layer = sidenet.blocks[sidenet.memory_block].layer
    hq, hkv, d = bb.num_heads, bb.num_kv_heads, bb.head_dim
    g = torch.Generator().manual_seed(1)
    t = 6
    memory = Memory("m", 64, 4, hkv, d)
    n = 20
    memory.append(torch.randn(n, hkv, d, generator=g).numpy(), torch.randn(n, hkv, d, generator=g).numpy(),
                  np.arange(n, dtype=np.int32))
    seen, calls = [], {}

    def retriever(queries):
        seen.append(queries.clone())
        return hits_to_retrieved([memory.search(queries[0].numpy(), 2)])

    hidden = torch.randn(bb.num_layers // 2 + 1, 1, t, bb.hidden_size, generator=g)
    hook = layer.register_forward_hook(lambda m, a, k, out: calls.update(x=a[0], kwargs=k, out=out), with_kwargs=True)
    try:
        with torch.no_grad():
            sidenet(hidden, _positions(t), retriever)
    finally:
        hook.remove()
    x, got = calls["x"], calls["out"]
    with torch.no_grad():
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(1, t, hq, d)
        k = a.k_proj(h).view(1, t, hkv, d).transpose(1, 2)
        v = a.v_proj(h).view(1, t, hkv, d).transpose(1, 2)
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], q, atol=1e-6, rtol=1e-5)  # the retriever gets pre-rotary queries
        cos, sin = calls["kwargs"]["position_embeddings"]
        rot = lambda z: torch.cat((-z[..., z.shape[-1] // 2:], z[..., :z.shape[-1] // 2]), -1)
        ql = q.transpose(1, 2) * cos[:, None] + rot(q.transpose(1, 2)) * sin[:, None]
        kl = k * cos[:, None] + rot(k) * sin[:, None]
        local = _causal_attention(ql[0], kl[0], v[0])[None]
        mem = hits_to_retrieved([memory.search(q[0].numpy(), 2)])
        assert mem.mask.all()
        mixed = reference_joint(local, q.transpose(1, 2), mem.keys, mem.values, mem.mask, sidenet.gate)
        y = x + a.o_proj(mixed.float().transpose(1, 2).reshape(1, t, -1))
        want = y + layer.mlp(layer.post_attention_layernorm(y))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # and memory matters: without the retriever the block gives something else
        assert (layer(x, **calls["kwargs"]) - got).abs().max() > 1e-3


def test_encode_memory_stops_early_with_the_same_keys_values(tiny_models):
    for family in ("llama", "gpt2"):
        backbone = tiny_models(family, "zero").backbone
        ids = torch.randint(0, backbone.vocab_size, (2, 24))
        full, _ = backbone.encode(ids)
        ran = []
        hook = backbone.layers[-1].register_forward_hook(lambda *a: ran.append(1))
        try:
            keys, values = backbone.encode_memory(ids)
        finally:
            hook.remove()
        assert not ran, "layers above the memory layer must not run"
        torch.testing.assert_close(keys, full.mem_keys, rtol=0, atol=0)
        torch.testing.assert_close(values, full.mem_values, rtol=0, atol=0)


def test_zero_init_blocks_get_gradients_when_training(tiny_models):
    """Identity (zero-init) blocks are skipped when reading, but must run when training, or their zero
    output projections would never receive a gradient and stay zero."""
    model = tiny_models("llama", "zero")
    bb = model.backbone
    sidenet = SideNet(bb, init="zero")
    ids = torch.tensor([model.tokenize(TEXT)[:W]])
    out, _ = bb.encode(ids)
    sidenet.train()
    loss = bb.lm_head(sidenet(out.hidden, _positions(ids.shape[1]))).float().logsumexp(-1).mean()
    loss.backward()
    for block in sidenet.blocks:
        assert block.outputs == ["mlp.down_proj", "self_attn.o_proj"]
        grad = block.layer.self_attn.o_proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(sidenet(out.hidden, _positions(ids.shape[1])),
                                   model.sidenet(out.hidden, _positions(ids.shape[1])))


def test_output_projections_found_for_gpt2(gpt2_zero):
    assert [b.outputs for b in gpt2_zero.sidenet.blocks] == [["mlp.c_proj", "attn.c_proj"]] * 3
