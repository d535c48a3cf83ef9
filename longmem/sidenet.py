"""SideNet: the trainable memory retriever and reader, built of the backbone's own decoder layers.

L/2 blocks. Block i is a copy of backbone layer 2i+1 (the memory block, floor(m/2), a copy of the
memory layer m), run by its own code: the SideNet is a copy of the backbone's base model whose layer
list holds these blocks, so its own forward supplies the embeddings, rotary positions, masks (sliding
windows included), KV caches and final norm exactly as the backbone does. Before each block
(`SideBlock`) comes the cross-network residual x ← x + H[2i+2] - H[2i] (H: backbone states, H[0] the
embeddings). The identity start (`init: zero`) zeroes each block's output projections, the linear maps
that write its attention and MLP into the residual stream, found by running it
(layers.output_projections): the SideNet then gives the backbone's logits, whatever the architecture.

At the memory block, each head attends jointly to the local context and to the K retrieved memory
tokens (`joint_attention`, through longmem/layers.py's attention hook):

    A = the layer's own attention output                     local, with the backbone's positions
    M = softmax(q k̃ᵀ · scaling) Ṽ                           memory, position-free (un-rotated q, keys)
    out_h = (1 - σ(g_h)) A_h + σ(g_h) M_h                    g_h learned, initialised to gate_init

A query token with no memory entries (empty memory) uses A alone. Logits come from the backbone's
own LM head (longmem/backbone.py) applied to the SideNet's own final norm.

`memory_read: added` (zero init only) keeps the memory read and drops the rest of the memory block:

    out_h = σ(g_h) M_h                                       then the block's own output projection

and the block's MLP output projection stays zero (train.py trains only the block's attention and the
gates), so the block adds o_proj(σ(g) M) and nothing else: without memory the SideNet is exactly the
backbone, and LongMem can differ from it only through what it reads.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import layers
from .backbone import Backbone
from .memory import Retrieved

# (queries [B, T, Hq, d] pre-rotary) -> token-level memory for those queries (longmem.reader.Retrieval)
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


@dataclass
class SideCall:
    """One forward of the SideNet in this thread: what its blocks read besides their input."""

    hidden: torch.Tensor  # [L/2 + 1 - start, B, T, D]: H[2 start], ..., H[L]
    start: int  # blocks below it do not run; block `start` reads `entry`
    entry: torch.Tensor  # [B, T, D]
    retriever: Retriever | None
    stop: int | None = None  # run blocks start..stop-1 only, and return the state before the final norm


def memory_log_probs(q: torch.Tensor, memory: Retrieved, scaling: float) -> torch.Tensor:
    """Log attention weights of queries over their retrieved memory: q [B, Hq, T, d] pre-rotary,
    memory.keys [B, Hq, T, K, d] -> [B, Hq, T, K] (-inf at empty entries; all -inf without memory)."""
    scores = torch.einsum("bhtd,bhtkd->bhtk", q, memory.keys.to(q.dtype)) * scaling  # [B, Hq, T, K]
    return scores.masked_fill(~memory.mask, float("-inf")).log_softmax(dim=-1)


def memory_read(q: torch.Tensor, memory: Retrieved, gate: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated attention over retrieved memory, per head: (σ(g_h) M_h [B, Hq, T, d], the share σ(g_h)
    [B, Hq, T, 1], zero where a query has no memory entries).

    q: [B, Hq, T, d] pre-rotary queries; memory.keys/values: [B, Hq, T, K, d]; memory.mask: [B, Hq, T, K];
    gate: [Hq] logits g_h.
    """
    log_probs = memory_log_probs(q, memory, scaling)  # [B, Hq, T, K]
    has_memory = memory.mask.any(dim=-1, keepdim=True)  # [B, Hq, T, 1]
    probs = torch.where(has_memory, log_probs.exp(), torch.zeros_like(log_probs))
    mem_out = torch.einsum("bhtk,bhtkd->bhtd", probs, memory.values.to(q.dtype))  # [B, Hq, T, d]
    share = torch.sigmoid(gate).view(1, -1, 1, 1) * has_memory  # [B, Hq, T, 1]
    return share * mem_out, share


def joint_attention(local: torch.Tensor, q: torch.Tensor, memory: Retrieved, gate: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """Mixes local attention output [B, Hq, T, d] with attention over retrieved memory, per head
    (memory_read)."""
    read, share = memory_read(q, memory, gate, scaling)
    return (1 - share) * local + read


def trains(module: nn.Module) -> bool:
    """Whether a forward pass now would train the module (grad on, parameters requiring it): a block
    that is still the identity must then run anyway, or it never gets a gradient."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


class SideBlock(nn.Module):
    """A copy of one backbone decoder layer with the cross-network residual before it. Reads the
    current SideCall of its SideNet."""

    def __init__(self, layer: nn.Module, index: int, side: "SideNet"):
        super().__init__()
        self.layer, self.index = layer, index
        self.attention_type = getattr(layer, "attention_type", None)  # read by some models' layer loops
        self.outputs: list[str] = []  # names (in `layer`) of its output projections, see layers.output_projections
        self._side = [side]  # not a submodule
        self._record: list | None = None

    def output_modules(self) -> list[nn.Module]:
        return [self.layer.get_submodule(name) for name in self.outputs]

    def is_identity(self) -> bool:
        """True when every output projection is zero: the block then adds exactly nothing."""
        return not any(p.any() for m in self.output_modules() for p in (m.weight, getattr(m, "bias", None))
                       if p is not None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        call: SideCall = self._side[0].call
        i = self.index
        if i < call.start or (call.stop is not None and i >= call.stop):
            return hidden_states
        if i == call.start:  # the model's own embedding output is not used: the backbone's states are
            hidden_states = call.entry
        x = hidden_states + (call.hidden[i + 1 - call.start] - call.hidden[i - call.start])
        side = self._side[0]
        reads_memory = i == side.memory_block and call.retriever is not None
        added_read = i == side.memory_block and side.memory_read == "added"  # adds only what it reads
        if self._record is not None:
            self._record[:] = [(x, *args), kwargs]
        elif not reads_memory and (added_read or not trains(self) and self.is_identity()):  # adds nothing
            return x
        out = self.layer(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class SideNet(nn.Module):
    """Reads a segment from the backbone's hidden states, with memory at one block."""

    def __init__(self, backbone: Backbone, init: str = "backbone", gate_init: float = 0.0, memory_read: str = "joint"):
        super().__init__()
        if init not in ("backbone", "zero"):
            raise ValueError(f"sidenet init {init!r}: expected 'backbone' or 'zero'")
        if memory_read not in ("joint", "added") or (memory_read == "added" and init != "zero"):
            raise ValueError(f"sidenet memory_read {memory_read!r} with init {init!r}: expected 'joint', or "
                             "'added' with init 'zero'")
        self.memory_read = memory_read
        self.num_blocks = backbone.num_layers // 2
        self.memory_layer = backbone.memory_layer
        self.memory_block = backbone.memory_layer // 2
        self.layers_name, self.final_norm_name = backbone.layers_name, backbone.final_norm_name
        base = backbone.base
        sources = [backbone.memory_layer if i == self.memory_block else 2 * i + 1 for i in range(self.num_blocks)]
        # a copy of the base model without its layers, sharing the (frozen) input embeddings
        embeddings = base.get_input_embeddings()
        self.model = copy.deepcopy(base, {id(backbone.layers): nn.ModuleList(), id(embeddings): embeddings})
        config = self.model.config
        config.num_hidden_layers = self.num_blocks
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[s] for s in sources]
        blocks = nn.ModuleList()
        for i, source in enumerate(sources):
            layer = copy.deepcopy(backbone.layers[source], {id(backbone.model.config): config, id(base.config): config})
            for module in layer.modules():  # the backbone's capture hooks stay with the backbone
                module._forward_hooks.clear()
                module._forward_pre_hooks.clear()
                module.__dict__.pop("longmem_hook", None)
                if hasattr(module, "layer_idx"):
                    module.layer_idx = i  # the side model's own KV cache has one entry per block
            blocks.append(SideBlock(layer, i, self))
        setattr(self.model, self.layers_name, blocks)
        self.gate = nn.Parameter(torch.full((backbone.num_heads,), float(gate_init)))
        self._calls = threading.local()
        layers.hook_attention(layers.attention_of(blocks[self.memory_block].layer), self._memory_path)
        self._find_outputs(backbone)
        if init == "zero":
            self.zero_output_projections()
        self.requires_grad_(True)
        embeddings.requires_grad_(False)

    @torch.no_grad()
    def _find_outputs(self, backbone: Backbone) -> None:
        """Records one call of every block on a few random states and finds its output projections."""
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(self.num_blocks + 1, 1, 4, backbone.hidden_size, generator=generator)
        hidden = hidden.to(backbone.device, backbone.model.dtype)
        for block in self.blocks:
            block._record = []
        try:
            self(hidden, torch.arange(4, device=backbone.device)[None])
        finally:
            records = [block._record for block in self.blocks]
            for block in self.blocks:
                block._record = None
        for block, (args, kwargs) in zip(self.blocks, records):
            names = {id(m): n for n, m in block.layer.named_modules()}
            block.outputs = [names[id(m)] for m in layers.output_projections(block.layer, args, kwargs)]

    @torch.no_grad()
    def zero_output_projections(self) -> None:
        """Makes every block the identity: the SideNet then reproduces the backbone's logits."""
        for block in self.blocks:
            for module in block.output_modules():
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def output_parameter_names(self) -> list[str]:
        """The names of the blocks' output projection parameters (train.output_lr)."""
        return [f"{self.block_prefix(i)}layer.{name}.{p}" for i, block in enumerate(self.blocks)
                for name in block.outputs for p, _ in block.layer.get_submodule(name).named_parameters()]

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.model, self.layers_name)

    @property
    def memory_scaling(self) -> float:
        """The memory block's attention scaling (its own, e.g. 1/√d), which memory attention uses too."""
        attention = layers.attention_of(self.blocks[self.memory_block].layer)
        return getattr(attention, "scaling", None) or attention.head_dim ** -0.5

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.model, self.final_norm_name)

    @property
    def call(self) -> SideCall:
        return self._calls.current

    def block_prefix(self, i: int) -> str:
        """The parameter-name prefix of block i."""
        return f"model.{self.layers_name}.{i}."

    def final_norm_prefix(self) -> str:
        return f"model.{self.final_norm_name}."

    def _memory_path(self, module: nn.Module, seen: layers.AttentionCall) -> torch.Tensor | None:
        call = getattr(self._calls, "current", None)
        if call is None or call.retriever is None:  # no memory (or the layer run on its own)
            return None
        retriever = call.retriever
        # the memory math in float32 whatever the model's dtype (memories hold float32 or float16)
        q = seen.unrotated(module, seen.query).float()  # [B, Hq, T, d]
        memory = retriever(q.transpose(1, 2))
        if self.memory_read == "added":
            out, _ = memory_read(q, memory, self.gate, seen.scaling)
        else:
            out = joint_attention(seen.output.transpose(1, 2).float(), q, memory, self.gate, seen.scaling)  # local [B, Hq, T, d]
        return out.to(seen.output.dtype).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, retriever: Retriever | None = None,
                cache=None, start: int = 0, x: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [L/2 + 1 - start, B, T, D], the backbone states H[2 start], ..., H[L] (Backbone.encode
        gives all of them, start 0); position_ids: [B, T]; x: [B, T, D] the state entering block `start`
        (start 0: None, the embeddings hidden[0]); cache: an HF cache (new_cache) for generation.
        Returns the final normed state [B, T, D]."""
        return self._run(SideCall(hidden, start, hidden[0] if x is None else x, retriever), position_ids, cache)

    def _run(self, call: SideCall, position_ids, cache) -> torch.Tensor:
        previous = getattr(self._calls, "current", None)
        self._calls.current = call
        try:  # inputs_embeds gives the model shapes only: block `start` reads call.entry
            out = self.model(inputs_embeds=call.entry, position_ids=position_ids, past_key_values=cache,
                             use_cache=cache is not None)
        finally:
            self._calls.current = previous
        return out.last_hidden_state

    @torch.no_grad()
    def frozen_inputs(self, hidden: torch.Tensor, position_ids: torch.Tensor, mem_keys: torch.Tensor,
                      mem_values: torch.Tensor, start: int) -> FrozenInputs:
        """What blocks start.. read for encoded segments (hidden: [L/2 + 1, B, T, D]): the state entering
        block `start` (blocks below it run here, without memory) and the backbone states from H[2 start].
        Fixed as long as the backbone and the blocks below `start` are frozen, so it can be cached."""
        if start > self.memory_block:
            raise ValueError(f"start {start} is above the memory block {self.memory_block}")
        entry = hidden[0]
        if start:
            captured = []
            hook = self.blocks[start].register_forward_pre_hook(
                lambda m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
            try:
                self._run(SideCall(hidden, 0, hidden[0], None, stop=start), position_ids, None)
            finally:
                hook.remove()
            entry = captured[0]
        return FrozenInputs(start, entry, hidden[start:], mem_keys, mem_values)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)
