"""Is a gRPC server up? A blocking health check, for code outside the event loop (the local stack, tests)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flotilla.common.tls import PLAINTEXT, Dialer


def is_serving(address: str, *, service: str = "", timeout_s: float = 1.0, dialer: Dialer = PLAINTEXT) -> bool:
    """True when the gRPC server at ``address`` reports ``service`` as SERVING (over TLS with ``dialer``'s)."""
    try:
        with dialer.channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=service)
            reply: health_pb2.HealthCheckResponse = stub.Check(request, timeout=timeout_s)  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
