"""Frozen-backbone cache: what the trained SideNet blocks read for a segment, encoded once.

While only SideNet blocks from `start` on train, everything they read for a segment of text is fixed:
the backbone's hidden states, the memory layer's keys/values and the state the frozen blocks below
`start` hand on (SideNet.frozen_inputs). `FrozenEncoder` returns those for a batch of segments; with
a cache directory it stores each segment the first time (one .npz file per segment, named by a hash
of its token ids, arrays in `dtype`) and afterwards reads it back instead of running the backbone.
The directory is namespaced by everything that decides the contents (backbone, memory layer, start,
the weights of the frozen blocks), so a changed setup never reads stale entries, and a run that
continues a checkpoint whose frozen blocks are unchanged reads the cache of the run that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .backbone import BackboneOutput
from .reader import LocalReader
from .roles import pad_segments
from .sidenet import FrozenInputs

FIELDS = ("entry", "hidden", "mem_keys", "mem_values")  # FrozenInputs tensors, batch dimension removed


def segment_key(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:32]


def frozen_digest(sidenet: torch.nn.Module, start: int) -> str:
    """sha256 of the parameters and buffers of the SideNet blocks below `start`."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sidenet.blocks[:start].state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenEncoder:
    """FrozenInputs for batches of segments, from the backbone or from an on-disk cache."""

    def __init__(self, reader: LocalReader, start: int, cache_dir: str | Path | None, dtype: str = "float16"):
        self.reader, self.start = reader, start
        self.np_dtype = np.dtype(dtype)
        self.dir = None
        self.hits = self.misses = 0
        if cache_dir:
            backbone, sidenet = reader.backbone, reader.sidenet
            setup = {"backbone": str(backbone.path), "memory_layer": sidenet.memory_layer, "start": start,
                     "frozen_blocks": frozen_digest(sidenet, start), "dtype": dtype}
            name = hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:12]
            self.dir = Path(cache_dir) / name
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "setup.json").write_text(json.dumps(setup, indent=2) + "\n")

    def _path(self, ids: list[int]) -> Path:
        return self.dir / f"{segment_key(ids)}.npz"

    def cached(self, ids: list[int]) -> bool:
        return self.dir is not None and self._path(ids).exists()

    def _load(self, ids: list[int], fields: tuple[str, ...] = FIELDS) -> dict[str, torch.Tensor]:
        with np.load(self._path(ids)) as f:
            return {name: torch.from_numpy(f[name]) for name in fields}

    def _store(self, ids: list[int], arrays: dict[str, torch.Tensor]) -> None:
        path = self._path(ids)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
        np.savez(tmp, **{name: t.detach().cpu().numpy().astype(self.np_dtype) for name, t in arrays.items()})
        os.replace(tmp, path)  # atomic: a half-written entry is never read

    def encode_fresh(self, segments: list[list[int]]) -> FrozenInputs:
        """FrozenInputs straight from the backbone, never cached (for segments read only once)."""
        backbone = self.reader.backbone
        out, _ = backbone.encode(pad_segments(segments, backbone.device))
        return self.reader.frozen_inputs(out, self.start)

    def encode(self, segments: list[list[int]]) -> FrozenInputs:
        """FrozenInputs of a batch of segments (right-padded to the longest, float32 on the backbone's
        device); segments not in the cache are encoded together and stored."""
        rows: list[dict[str, torch.Tensor] | None] = [None] * len(segments)
        if self.dir is not None:
            for b, ids in enumerate(segments):
                if self.cached(ids):
                    rows[b] = self._load(ids)
        missing = [b for b, row in enumerate(rows) if row is None]
        self.hits += len(segments) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.encode_fresh([segments[b] for b in missing])
            for j, b in enumerate(missing):
                n = len(segments[b])
                row = {"entry": fresh.entry[j, :n], "hidden": fresh.hidden[:, j, :n],
                       "mem_keys": fresh.mem_keys[j, :n], "mem_values": fresh.mem_values[j, :n]}
                if self.dir is not None:
                    self._store(segments[b], row)
                    row = self._load(segments[b])  # what a later read returns, so every read is the same
                rows[b] = row
        return self._batch(rows)

    def _batch(self, rows: list[dict[str, torch.Tensor]]) -> FrozenInputs:
        device, dtype = self.reader.backbone.device, self.reader.backbone.model.dtype
        width = max(r["entry"].shape[0] for r in rows)

        def stack(name: str, time_dim: int, batch_dim: int) -> torch.Tensor:
            padded = []
            for r in rows:
                t = r[name].to(device, dtype)
                pad = [0, 0] * (t.dim() - time_dim - 1) + [0, width - t.shape[time_dim]]
                padded.append(torch.nn.functional.pad(t, pad))
            return torch.stack(padded, batch_dim)

        return FrozenInputs(self.start, stack("entry", 0, 0), stack("hidden", 1, 1),
                            stack("mem_keys", 0, 0), stack("mem_values", 0, 0))

    def memory(self, ids: list[int]) -> BackboneOutput:
        """The memory layer's keys/values of one segment ([1, T, Hkv, d] each), for filling memories."""
        if self.dir is None:
            keys, values = self.reader.backbone.encode_memory(pad_segments([ids], self.reader.backbone.device))
            return BackboneOutput(None, keys, values, None)
        if not self.cached(ids):
            self.encode([ids])
        row = self._load(ids, ("mem_keys", "mem_values"))
        return BackboneOutput(None, row["mem_keys"][None], row["mem_values"][None], None)
