"""A channel to one replica of another Flotilla tier: what an EndpointPool holds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flotilla.common.keepalive import PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S, keepalive_options
from flotilla.common.relay import RelayClient

S = TypeVar("S")


class GrpcPeer(Generic[S]):
    """A channel to one replica of another Flotilla tier: its stub, its relay
    (unary calls as stream frames) and a gRPC health probe (what an EndpointPool holds).
    The channel keeps its connection alive with pings (``PEER_KEEPALIVE_S``)."""

    def __init__(
        self,
        address: str,
        stub_factory: Callable[[grpc.aio.Channel], S] | None = None,
        *,
        keepalive_s: float = PEER_KEEPALIVE_S,
        keepalive_timeout_s: float = PEER_KEEPALIVE_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=keepalive_options(keepalive_s, keepalive_timeout_s))
        self.stub: S | None = stub_factory(self.channel) if stub_factory else None
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._relay: RelayClient | None = None

    @property
    def relay(self) -> RelayClient:
        """Unary calls to this peer as frames on one stream (the peer serves ``Relay``)."""
        if self._relay is None:
            self._relay = RelayClient(self.channel, self.address)
        return self._relay

    async def serving(self, service: str = "") -> bool:
        request = health_pb2.HealthCheckRequest(service=service)
        reply: health_pb2.HealthCheckResponse = await self._health.Check(request)  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._relay is not None:
            await self._relay.close()
        await self.channel.close()
