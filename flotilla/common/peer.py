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
from flotilla.common.tls import PLAINTEXT, Dialer, RenewingChannel

S = TypeVar("S")


class GrpcPeer(Generic[S]):
    """A channel to one replica of another Flotilla tier: its stub, its relay
    (unary calls as stream frames) and a gRPC health probe (what an EndpointPool holds).
    The channel keeps its connection alive with pings (``PEER_KEEPALIVE_S``).

    With TLS (``dialer``), a health probe that finds the certificate files renewed opens a new
    channel with them (``RenewingChannel``); calls in flight finish on the old one, its relay
    closed once they have (at most ``RETIRE_GRACE_S``)."""

    RETIRE_GRACE_S = 60.0

    def __init__(
        self,
        address: str,
        stub_factory: Callable[[grpc.aio.Channel], S] | None = None,
        *,
        keepalive_s: float = PEER_KEEPALIVE_S,
        keepalive_timeout_s: float = PEER_KEEPALIVE_TIMEOUT_S,
        dialer: Dialer = PLAINTEXT,
        relay_pacing_s: float = 0.0,
        tier: str = "",
    ) -> None:
        self.address = address
        self.tier = tier
        """What the peer is (``"batcher"``, ``"preprocess worker"``): its relay's failures name it with the address."""
        self.relay_pacing_s = relay_pacing_s
        """The relay's ``pacing_s`` (``relay.coalesce_wait_s``; the router's ``router.pacing_ms``)."""
        self._stub_factory = stub_factory
        self._channel = RenewingChannel(
            dialer, address, keepalive_options(keepalive_s, keepalive_timeout_s), retire_grace_s=self.RETIRE_GRACE_S
        )
        self._retiring: set[asyncio.Task[None]] = set()
        self.relay_unimplemented = False
        """The peer answered its relay UNIMPLEMENTED (a version from before it served one): callers that
        may fall back (the batcher's batches) make unary calls to it."""
        self._bind()

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel.channel

    def _bind(self) -> None:
        """The stub, health probe and (when first used) relay on the current channel."""
        self.stub: S | None = self._stub_factory(self.channel) if self._stub_factory else None
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._relay: RelayClient | None = None

    def _renew_if_rotated(self) -> None:
        relay = self._relay
        if not self._channel.renew():
            return
        self._bind()
        if relay is not None:
            task = asyncio.create_task(self._retire(relay), name=f"retire relay {self.address}")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, relay: RelayClient) -> None:
        """Close a renewed-away channel's relay once its calls are answered (the channel closes after)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.RETIRE_GRACE_S
        while relay.open_calls and loop.time() < deadline:
            await asyncio.sleep(0.5)
        await relay.close()

    @property
    def relay(self) -> RelayClient:
        """Unary calls to this peer as frames on one stream (the peer serves ``Relay``)."""
        if self._relay is None:
            label = f"{self.tier} {self.address}" if self.tier else self.address
            self._relay = RelayClient(self.channel, label, pacing_s=self.relay_pacing_s)
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
        await self._channel.close()
