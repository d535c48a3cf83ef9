"""SideNet checkpoints: a directory with `sidenet.safetensors` and `config.json`.

Only the parameters that trained are stored (fp16 by default): everything else is derived again
from the backbone with the same initialisation, which `config.json` records. A checkpoint therefore
loads only over the backbone and memory layer it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import DEFAULT_BACKBONE, LongMemConfig

SHIPPED = Path(__file__).parent / "checkpoints" / "smollm2-135m"
WEIGHTS, META = "sidenet.safetensors", "config.json"


def resolve_checkpoint(config: LongMemConfig, spec: str | None | object = ...) -> Path | None:
    """The checkpoint directory to load (`spec`, by default `sidenet.checkpoint`: a path, "auto" or None),
    or None for an untrained SideNet."""
    spec = config.sidenet.checkpoint if spec is ... else spec
    if spec is None or spec == "":
        return None
    if spec == "auto":
        shipped = config.backbone.name_or_path == DEFAULT_BACKBONE and (SHIPPED / WEIGHTS).exists()
        return SHIPPED if shipped else None
    path = Path(spec).expanduser()
    if not (path / WEIGHTS).exists() or not (path / META).exists():
        raise FileNotFoundError(f"no SideNet checkpoint at {path} (needs {WEIGHTS} and {META})")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def save_checkpoint(path: Path, params: dict[str, torch.Tensor], meta: dict, dtype: str = "float16") -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu", getattr(torch, dtype)).contiguous() for name, p in params.items()}
    save_file(tensors, str(path / WEIGHTS))
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")


def stored_parameters(sidenet: torch.nn.Module, path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The parameters a checkpoint stores, by today's names, once it is known to fit this SideNet."""
    from safetensors.torch import load_file

    expected = {"memory_layer": sidenet.memory_layer, "num_blocks": sidenet.num_blocks}
    found = {k: meta.get(k) for k in expected}
    if found != expected:
        raise ValueError(f"checkpoint {path} was trained for {found}, this backbone has {expected}")
    state = load_file(str(path / WEIGHTS))
    return from_format_1(sidenet, state) if meta.get("format", 1) == 1 else state


def load_weights(sidenet: torch.nn.Module, path: Path, meta: dict) -> None:
    state = stored_parameters(sidenet, path, meta)
    own = sidenet.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"checkpoint {path} has parameters this SideNet lacks: {unknown[:5]}")
    sidenet.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


# Checkpoints of format 1 (before the SideNet was built of the backbone's own layers) name Llama-family
# parameters after the hand-written block, which computed what the HF layer computes.
FORMAT_1 = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn": "self_attn", "mlp": "mlp"}


def from_format_1(sidenet: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format-1 state dict in today's names."""
    renamed = {}
    for name, value in state.items():
        parts = name.split(".")
        if name.startswith("final_norm."):
            renamed[sidenet.final_norm_prefix() + name.removeprefix("final_norm.")] = value
        elif parts[0] == "blocks" and parts[2:4] == ["attn", "gate"]:
            renamed["gate"] = value
        elif parts[0] == "blocks" and parts[2] in FORMAT_1:
            block = int(parts[1])
            renamed[f"{sidenet.block_prefix(block)}layer.{FORMAT_1[parts[2]]}.{'.'.join(parts[3:])}"] = value
        else:
            raise ValueError(f"format-1 checkpoint parameter {name!r} has no counterpart today")
    return renamed
