"""The one place where longmem reaches into a Hugging Face model: its decoder layers, their attention
and their rotary positions, found generically and checked, never assumed.

- `decoder_layers(base)`: the ModuleList of decoder layers (whatever its name: `layers`, `h`, ...).
- `attention_of(layer)`: the layer's self-attention module (the submodule whose class name ends in
  "Attention" and that knows its `layer_idx`).
- `install(model)`: routes the model's attention through `longmem_attention`, which runs the model's own
  implementation (sdpa, eager, ...) and then, for an attention module given a `longmem_hook`, hands it
  the call: the layer's own queries, keys and values (after q/k norms, fused projections split),
  and the positions it rotated them with. `unrotate` undoes rotary positions with the architecture's own
  `apply_rotary_pos_emb` (partial rotary included), giving what the layer uses before positions.

An architecture whose attention does not go through transformers' attention-function interface never
calls the hook: `check_capture` turns that into a clear error instead of a silently different model.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

PREFIX = "longmem_"  # config._attn_implementation = PREFIX + the model's own implementation


@dataclass
class AttentionCall:
    """What a hooked attention module saw in one call. Shapes: [B, H, T, d] (keys/values: only the
    T new positions, even when a KV cache holds earlier ones)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor  # [B, T, Hq, d] the layer's own attention output
    scaling: float
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # the (cos, sin) the layer rotated q/k with

    def unrotated(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotary is None else unrotate(module, x, self.rotary)


def own_attention(module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module.config._attn_implementation.removeprefix(PREFIX)
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def longmem_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The model's own attention, then the module's `longmem_hook` (if any) may replace its output."""
    output, weights = own_attention(module)(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    hook = getattr(module, "longmem_hook", None)
    if hook is not None:
        t = query.shape[2]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        call = AttentionCall(query, key[:, :, -t:], value[:, :, -t:], output, scale,
                             getattr(_ROTARY, "by_module", {}).get(id(module)))
        replaced = hook(module, call)
        if replaced is not None:
            output = replaced
    return output, weights


_ROTARY = threading.local()  # per thread: id(attention module) -> the (cos, sin) of its current call


def _keep_rotary(module, args, kwargs):
    if not hasattr(_ROTARY, "by_module"):
        _ROTARY.by_module = {}
    _ROTARY.by_module[id(module)] = kwargs.get("position_embeddings")


def install(model: nn.Module) -> None:
    """Routes every attention module of `model` through longmem_attention (same results until a module
    gets a longmem_hook)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    own = model.config._attn_implementation
    if own.startswith(PREFIX):
        return
    if own not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {own!r} has no mask function longmem can reuse")
    AttentionInterface.register(PREFIX + own, longmem_attention)
    AttentionMaskInterface.register(PREFIX + own, ALL_MASK_ATTENTION_FUNCTIONS[own])
    for module in model.modules():
        if getattr(module, "config", None) is not None and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = PREFIX + own


def hook_attention(attention: nn.Module, hook: Callable[[nn.Module, AttentionCall], torch.Tensor | None]) -> None:
    """Gives one attention module a longmem_hook and keeps the rotary positions of each of its calls."""
    attention.longmem_hook = hook
    attention.register_forward_pre_hook(_keep_rotary, with_kwargs=True)


def decoder_layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    n = base.config.num_hidden_layers
    for name, child in base.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return name, child
    raise ValueError(f"'{base.config.model_type}': no list of {n} decoder layers in {type(base).__name__}")


def attention_of(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if module is not layer and type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx"):
            return module
    raise ValueError(f"no self-attention module with a layer_idx in {type(layer).__name__}")


def unrotate(module: nn.Module, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, H, T, d] rotated by `rotary` = (cos, sin) -> x before rotation, with the module's own
    apply_rotary_pos_emb run backwards (a rotation by -θ)."""
    rotate = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rotate is None:
        raise ValueError(f"{type(module).__name__} takes rotary positions but its module has no "
                         "apply_rotary_pos_emb to undo them with")
    cos, sin = rotary
    return rotate(x, x, cos, -sin)[0]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's transposed Linear


@contextmanager
def zeroed(modules: list[nn.Module]):
    """Temporarily zeroes the weights and biases of linear modules."""
    saved = [(p, p.detach().clone()) for m in modules for p in (m.weight, getattr(m, "bias", None)) if p is not None]
    try:
        with torch.no_grad():
            for p, _ in saved:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


@torch.no_grad()
def output_projections(layer: nn.Module, args: tuple, kwargs: dict) -> list[nn.Module]:
    """The linear maps that write a decoder layer's branches (attention, MLP) into its residual stream,
    found by running it on one recorded call (args, kwargs): walking its linear maps from the last one
    run backwards, those whose zeroing changes the output, until the layer is the identity. Zeroing
    them is the SideNet's identity start; an architecture where that never gives the identity is refused."""
    x = args[0] if args else kwargs["hidden_states"]

    def output() -> torch.Tensor:
        out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, a, o: order.append(m)) for m in layer.modules() if is_linear(m)]
    try:
        before = output()
    finally:
        for h in hooks:
            h.remove()
    chosen: list[nn.Module] = []
    for module in reversed(list(dict.fromkeys(order))):
        if torch.equal(before, x):
            break
        with zeroed(chosen + [module]):
            after = output()
        if not torch.equal(after, before):
            chosen.append(module)
            before = after
    if not torch.equal(before, x):
        raise ValueError(f"{type(layer).__name__}: zeroing its output projections does not make it the identity, "
                         "so the SideNet cannot start as the backbone")
    return chosen
