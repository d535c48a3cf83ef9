"""Telling the infrastructure's failures apart from the caller's errors and from bugs: an actor,
replica or node that died or is restarting answers UNAVAILABLE, a timeout inside the cluster
DEADLINE_EXCEEDED, each with a retry hint and never a traceback. Imports only Ray and gRPC: Serve's
gRPC proxy loads it (services/proxy.py)."""

from __future__ import annotations

import grpc
import ray
import ray.serve.exceptions

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

