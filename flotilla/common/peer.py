"""A channel to one replica of another Flotilla tier: what an EndpointPool holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flotilla.common.keepalive import PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S, keepalive_options
from flotilla.common.relay import RelayClient
from flotilla.common.tls import PLAINTEXT, Dialer

S = TypeVar("S")


class GrpcPeer(Generic[S]):
    """A channel to one replica of another Flotilla tier: its stub, its relay
    (unary calls as stream frames) and a gRPC health probe (what an EndpointPool holds).
    The channel keeps its connection alive with pings (``PEER_KEEPALIVE_S``).

    With TLS (``dialer``), a health probe that finds the certificate files renewed opens a new
    channel with them; calls in flight finish on the old one, closed once they have (at most
    ``RETIRE_GRACE_S``)."""

    RETIRE_GRACE_S = 60.0

    def __init__(
        self,
        address: str,
        stub_factory: Callable[[grpc.aio.Channel], S] | None = None,
        *,
        keepalive_s: float = PEER_KEEPALIVE_S,
        keepalive_timeout_s: float = PEER_KEEPALIVE_TIMEOUT_S,
        dialer: Dialer = PLAINTEXT,
    ) -> None:
        self.address = address
        self.dialer = dialer
        self._options = keepalive_options(keepalive_s, keepalive_timeout_s)
        self._stub_factory = stub_factory
        self._retiring: set[asyncio.Task[None]] = set()
        self._open()

    def _open(self) -> None:
        self._generation = self.dialer.generation
        self.channel = self.dialer.aio_channel(self.address, self._options)
        self.stub: S | None = self._stub_factory(self.channel) if self._stub_factory else None
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._relay: RelayClient | None = None

    def _renew_if_rotated(self) -> None:
        if self.dialer.generation == self._generation:
            return
        channel, relay = self.channel, self._relay
        self._open()
        task = asyncio.create_task(self._retire(channel, relay), name=f"retire channel {self.address}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, channel: grpc.aio.Channel, relay: RelayClient | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.RETIRE_GRACE_S
        while relay is not None and relay.open_calls and loop.time() < deadline:
            await asyncio.sleep(0.5)
        if relay is not None:
            await relay.close()
        await channel.close(grace=max(0.0, deadline - loop.time()))

    @property
    def relay(self) -> RelayClient:
        """Unary calls to this peer as frames on one stream (the peer serves ``Relay``)."""
        if self._relay is None:
            self._relay = RelayClient(self.channel, self.address)
        return self._relay

    async def serving(self, service: str = "") -> bool:
        self._renew_if_rotated()
        request = health_pb2.HealthCheckRequest(service=service)
        reply: health_pb2.HealthCheckResponse = await self._health.Check(request)  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub declares no methods
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._relay is not None:
            await self._relay.close()
        await self.channel.close()
