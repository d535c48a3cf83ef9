"""Helpers shared by the Serve adapters: unwrapping errors that crossed a Ray or Serve boundary into
the caller's errors (STATUS), batching and threads of replicas. The infrastructure's errors are
told apart in services/outages.py."""

from __future__ import annotations

import grpc
import ray
import torch

from longmem.config import LongMemConfig
from longmem.memory import CapacityExceeded, MemoryExists, MemoryNotFound, ShardUnavailable
from longmem.storage import StorageLocked, StorageMismatch

from .auth import Unauthenticated
from .outages import causes

# The errors a caller is told about, each with its gRPC status: the gateway answers with these codes,
# and a remote call re-raises them as themselves (`result`). Anything else is a bug: INTERNAL.
STATUS = ((Unauthenticated, grpc.StatusCode.UNAUTHENTICATED), (MemoryNotFound, grpc.StatusCode.NOT_FOUND),
          (MemoryExists, grpc.StatusCode.ALREADY_EXISTS), (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (ShardUnavailable, grpc.StatusCode.UNAVAILABLE), (StorageLocked, grpc.StatusCode.FAILED_PRECONDITION),
          (StorageMismatch, grpc.StatusCode.FAILED_PRECONDITION),
          (ValueError, grpc.StatusCode.INVALID_ARGUMENT))
KNOWN_ERRORS = tuple(kind for kind, _ in STATUS)


def known_cause(error: BaseException) -> BaseException | None:
    """The known error (STATUS) behind a Ray/Serve error, if any."""
    return next((e for e in causes(error)
                 if isinstance(e, KNOWN_ERRORS) and not isinstance(e, ray.exceptions.RayError)), None)


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


def configure_batching(config: LongMemConfig, *handlers) -> None:
    """Applies the configured batch size and wait to @serve.batch methods of a replica."""
    for handler in handlers:
        handler.set_max_batch_size(config.serve.batch_max_requests)
        handler.set_batch_wait_timeout_s(config.serve.batch_wait_timeout_s)


def raise_if_error(value):
    """A batched handler returns a failed request's exception in its place: raise it there."""
    if isinstance(value, BaseException):
        raise value
    return value


def row_starts(requests: list[list]) -> list[int]:
    """The first batch row of each request, when their rows are concatenated."""
    starts, row = [], 0
    for rows in requests:
        starts.append(row)
        row += len(rows)
    return starts
