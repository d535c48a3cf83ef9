"""SideNet: joint attention against a per-head formula, gates, zero init, weight copies, and the Block
reimplementation against the HF decoder layers it is copied from."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from conftest import TEXT, W, tiny_config
from longmem.memory import Memory, Retrieved, hits_to_retrieved
from longmem.sidenet import Block, SideNet, block_spec, joint_attention

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
    got = joint_attention(local, q, Retrieved(keys, values, mask), gate)
    want = reference_joint(local, q, keys, values, mask, gate)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, 1, 2], local[0, 1, 2])  # no memory -> the local output unchanged
    if gate.abs().sum():
        # gates differ per head: the same inputs under a permuted gate give a different result
        other = joint_attention(local, q, Retrieved(keys, values, mask), gate.flip(0))
        assert (other - got).abs().max() > 1e-3


def test_joint_attention_all_empty_is_local():
    local = torch.randn(1, 2, 3, 4)
    memory = Retrieved(torch.randn(1, 2, 3, 5, 4), torch.randn(1, 2, 3, 5, 4), torch.zeros(1, 2, 3, 5, dtype=torch.bool))
    out = joint_attention(local, torch.randn(1, 2, 3, 4), memory, torch.tensor([3.0, -1.0]))
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
    for i, block in enumerate(sidenet.blocks):
        assert (block.attn.gate is not None) == (i == sidenet.memory_block)
    gate_params = [n for n, _ in sidenet.named_parameters() if n.split(".")[-1] == "gate"]
    assert gate_params == [f"blocks.{sidenet.memory_block}.attn.gate"]
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
        rope = bb.rotary(out.hidden[0], _positions(ids.shape[1]))
        side = bb.lm_head(model.sidenet(out.hidden, rope, None))
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


def _layer_weights(bb, layer_index: int, spec):
    """The HF layer's weights in Block's naming and [out, in] layout."""
    layer = bb.layers[layer_index]
    if bb.family == "llama":
        a, m = layer.self_attn, layer.mlp
        return {"norm1.weight": layer.input_layernorm.weight, "norm2.weight": layer.post_attention_layernorm.weight,
                "attn.q_proj.weight": a.q_proj.weight, "attn.k_proj.weight": a.k_proj.weight,
                "attn.v_proj.weight": a.v_proj.weight, "attn.o_proj.weight": a.o_proj.weight,
                "mlp.gate_proj.weight": m.gate_proj.weight, "mlp.up_proj.weight": m.up_proj.weight,
                "mlp.down_proj.weight": m.down_proj.weight}
    dm = spec.hidden_size
    w, b = layer.attn.c_attn.weight, layer.attn.c_attn.bias
    out = {"norm1.weight": layer.ln_1.weight, "norm1.bias": layer.ln_1.bias,
           "norm2.weight": layer.ln_2.weight, "norm2.bias": layer.ln_2.bias,
           "attn.o_proj.weight": layer.attn.c_proj.weight.T, "attn.o_proj.bias": layer.attn.c_proj.bias,
           "mlp.up_proj.weight": layer.mlp.c_fc.weight.T, "mlp.up_proj.bias": layer.mlp.c_fc.bias,
           "mlp.down_proj.weight": layer.mlp.c_proj.weight.T, "mlp.down_proj.bias": layer.mlp.c_proj.bias}
    for i, name in enumerate(("q", "k", "v")):
        out[f"attn.{name}_proj.weight"] = w[:, i * dm:(i + 1) * dm].T
        out[f"attn.{name}_proj.bias"] = b[i * dm:(i + 1) * dm]
    return out


def _check_block_weights(sidenet, bb):
    for i, block in enumerate(sidenet.blocks):
        source = bb.memory_layer if i == sidenet.memory_block else 2 * i + 1
        want = _layer_weights(bb, source, sidenet.spec)
        state = {k: v for k, v in block.state_dict().items() if not k.endswith("gate")}
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
def test_memory_block_comes_from_the_memory_layer(tiny_dirs, tiny_models, family):
    """memory_layer 2 (even): block 1 is the memory block and copies layer 2, not layer 3."""
    from longmem.model import LongMem

    config = tiny_config(tiny_dirs[family], "backbone")
    config.backbone.memory_layer = 2
    model = LongMem(config)
    assert model.backbone.memory_layer == 2 and model.sidenet.memory_block == 1
    _check_block_weights(model.sidenet, model.backbone)
    torch.testing.assert_close(model.sidenet.blocks[1].attn.q_proj.weight,
                               _layer_weights(model.backbone, 2, model.sidenet.spec)["attn.q_proj.weight"])
    assert not torch.equal(model.sidenet.blocks[1].attn.q_proj.weight,
                           _layer_weights(model.backbone, 3, model.sidenet.spec)["attn.q_proj.weight"])
    _check_blocks_match_layers(model)


def _record_layers(bb, ids: torch.Tensor):
    """Runs the HF model as HF does and records every decoder layer's input and output."""
    inputs, outputs, handles = {}, {}, []
    for j, layer in enumerate(bb.layers):
        def pre(module, args, kwargs, j=j):
            inputs[j] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def post(module, args, output, j=j):
            outputs[j] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    try:
        with torch.no_grad():
            bb.model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def _check_blocks_match_layers(model):
    bb, sidenet = model.backbone, model.sidenet
    ids = torch.tensor([model.tokenize(TEXT)[:40]])
    inputs, outputs = _record_layers(bb, ids)
    assert len(inputs) == bb.num_layers
    for i, block in enumerate(sidenet.blocks):
        source = bb.memory_layer if i == sidenet.memory_block else 2 * i + 1
        x = inputs[source]
        with torch.no_grad():
            rope = bb.rotary(x, _positions(x.shape[1]))
            assert (rope is None) == (bb.family == "gpt2")
            got = block(x, rope)
        torch.testing.assert_close(got, outputs[source], atol=1e-5, rtol=1e-5, msg=f"block {i} vs layer {source}")


@pytest.mark.parametrize("family", FAMILIES)
def test_block_matches_hf_decoder_layer(tiny_models, family):
    model = tiny_models(family, "backbone")
    _check_blocks_match_layers(model)
    # and the encoder's even hidden states are the HF layer outputs (pre final norm), H[0] the embeddings
    bb = model.backbone
    ids = torch.tensor([model.tokenize(TEXT)[:40]])
    inputs, outputs = _record_layers(bb, ids)
    out, _ = bb.encode(ids)
    assert out.hidden.shape[0] == bb.num_layers // 2 + 1
    torch.testing.assert_close(out.hidden[0], inputs[0], atol=0, rtol=0)
    for i in range(1, bb.num_layers // 2 + 1):
        torch.testing.assert_close(out.hidden[i], outputs[2 * i - 1], atol=0, rtol=0)
    torch.testing.assert_close(out.last, outputs[bb.num_layers - 1], atol=0, rtol=0)
    # memory keys/values: the memory layer's own k/v projections of its normed input, before rotary
    layer, x = bb.layers[bb.memory_layer], inputs[bb.memory_layer]
    hkv, d = bb.num_kv_heads, bb.head_dim
    with torch.no_grad():
        if family == "llama":
            h = layer.input_layernorm(x)
            keys, values = layer.self_attn.k_proj(h), layer.self_attn.v_proj(h)
        else:
            _, keys, values = layer.attn.c_attn(layer.ln_1(x)).split(bb.hidden_size, dim=-1)
    shape = (1, ids.shape[1], hkv, d)
    assert out.mem_keys.shape == out.mem_values.shape == shape
    torch.testing.assert_close(out.mem_keys, keys.reshape(shape), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.mem_values, values.reshape(shape), atol=1e-6, rtol=1e-6)


def test_block_spec_matches_backbone(llama_bb, gpt2_bb):
    spec = block_spec(llama_bb.backbone)
    assert (spec.family, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llama", 64, 4, 2, 16)
    assert spec.activation == "silu" and spec.intermediate_size == 128
    spec = block_spec(gpt2_bb.backbone)
    assert (spec.family, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("gpt2", 64, 4, 4, 16)
    assert spec.bias and spec.intermediate_size == 256


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


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_block_by_hand(tiny_models, family):
    """The memory block with retrieval == norms, projections, rotary local attention, the per-head
    joint formula with pre-rotary queries against retrieved keys, output projection, MLP."""
    model = tiny_models(family, "backbone")
    bb, sidenet = model.backbone, model.sidenet
    spec = sidenet.spec
    block: Block = sidenet.blocks[sidenet.memory_block]
    g = torch.Generator().manual_seed(1)
    t = 6
    x = torch.randn(1, t, spec.hidden_size, generator=g)
    memory = Memory("m", 64, 4, spec.num_kv_heads, spec.head_dim)
    n = 20
    memory.append(torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=g).numpy(),
                  torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=g).numpy(), np.arange(n, dtype=np.int32))
    seen = []

    def retriever(queries):
        seen.append(queries.clone())
        return hits_to_retrieved([memory.search(queries[0].numpy(), 2)])

    with torch.no_grad():
        rope = bb.rotary(x, _positions(t))
        got = block(x, rope, retriever)
        h = block.norm1(x)
        q = block.attn.q_proj(h).view(1, t, spec.num_heads, spec.head_dim)
        k = block.attn.k_proj(h).view(1, t, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        v = block.attn.v_proj(h).view(1, t, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], q)  # the retriever gets pre-rotary queries [B, T, Hq, d]
        ql, kl = q.transpose(1, 2), k
        if rope is not None:
            cos, sin = rope
            rot = lambda z: torch.cat((-z[..., z.shape[-1] // 2:], z[..., :z.shape[-1] // 2]), -1)
            ql = ql * cos[:, None] + rot(ql) * sin[:, None]
            kl = kl * cos[:, None] + rot(kl) * sin[:, None]
        local = _causal_attention(ql[0], kl[0], v[0])[None]
        mem = hits_to_retrieved([memory.search(q[0].numpy(), 2)])
        assert mem.mask.all()
        mixed = reference_joint(local, q.transpose(1, 2), mem.keys, mem.values, mem.mask, block.attn.gate)
        attn = block.attn.o_proj(mixed.float().transpose(1, 2).reshape(1, t, -1))
        y = x + attn
        want = y + block.mlp(block.norm2(y))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # and memory matters: without the retriever the block gives something else
        assert (block(x, rope) - got).abs().max() > 1e-3


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
    sidenet, bb = copy.deepcopy(model.sidenet), model.backbone
    ids = torch.tensor([model.tokenize(TEXT)[:W]])
    out, _ = bb.encode(ids)
    rope = bb.rotary(out.hidden[0], _positions(ids.shape[1]))
    sidenet.train()
    loss = bb.lm_head(sidenet(out.hidden, rope)).float().logsumexp(-1).mean()
    loss.backward()
    for block in sidenet.blocks:
        assert block.attn.o_proj.weight.grad is not None and block.attn.o_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(sidenet(out.hidden, rope), model.sidenet(out.hidden, rope))
