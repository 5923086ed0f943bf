"""Endpoint discovery through DNS: one name, every address behind it.

In Kubernetes a headless Service (``clusterIP: None``) answers its DNS name
with one A/AAAA record per ready pod. ``DnsEndpointSource`` resolves such a
``host:port`` name every ``interval_s`` and hands the sorted ``ip:port`` list
to a callback whenever it changes, so an ``EndpointPool`` can hold one
endpoint per pod (and balance, retry and eject per pod) instead of one
channel that gRPC's default ``pick_first`` pins to a single pod.

A failed resolution keeps the last known list: a DNS blip must not empty a
pool, and the pool's own health checks eject pods that are really gone. The
first failure and the recovery are logged once each, not every interval.

No grpc here: the caller maps addresses to peers.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from flotilla.common.addresses import join_address, split_target
from flotilla.common.clock import Clock, MonotonicClock
from flotilla.common.tasks import cancel_and_wait
from flotilla.pool.pool import EndpointPool

C = TypeVar("C")

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""(host, port) -> the IP addresses of host; raises OSError when it cannot resolve."""
OnChange = Callable[[list[str]], Awaitable[None] | None]
"""Called with the new sorted ``ip:port`` list (sync or async)."""


async def resolve_host(host: str, port: int) -> list[str]:
    """Every IPv4/IPv6 address of ``host`` (``socket.getaddrinfo`` in a thread: it blocks)."""
    infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class DnsEndpointSource:
    """Re-resolves one ``host:port`` name and reports the addresses behind it when they change."""

    def __init__(
        self,
        target: str,
        on_change: OnChange,
        *,
        interval_s: float = 5.0,
        resolver: Resolver = resolve_host,
        clock: Clock | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.target = target
        self.host, self.port = split_target(target)
        self.on_change = on_change
        self.interval_s = interval_s
        self.resolver = resolver
        self.clock = clock or MonotonicClock()
        self.addresses: list[str] = []
        """The last list reported (sorted, no duplicates); empty until the first resolution."""
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> bool:
        """Resolve once; report and return True when the list changed. A failure keeps the old list."""
        try:
            ips = await self.resolver(self.host, self.port)
        except OSError as exc:
            if not self._failing:
                log.warning("discovery: cannot resolve %s (keeping %d known addresses): %s",
                            self.target, len(self.addresses), exc)
            self._failing = True
            return False
        if self._failing:
            log.info("discovery: %s resolves again", self.target)
            self._failing = False
        addresses = sorted({join_address(ip, self.port) for ip in ips})
        if addresses == self.addresses:
            return False
        log.info("discovery: %s -> %s", self.target, ", ".join(addresses) or "(none)")
        self.addresses = addresses
        result = self.on_change(list(addresses))
        if inspect.isawaitable(result):
            await result
        return True

    def start(self) -> None:
        """Resolve now and then every ``interval_s`` until ``stop``."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"discovery:{self.target}")

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a failing callback must not end discovery
                log.exception("discovery: applying the addresses of %s failed", self.target)
            await self.clock.sleep(self.interval_s)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


class DnsEndpoints:
    """Several names (e.g. every address in ``endpoints.preprocess``) as one list: the union of
    what each resolves to, reported whenever it changes. ``start`` resolves every name once
    before it returns, so a caller can fill its pool before it serves."""

    def __init__(
        self,
        targets: Sequence[str],
        on_change: OnChange,
        *,
        interval_s: float = 5.0,
        resolver: Resolver = resolve_host,
        clock: Clock | None = None,
    ) -> None:
        self.on_change = on_change
        self._found: dict[str, list[str]] = {}
        self.addresses: list[str] = []
        self.sources = [
            DnsEndpointSource(t, functools.partial(self._apply, t), interval_s=interval_s, resolver=resolver,
                              clock=clock)
            for t in dict.fromkeys(targets)
        ]

    @property
    def targets(self) -> list[str]:
        return [s.target for s in self.sources]

    async def _apply(self, target: str, addresses: list[str]) -> None:
        self._found[target] = addresses
        union = sorted({a for found in self._found.values() for a in found})
        if union != self.addresses:
            self.addresses = union
            result = self.on_change(list(union))
            if inspect.isawaitable(result):
                await result

    async def start(self) -> None:
        for source in self.sources:
            await source.refresh()
            source.start()

    async def stop(self) -> None:
        for source in self.sources:
            await source.stop()


async def replace_endpoints(
    pool: EndpointPool[C],
    addresses: Sequence[str],
    make_client: Callable[[str], C],
    close_client: Callable[[C], Awaitable[None]],
) -> None:
    """Make ``pool`` exactly ``addresses``: endpoints that stay keep their client and state, new
    ones get ``make_client``, and the clients of those that left are closed."""
    if {e.address for e in pool.endpoints} == set(addresses):
        return
    current = {e.address: e.client for e in pool.endpoints}
    for client in pool.set_endpoints({a: current.get(a) or make_client(a) for a in addresses}):
        await close_client(client)


async def pool_following(
    pool: EndpointPool[C],
    targets: Sequence[str],
    make_client: Callable[[str], C],
    close_client: Callable[[C], Awaitable[None]],
    *,
    interval_s: float,
    resolver: Resolver = resolve_host,
) -> DnsEndpoints:
    """Keep ``pool`` equal to every address ``targets`` resolve to (started; stop it when done).

    Endpoints that stay keep their client and state; a client whose address
    went away is closed once the pool has dropped it.
    """

    async def follow(addresses: list[str]) -> None:
        await replace_endpoints(pool, addresses, make_client, close_client)

    endpoints = DnsEndpoints(targets, follow, interval_s=interval_s, resolver=resolver)
    await endpoints.start()
    return endpoints
