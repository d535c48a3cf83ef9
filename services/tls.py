"""A TLS front for the gRPC API: Ray Serve's gRPC proxy speaks plaintext only.

`TlsFront` listens with server credentials and forwards every `longmem.v1.LongMem` call to the
Serve proxy on loopback, unchanged: the message bytes, the caller's metadata (API key, application),
the deadline, the status code and message, and Generate's stream. Expose the TLS port and keep the
plaintext port (9000) closed to the outside.
"""

from __future__ import annotations

from concurrent import futures

import grpc

from longmem.v1 import longmem_pb2

SERVICE = "longmem.v1.LongMem"


def _forwarded_metadata(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    return [(k, v) for k, v in context.invocation_metadata() if not k.startswith((":", "grpc-"))]


class TlsFront:
    def __init__(self, upstream: str, port: int, cert_chain: bytes, private_key: bytes, host: str = "[::]",
                 workers: int = 32, max_message_bytes: int = 64 * 1024 * 1024):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(upstream, options=options)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
        methods = longmem_pb2.DESCRIPTOR.services_by_name["LongMem"].methods
        handlers = {m.name: self._handler(m.name, m.server_streaming) for m in methods}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        credentials = grpc.ssl_server_credentials([(private_key, cert_chain)])
        self.port = self.server.add_secure_port(f"{host}:{port}", credentials)

    def _handler(self, name: str, streaming: bool):
        path = f"/{SERVICE}/{name}"
        if streaming:
            call = self.channel.unary_stream(path)

            def forward_stream(request: bytes, context: grpc.ServicerContext):
                try:
                    yield from call(request, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
                except grpc.RpcError as e:
                    context.abort(e.code(), e.details())
            return grpc.unary_stream_rpc_method_handler(forward_stream)
        call = self.channel.unary_unary(path)

        def forward(request: bytes, context: grpc.ServicerContext):
            try:
                return call(request, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
        return grpc.unary_unary_rpc_method_handler(forward)

    def start(self) -> "TlsFront":
        self.server.start()
        return self

    def stop(self, grace_s: float | None = None) -> None:
        self.server.stop(grace_s).wait()
        self.channel.close()
