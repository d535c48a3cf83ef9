"""Durable state for memory shards and the bank: atomic files, a write-ahead log, snapshots.

`Storage` is a directory on any fsspec filesystem (a local path by default; `s3://...`, `gs://...`
and the like on a cluster). Every file is written whole and atomically (a temporary name, then a
rename; on object stores a put is atomic), and local writes are fsynced before they count.

`WriteAheadLog` keeps one file per record, `wal/<lsn>`, each with a CRC32 of its payload: a record
either is there and valid or is not there at all, so a crash never leaves half an operation behind.
Readers stop at the first missing or corrupt record. After a snapshot the records it covers are
deleted (`truncate`). A record is created exclusively: a second writer on the same log fails loudly
(`StorageConflict`) instead of replacing an acknowledged record.

`StorageLock` makes one writer per storage location: a `LOCK` file naming its holder, created
exclusively and refreshed while held; a lock whose holder is dead (its process, on the same host)
or silent (no refresh for `stale_after_s`, on another host) is taken over.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
import uuid
import zlib
from collections.abc import Iterator

import numpy as np

HEADER = struct.Struct("<QI")  # payload length, crc32


class StorageConflict(RuntimeError):
    """A file that must be new exists already: another writer is using the same storage."""


class StorageLocked(RuntimeError):
    """Another live server holds the storage location."""


class StorageMismatch(RuntimeError):
    """The storage holds state this server's configuration cannot serve (e.g. memories on shards it
    does not have): retrying cannot help, the configuration or the storage location must change."""


class Storage:
    def __init__(self, uri: str):
        import fsspec

        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(os.path.expanduser(self.uri))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write(self, name: str, data: bytes, exclusive: bool = False) -> None:
        """Writes a whole file atomically. exclusive: the file must not exist (StorageConflict if it
        does); atomic on local disks (a hard link), checked before the put on object stores."""
        target = self.path(name)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self.local:
            if exclusive and self.fs.exists(target):
                raise StorageConflict(f"{self.uri}/{name} exists already: another writer uses this storage")
            self.fs.pipe_file(target, data)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise StorageConflict(f"{self.uri}/{name} exists already: another writer uses this storage") from None
            finally:
                os.unlink(tmp)
        else:
            os.replace(tmp, target)
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable
        finally:
            os.close(dir_fd)

    def rename(self, name: str, new_name: str) -> bool:
        """Renames a file; False when it is gone (someone else renamed it first)."""
        try:
            self.fs.mv(self.path(name), self.path(new_name))
        except FileNotFoundError:
            return False
        return True

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
        self.storage.write(f"{self.folder}/{lsn:016d}", HEADER.pack(len(payload), zlib.crc32(payload)) + payload,
                           exclusive=True)
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


class StorageLock:
    """The single-writer lock of a storage location, held by one server (its bank).

    holder: who asks, e.g. {"server": <id kept across restarts of the same server's actors>}; the
    host, pid and a heartbeat time are added. The same server (equal "server") may always retake its
    lock: a restarted bank actor is the same writer. `refresh` must run every few seconds while held.
    """

    NAME = "LOCK"

    def __init__(self, storage: Storage, holder: dict, stale_after_s: float):
        self.storage = storage
        self.holder = {**holder, "host": socket.gethostname(), "pid": os.getpid()}
        self.stale_after_s = stale_after_s

    def _record(self) -> bytes:
        return json.dumps({**self.holder, "beat": time.time()}).encode()

    def current(self) -> dict | None:
        try:
            return json.loads(self.storage.read(self.NAME))
        except (FileNotFoundError, ValueError):
            return None

    def is_live(self, other: dict) -> bool:
        """Whether the holder recorded in the lock still runs: fresh heartbeat and, on this host, a live pid."""
        if time.time() - other.get("beat", 0) > self.stale_after_s:
            return False
        if other.get("host") != self.holder["host"]:
            return True
        try:
            os.kill(int(other["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> None:
        """Takes the lock, or raises StorageLocked naming the live holder."""
        while True:
            try:
                self.storage.write(self.NAME, self._record(), exclusive=True)
                return
            except StorageConflict:
                pass
            other = self.current()
            if other is None:
                continue  # released while we looked
            same_server = other.get("server") == self.holder.get("server")
            if not same_server and self.is_live(other):
                raise StorageLocked(
                    f"storage {self.storage.uri} is in use by another server (host {other.get('host')}, "
                    f"pid {other.get('pid')}, server {other.get('server')}, last seen "
                    f"{time.time() - other.get('beat', 0):.0f} s ago); stop it or use another serve.storage_uri")
            # Stale or our own: move it aside (only one taker's rename succeeds), then create anew.
            taken = f"{self.NAME}.taken-{uuid.uuid4().hex}"
            if self.storage.rename(self.NAME, taken):
                self.storage.delete(taken)

    def refresh(self) -> None:
        """Renews the heartbeat; raises StorageLocked if the lock was taken over meanwhile."""
        other = self.current()
        if other is None or other.get("server") != self.holder.get("server") or other.get("pid") != self.holder["pid"]:
            raise StorageLocked(f"storage {self.storage.uri} lock lost to {other}")
        self.storage.write(self.NAME, self._record())

    def release(self) -> None:
        other = self.current()
        if other is not None and other.get("server") == self.holder.get("server") and other.get("pid") == self.holder["pid"]:
            self.storage.delete(self.NAME)
