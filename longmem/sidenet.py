"""SideNet: the trainable memory retriever and reader.

L/2 transformer blocks of the backbone's width. Block i (0-based) starts as a copy of backbone layer
2i+1 and its input gets the cross-network residual H[2i+2] - H[2i] (H = backbone hidden states,
H[0] = embeddings); the input of block 0 is the embeddings. Block floor(m/2) is the memory block,
initialised from backbone layer m (the layer whose keys/values fill memory). There, each head attends
jointly to the local context and to the K retrieved memory tokens:

    A = softmax(q_rot k_rotᵀ/√d + causal) V          local, with the backbone's positions
    M = softmax(q k̃ᵀ/√d) Ṽ                         memory, position-free (pre-rotary q and keys)
    out_h = (1 - σ(g_h)) A_h + σ(g_h) M_h            g_h learned, initialised to 0

then the output projection. A query token with no memory entries (empty memory) uses A alone.
Logits come from the backbone's frozen final LM head applied to the SideNet's own final norm.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .memory import Retrieved

# (queries [B, T, Hq, d] pre-rotary) -> token-level memory for those queries
Retriever = Callable[[torch.Tensor], Retrieved]


@dataclass
class FrozenInputs:
    """The inputs of SideNet blocks start.. for a batch of segments (SideNet.frozen_inputs): they do
    not change while only those blocks train, so training can read them from a cache."""

    start: int
    entry: torch.Tensor  # [B, T, D] the state entering block `start`
    hidden: torch.Tensor  # [L/2 + 1 - start, B, T, D]: H[2 start], ..., H[L]
    mem_keys: torch.Tensor  # [B, T, Hkv, d] pre-rotary keys of the memory layer
    mem_values: torch.Tensor  # [B, T, Hkv, d]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, d]; cos, sin: [B, T, d]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def memory_log_probs(q: torch.Tensor, memory: Retrieved) -> torch.Tensor:
    """Log attention weights of queries over their retrieved memory: q [B, Hq, T, d] pre-rotary,
    memory.keys [B, Hq, T, K, d] -> [B, Hq, T, K] (-inf at empty entries; all -inf without memory)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhtd,bhtkd->bhtk", q, memory.keys.to(q.dtype)) * scale  # [B, Hq, T, K]
    return scores.masked_fill(~memory.mask, float("-inf")).log_softmax(dim=-1)


def joint_attention(local: torch.Tensor, q: torch.Tensor, memory: Retrieved, gate: torch.Tensor) -> torch.Tensor:
    """Mixes local attention output with attention over retrieved memory, per head.

    local: [B, Hq, T, d] local attention output; q: [B, Hq, T, d] pre-rotary queries;
    memory.keys/values: [B, Hq, T, K, d]; memory.mask: [B, Hq, T, K]; gate: [Hq] logits g_h.
    """
    log_probs = memory_log_probs(q, memory)  # [B, Hq, T, K]
    has_memory = memory.mask.any(dim=-1, keepdim=True)  # [B, Hq, T, 1]
    probs = torch.where(has_memory, log_probs.exp(), torch.zeros_like(log_probs))
    mem_out = torch.einsum("bhtk,bhtkd->bhtd", probs, memory.values.to(q.dtype))  # [B, Hq, T, d]
    share = torch.sigmoid(gate).view(1, -1, 1, 1) * has_memory  # [B, Hq, T, 1]
    return (1 - share) * local + share * mem_out


@dataclass
class BlockSpec:
    family: str  # "llama" or "gpt2"
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    bias: bool  # q/k/v projection bias
    activation: str


class Attention(nn.Module):
    def __init__(self, spec: BlockSpec, with_memory: bool, gate_init: float):
        super().__init__()
        self.spec = spec
        d, h, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=spec.bias)
        self.k_proj = nn.Linear(spec.hidden_size, hkv * d, bias=spec.bias)
        self.v_proj = nn.Linear(spec.hidden_size, hkv * d, bias=spec.bias)
        self.o_proj = nn.Linear(h * d, spec.hidden_size, bias=spec.family == "gpt2")
        self.gate = nn.Parameter(torch.full((h,), float(gate_init))) if with_memory else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                retriever: Retriever | None, cache: list[torch.Tensor] | None) -> torch.Tensor:
        b, t, _ = x.shape
        s = self.spec
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim)  # [B, T, Hq, d] pre-rotary
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q_local = q.transpose(1, 2)  # [B, Hq, T, d]
        if rope is not None:
            q_local, k = apply_rotary(q_local, *rope), apply_rotary(k, *rope)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        n_keys = k.shape[2]
        # query i (absolute n_keys - t + i) sees keys 0..n_keys - t + i
        causal = torch.ones(t, n_keys, dtype=torch.bool, device=x.device).tril(diagonal=n_keys - t)
        out = F.scaled_dot_product_attention(q_local, k, v, attn_mask=causal,
                                             enable_gqa=s.num_heads != s.num_kv_heads)  # [B, Hq, T, d]
        if self.gate is not None and retriever is not None:
            out = joint_attention(out, q.transpose(1, 2), retriever(q), self.gate)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.gated = spec.family == "llama"
        if self.gated:
            self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=not self.gated)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=not self.gated)
        self.act = {"silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                    "gelu": F.gelu}[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, spec: BlockSpec, with_memory: bool = False, gate_init: float = 0.0):
        super().__init__()
        norm = (lambda: RMSNorm(spec.hidden_size, spec.norm_eps)) if spec.family == "llama" else \
            (lambda: nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(spec, with_memory, gate_init)
        self.mlp = MLP(spec)

    def forward(self, x, rope=None, retriever=None, cache=None):
        x = x + self.attn(self.norm1(x), rope, retriever, cache)
        return x + self.mlp(self.norm2(x))

    def is_identity(self) -> bool:
        """True when both output projections are zero: the block then adds exactly nothing."""
        return not any(p.any() for proj in (self.attn.o_proj, self.mlp.down_proj)
                       for p in (proj.weight, proj.bias) if p is not None)

    @torch.no_grad()
    def load_from_backbone(self, layer: nn.Module, spec: BlockSpec) -> None:
        """Copies the weights of one HF decoder layer into this block."""
        if spec.family == "llama":
            pairs = {"norm1": layer.input_layernorm, "norm2": layer.post_attention_layernorm,
                     "attn.q_proj": layer.self_attn.q_proj, "attn.k_proj": layer.self_attn.k_proj,
                     "attn.v_proj": layer.self_attn.v_proj, "attn.o_proj": layer.self_attn.o_proj,
                     "mlp.gate_proj": layer.mlp.gate_proj, "mlp.up_proj": layer.mlp.up_proj,
                     "mlp.down_proj": layer.mlp.down_proj}
            for name, src in pairs.items():
                dst = self.get_submodule(name)
                dst.weight.copy_(src.weight)
                if getattr(dst, "bias", None) is not None:
                    dst.bias.copy_(src.bias)
            return
        # GPT-2: Conv1D weights are [in, out]; c_attn holds q, k, v side by side.
        self.norm1.load_state_dict(layer.ln_1.state_dict())
        self.norm2.load_state_dict(layer.ln_2.state_dict())
        w, bias = layer.attn.c_attn.weight, layer.attn.c_attn.bias
        for i, proj in enumerate((self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)):
            cols = slice(i * spec.hidden_size, (i + 1) * spec.hidden_size)
            proj.weight.copy_(w[:, cols].T)
            proj.bias.copy_(bias[cols])
        for dst, src in ((self.attn.o_proj, layer.attn.c_proj), (self.mlp.up_proj, layer.mlp.c_fc),
                         (self.mlp.down_proj, layer.mlp.c_proj)):
            dst.weight.copy_(src.weight.T)
            dst.bias.copy_(src.bias)


def block_spec(backbone: Backbone) -> BlockSpec:
    hf = backbone.model.config
    if backbone.family == "llama":
        return BlockSpec("llama", hf.hidden_size, backbone.num_heads, backbone.num_kv_heads, backbone.head_dim,
                         hf.intermediate_size, hf.rms_norm_eps, bool(getattr(hf, "attention_bias", False)),
                         hf.hidden_act)
    return BlockSpec("gpt2", hf.hidden_size, backbone.num_heads, backbone.num_kv_heads, backbone.head_dim,
                     hf.n_inner or 4 * hf.hidden_size, hf.layer_norm_epsilon, True, hf.activation_function)


def trains(module: nn.Module) -> bool:
    """Whether a forward pass now would train the module (grad on, parameters requiring it): a block
    that is still the identity must then run anyway, or its zero projections never get a gradient."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


class SideNet(nn.Module):
    """Reads a segment from the backbone's hidden states, with memory at one block."""

    def __init__(self, backbone: Backbone, init: str = "backbone", gate_init: float = 0.0):
        super().__init__()
        self.spec = block_spec(backbone)
        self.num_blocks = backbone.num_layers // 2
        self.memory_layer = backbone.memory_layer
        self.memory_block = backbone.memory_layer // 2
        self.blocks = nn.ModuleList(
            Block(self.spec, with_memory=i == self.memory_block, gate_init=gate_init)
            for i in range(self.num_blocks))
        for i, block in enumerate(self.blocks):
            source = backbone.memory_layer if i == self.memory_block else 2 * i + 1
            block.load_from_backbone(backbone.layers[source], self.spec)
        self.final_norm = copy.deepcopy(backbone.final_norm).requires_grad_(True)
        if init == "zero":
            self.zero_output_projections()

    @torch.no_grad()
    def zero_output_projections(self) -> None:
        """Makes every block the identity: the SideNet then reproduces the backbone's logits."""
        for block in self.blocks:
            for proj in (block.attn.o_proj, block.mlp.down_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()

    @property
    def gate(self) -> torch.Tensor:
        return self.blocks[self.memory_block].attn.gate

    def forward(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                retriever: Retriever | None = None, cache: list[list[torch.Tensor]] | None = None,
                start: int = 0, x: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [L/2 + 1 - start, B, T, D], the backbone states H[2 start], ..., H[L] (Backbone.encode
        gives all of them, start 0); x: [B, T, D] the state entering block `start` (start 0: the
        embeddings hidden[0]). Runs blocks start.. and returns the final normed state [B, T, D]."""
        x = self.run_blocks(hidden[0] if x is None else x, hidden, rope, retriever, cache, start, self.num_blocks)
        return self.final_norm(x)

    def run_blocks(self, x: torch.Tensor, hidden: torch.Tensor, rope, retriever: Retriever | None,
                   cache: list[list[torch.Tensor]] | None, start: int, stop: int) -> torch.Tensor:
        """Blocks start..stop-1 on x [B, T, D]; hidden[j] is H[2 (start + j)]. Returns x, not normed."""
        for i in range(start, stop):
            x = x + (hidden[i + 1 - start] - hidden[i - start])
            block = self.blocks[i]
            reads_memory = i == self.memory_block and retriever is not None
            if not reads_memory and not trains(block) and block.is_identity():  # zero-init, untrained: no work
                continue
            x = block(x, rope, retriever if i == self.memory_block else None,
                      cache[i] if cache is not None else None)
        return x

    @torch.no_grad()
    def frozen_inputs(self, hidden: torch.Tensor, rope, mem_keys: torch.Tensor, mem_values: torch.Tensor,
                      start: int) -> FrozenInputs:
        """What blocks start.. read for encoded segments (hidden: [L/2 + 1, B, T, D]): the state entering
        block `start` (blocks below it run here, without memory) and the backbone states from H[2 start].
        Fixed as long as the backbone and the blocks below `start` are frozen, so it can be cached."""
        if start > self.memory_block:
            raise ValueError(f"start {start} is above the memory block {self.memory_block}")
        entry = self.run_blocks(hidden[0], hidden, rope, None, None, 0, start)
        return FrozenInputs(start, entry, hidden[start:], mem_keys, mem_values)

    def new_cache(self) -> list[list[torch.Tensor]]:
        return [[] for _ in self.blocks]
