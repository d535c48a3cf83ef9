"""Durable state for memory shards and the bank: atomic files, a write-ahead log, snapshots.

`Storage` is a directory on any fsspec filesystem (a local path by default; `s3://...`, `gs://...`
and the like on a cluster). Every file is written whole and atomically (a temporary name, then a
rename; on object stores a put is atomic), and local writes are fsynced before they count.

`WriteAheadLog` keeps one file per record, `wal/<lsn>`, each with a CRC32 of its payload: a record
either is there and valid or is not there at all, so a crash never leaves half an operation behind.
Readers stop at the first missing or corrupt record. After a snapshot the records it covers are
deleted (`truncate`).
"""

from __future__ import annotations

import io
import json
import os
import struct
import uuid
import zlib
from collections.abc import Iterator

import numpy as np

HEADER = struct.Struct("<QI")  # payload length, crc32


class Storage:
    def __init__(self, uri: str):
        import fsspec

        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(os.path.expanduser(self.uri))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write(self, name: str, data: bytes) -> None:
        target = self.path(name)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable
        finally:
            os.close(dir_fd)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def list(self, folder: str) -> list[str]:
        """Names (relative to folder) of the files in a folder, sorted; [] when it does not exist."""
        if not self.fs.exists(self.path(folder)):
            return []
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(folder), detail=False)]
        return sorted(n for n in names if not n.startswith(".tmp-"))

    def delete(self, name: str) -> None:
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)


class WriteAheadLog:
    def __init__(self, storage: Storage, folder: str = "wal"):
        self.storage, self.folder = storage, folder
        lsns = self.lsns()
        self.next_lsn = (lsns[-1] + 1) if lsns else 1

    def lsns(self) -> list[int]:
        return sorted(int(n) for n in self.storage.list(self.folder) if n.isdigit())

    def append(self, payload: bytes) -> int:
        """Writes one record durably and returns its log sequence number."""
        lsn = self.next_lsn
        self.storage.write(f"{self.folder}/{lsn:016d}", HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self.next_lsn = lsn + 1
        return lsn

    def records(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Valid records with lsn > after, in order, up to the first gap or corrupt record."""
        expected = None
        for lsn in self.lsns():
            if lsn <= after:
                continue
            if expected is not None and lsn != expected:
                return
            data = self.storage.read(f"{self.folder}/{lsn:016d}")
            if len(data) < HEADER.size:
                return
            length, crc = HEADER.unpack_from(data)
            payload = data[HEADER.size:]
            if len(payload) != length or zlib.crc32(payload) != crc:
                return
            yield lsn, payload
            expected = lsn + 1

    def truncate(self, upto: int) -> None:
        """Deletes the records a snapshot now covers."""
        for lsn in self.lsns():
            if lsn <= upto:
                self.storage.delete(f"{self.folder}/{lsn:016d}")


def pack_arrays(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """Arrays and a JSON-able dict in one .npz payload (no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return buffer.getvalue()


def unpack_arrays(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
        meta = json.loads(npz["__meta__"].tobytes().decode())
    return arrays, meta
