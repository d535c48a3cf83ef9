"""Helpers shared by the Serve adapters: unwrapping errors that crossed a Ray or Serve boundary."""

from __future__ import annotations

import ray
import torch

from longmem.memory import CapacityExceeded, MemoryExists, MemoryNotFound, ShardUnavailable

KNOWN_ERRORS = (MemoryNotFound, MemoryExists, CapacityExceeded, ShardUnavailable, ValueError)


def known_cause(error: BaseException) -> BaseException | None:
    """The core error (not found, exists, capacity, bad value) behind a Ray/Serve error, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KNOWN_ERRORS) and not isinstance(error, ray.exceptions.RayError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def result(call):
    """Resolves an ObjectRef or a Serve DeploymentResponse, re-raising core errors as themselves."""
    try:
        return ray.get(call) if isinstance(call, ray.ObjectRef) else call.result()
    except Exception as e:
        cause = known_cause(e)
        if cause is not None:
            raise cause from None
        raise


def set_replica_threads(threads: int) -> None:
    """Torch threads for a replica, when configured (0 keeps what Ray set up)."""
    if threads:
        torch.set_num_threads(threads)
