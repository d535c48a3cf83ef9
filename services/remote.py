"""Helpers shared by the Serve adapters: unwrapping errors that crossed a Ray or Serve boundary, and
telling the caller's errors (STATUS) and the infrastructure's (an actor or node that died or is
restarting: UNAVAILABLE; a timeout: DEADLINE_EXCEEDED) from real bugs."""

from __future__ import annotations

import grpc
import ray
import ray.serve.exceptions
import torch

from longmem.config import LongMemConfig
from longmem.memory import CapacityExceeded, MemoryExists, MemoryNotFound, ShardUnavailable
from longmem.storage import StorageLocked

from .auth import Unauthenticated

# The errors a caller is told about, each with its gRPC status: the gateway answers with these codes,
# and a remote call re-raises them as themselves (`result`). Anything else is a bug: INTERNAL.
STATUS = ((Unauthenticated, grpc.StatusCode.UNAUTHENTICATED), (MemoryNotFound, grpc.StatusCode.NOT_FOUND),
          (MemoryExists, grpc.StatusCode.ALREADY_EXISTS), (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (ShardUnavailable, grpc.StatusCode.UNAVAILABLE), (StorageLocked, grpc.StatusCode.FAILED_PRECONDITION),
          (ValueError, grpc.StatusCode.INVALID_ARGUMENT))
KNOWN_ERRORS = tuple(kind for kind, _ in STATUS)
# The infrastructure failing under a request: a retry later can succeed. (Not every Ray error: a
# RayTaskError is the code's own exception, carried across a boundary.)
UNAVAILABLE_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                      ray.exceptions.ActorUnschedulableError, ray.exceptions.NodeDiedError,
                      ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.WorkerCrashedError,
                      ray.exceptions.LocalRayletDiedError, ray.exceptions.TaskUnschedulableError,
                      ray.exceptions.OutOfMemoryError, ray.serve.exceptions.DeploymentUnavailableError,
                      ray.serve.exceptions.ReplicaUnavailableError, ray.serve.exceptions.BackPressureError)
TIMEOUT_ERRORS = (ray.exceptions.GetTimeoutError, ray.exceptions.ObjectFetchTimedOutError)


def causes(error: BaseException | None):
    """error, then what caused it, as far as the chain goes (Ray's `cause` and Python's __cause__)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "cause", None) or error.__cause__


def known_cause(error: BaseException) -> BaseException | None:
    """The known error (STATUS) behind a Ray/Serve error, if any."""
    return next((e for e in causes(error)
                 if isinstance(e, KNOWN_ERRORS) and not isinstance(e, ray.exceptions.RayError)), None)


def infrastructure_status(error: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(UNAVAILABLE or DEADLINE_EXCEEDED, a message with a retry hint) when an infrastructure failure
    is behind `error` (an actor or node that died or is restarting, a lost object, a full queue, a
    timeout); None for anything else. The message names the failure, never its traceback."""
    for e in causes(error):
        if isinstance(e, TIMEOUT_ERRORS):
            return grpc.StatusCode.DEADLINE_EXCEEDED, (f"a LongMem service did not answer in time "
                                                       f"({type(e).__name__}); retry")
        if isinstance(e, UNAVAILABLE_ERRORS):
            return grpc.StatusCode.UNAVAILABLE, (f"a LongMem service is unavailable ({type(e).__name__}); "
                                                 "retry in a few seconds")
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
