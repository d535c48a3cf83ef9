"""Runs inside Ray Serve's gRPC proxy: registers the LongMem servicer (serve.grpc_options names
`add_servicer`) so that two failures the proxy meets before the gateway is reached answer like the
gateway's own errors.

- Bytes that are not a valid request message: gRPC's server would answer UNKNOWN with the parser's
  exception. Here the request becomes an `Undecodable`, which the proxy forwards like any request and
  the gateway answers with INVALID_ARGUMENT.
- An ingress (gateway) replica that died under a request: Serve's proxy answers INTERNAL with Ray's
  actor-death report (ray.serve._private.grpc_util.get_grpc_response_status). A client cannot tell
  that from a bug, nor know that a retry may succeed; here it becomes UNAVAILABLE (or
  DEADLINE_EXCEEDED) with a retry hint, by the gateway's own rule (services/outages.py). Every other
  answer of the proxy is left as Serve makes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from longmem.v1.longmem_pb2_grpc import add_LongMemServicer_to_server

from .outages import infrastructure_status


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse as its message type."""
    message_type: str
    error: str

    def invalid(self) -> ValueError:
        return ValueError(f"the request is not a valid {self.message_type}: {self.error}")


def _lenient(parse, message_type: str):
    def parse_or_mark(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return Undecodable(message_type, str(e))
    return parse_or_mark


class _LenientServer:
    """Passes the servicer's handlers on to the proxy's server with lenient request parsers."""

    def __init__(self, server):
        self.server = server

    @staticmethod
    def _lenient_handlers(handlers: dict) -> dict:
        return {name: h._replace(request_deserializer=_lenient(
                    h.request_deserializer, f"longmem.v1.{name.rsplit('/', 1)[-1]}Request"))
                for name, h in handlers.items()}

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        for generic in generic_handlers:
            generic._method_handlers = self._lenient_handlers(generic._method_handlers)
        self.server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self.server.add_registered_method_handlers(service_name, self._lenient_handlers(handlers))


def response_status(exc: BaseException, request_timeout_s: float | None, request_id: str):
    from ray.serve._private.grpc_util import get_grpc_response_status
    from ray.serve._private.proxy_request_response import ResponseStatus

    status = get_grpc_response_status(exc, request_timeout_s, request_id)
    if status.code != grpc.StatusCode.INTERNAL:
        return status
    outage = infrastructure_status(exc)
    return status if outage is None else ResponseStatus(code=outage[0], is_error=True, message=outage[1])


def add_servicer(servicer, server) -> None:
    """Serve's servicer hook: called in the proxy with Serve's stand-in servicer and its server."""
    from ray.serve._private import proxy

    proxy.get_grpc_response_status = response_status
    add_LongMemServicer_to_server(servicer, _LenientServer(server))
