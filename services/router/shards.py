"""The router's routes over batching shards: one pool per set of shards, one client per shard.

A fleet runs thousands of models on a few shards, each model's queue on
one shard (a hot model's on several). Models whose queues sit on the same
set of shards share a *shard group*: one EndpointPool and one active
health check over those shards. Every group that holds a shard uses the
same client to it (``SharedClients``, counted), so the router keeps one
connection and one relay stream per shard however many models and groups
route there, and metric labels name groups, not models.

``ShardRoutes.follow`` applies a batch of route changes: a model's route is
its group's pool in the RouteTable, so a change costs the change (look up
or create the group, point the model at its pool), not the fleet. A group
appears with the first model on its set of shards and goes (check stopped,
its clients let go) with the last. A shard no model routes to any more is
closed after ``linger_s``, so calls still in flight on it can finish.

With ``dns_refresh_interval_s`` set, the addresses are names (headless
Services) that each group re-resolves, holding one endpoint per address
behind them.

No grpc here: the caller supplies the client factory and the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flotilla.common.clock import Clock, MonotonicClock
from flotilla.config import PoolSettings
from flotilla.pool.discovery import DnsEndpoints, Resolver, resolve_host
from flotilla.pool.pool import ActiveHealthCheck, EndpointPool, Probe, pool_from_settings
from flotilla.services.router.routing import RouteTable

C = TypeVar("C")

log = logging.getLogger(__name__)

LINGER_S = 5.0
"""How long a client no group holds stays open: calls in flight on a shard a model just left
finish (the shard keeps a moved model's queue for a grace period), and a model that comes
back finds the connection still up."""

ShardSet = tuple[str, ...]
"""A group's key: its shards' addresses, sorted, without repeats."""


def shard_set(addresses: Iterable[str]) -> ShardSet:
    return tuple(sorted(set(addresses)))


def group_name(shards: ShardSet) -> str:
    """The group's pool name (its metric label and log prefix): the shards it spans."""
    return f"batchers[{','.join(shards)}]"


class SharedClients(Generic[C]):
    """One client per address, shared by every holder; closed ``linger_s`` after the last lets go."""

    def __init__(
        self,
        make: Callable[[str], C],
        close: Callable[[C], Awaitable[None]],
        *,
        linger_s: float = LINGER_S,
        clock: Clock | None = None,
    ) -> None:
        self._make = make
        self._close = close
        self.linger_s = linger_s
        self._clock = clock or MonotonicClock()
        self._clients: dict[str, C] = {}
        self._holders: dict[str, int] = {}
        self._closing: dict[str, asyncio.Task[None]] = {}
        """Clients nobody holds, each with the task that closes it once it has lingered."""

    def __len__(self) -> int:
        """Clients open (held, or lingering)."""
        return len(self._clients)

    def holders(self, address: str) -> int:
        return self._holders.get(address, 0)

    def acquire(self, address: str) -> C:
        closing = self._closing.pop(address, None)
        if closing is not None:
            closing.cancel()  # wanted again before it closed: keep it
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self._make(address)
        self._holders[address] = self._holders.get(address, 0) + 1
        return client

    async def release(self, address: str) -> None:
        held = self._holders.get(address, 0) - 1
        if held > 0:
            self._holders[address] = held
            return
        self._holders.pop(address, None)
        if address not in self._clients:
            return
        if self.linger_s <= 0:
            await self._close(self._clients.pop(address))
            return
        self._closing[address] = asyncio.get_running_loop().create_task(
            self._close_later(address), name=f"linger:{address}"
        )

    async def _close_later(self, address: str) -> None:
        await self._clock.sleep(self.linger_s)
        self._closing.pop(address, None)
        await self._close(self._clients.pop(address))

    async def close(self) -> None:
        """Close every client now, held or not."""
        for task in self._closing.values():
            task.cancel()
        for task in self._closing.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closing.clear()
        self._holders.clear()
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await self._close(client)


@dataclass(eq=False)
class ShardGroup(Generic[C]):
    """The models whose queues sit on exactly ``shards``, and the pool they share."""

    shards: ShardSet
    pool: EndpointPool[C]
    check: ActiveHealthCheck[C]
    discovery: DnsEndpoints | None = None
    """Re-resolves ``shards`` (names) in DNS-refresh mode."""
    models: set[str] = field(default_factory=set)


class ShardRoutes(Generic[C]):
    """Keeps a RouteTable of models → shard-group pools, changed one model at a time."""

    def __init__(
        self,
        settings: PoolSettings,
        make_client: Callable[[str], C],
        close_client: Callable[[C], Awaitable[None]],
        probe: Probe[C],
        *,
        linger_s: float = LINGER_S,
        clock: Clock | None = None,
        resolver: Resolver = resolve_host,
    ) -> None:
        self.settings = settings
        self.probe = probe
        self.resolver = resolver
        self.table: RouteTable[C] = RouteTable()
        self.clients: SharedClients[C] = SharedClients(make_client, close_client, linger_s=linger_s, clock=clock)
        self.groups: dict[ShardSet, ShardGroup[C]] = {}
        self._group_of: dict[str, ShardGroup[C]] = {}

    async def follow(
        self, routes: Mapping[str, Sequence[str]], removed: Iterable[str] = (), *, full: bool = False
    ) -> None:
        """Route each model of ``routes`` to its shards (none: no route) and drop ``removed``.

        ``full``: ``routes`` is every model there is; any other routed model is dropped too.
        """
        gone = list(removed)
        if full:
            gone += [m for m in self._group_of if m not in routes]
        changed: dict[str, EndpointPool[C]] = {}
        left: list[tuple[ShardGroup[C], str]] = []
        for model, addresses in routes.items():
            shards = shard_set(addresses)
            if not shards:
                gone.append(model)
                continue
            old = self._group_of.get(model)
            if old is not None and old.shards == shards:
                continue
            new = await self._group(shards)
            new.models.add(model)
            self._group_of[model] = new
            changed[model] = new.pool
            if old is not None:
                left.append((old, model))
            if not full:
                log.info("router: route for %s -> %s", model, ", ".join(shards))
        dropped = [m for m in dict.fromkeys(gone) if m not in changed and m in self._group_of]
        for model in dropped:
            left.append((self._group_of.pop(model), model))
            if not full:
                log.info("router: route for %s removed", model)
        # The table first: no call is routed to a group about to be dropped.
        self.table.update(changed, dropped)
        for group, model in left:
            await self._leave(group, model)
        if full:
            log.info("router: %d routes (%d dropped) over %d shard groups, %d shards", len(self.table),
                     len(dropped), len(self.groups), len(self.clients))

    async def _group(self, shards: ShardSet) -> ShardGroup[C]:
        group = self.groups.get(shards)
        if group is not None:
            return group
        pool, check = pool_from_settings(group_name(shards), {}, self.settings, probe=self.probe)
        group = self.groups[shards] = ShardGroup(shards, pool, check)
        if self.settings.dns_refresh_interval_s:
            # Shards behind headless Services: one endpoint per pod, re-resolved.
            async def point(addresses: list[str]) -> None:
                await self._point(group, addresses)

            group.discovery = DnsEndpoints(
                shards, point, interval_s=self.settings.dns_refresh_interval_s, resolver=self.resolver
            )
            await group.discovery.start()
        else:
            await self._point(group, shards)
        check.start()
        log.info("router: shard group %s created", pool.name)
        return group

    async def _point(self, group: ShardGroup[C], addresses: Sequence[str]) -> None:
        """Make the group's pool exactly ``addresses``, taking and letting go of shared clients."""
        held = {e.address: e.client for e in group.pool.endpoints}
        wanted = dict.fromkeys(addresses)
        if held.keys() == wanted.keys():
            return
        group.pool.set_endpoints({a: held[a] if a in held else self.clients.acquire(a) for a in wanted})
        for address in held.keys() - wanted.keys():
            await self.clients.release(address)

    async def _leave(self, group: ShardGroup[C], model: str) -> None:
        group.models.discard(model)
        if not group.models:
            await self._drop(group)

    async def _drop(self, group: ShardGroup[C]) -> None:
        del self.groups[group.shards]
        if group.discovery is not None:
            await group.discovery.stop()
        await group.check.stop()
        addresses = [e.address for e in group.pool.endpoints]
        group.pool.set_endpoints({})
        for address in addresses:
            await self.clients.release(address)
        log.info("router: shard group %s dropped (no model left on it)", group.pool.name)

    async def close(self) -> None:
        self.table.update({}, list(self._group_of))
        self._group_of.clear()
        for group in list(self.groups.values()):
            await self._drop(group)
        await self.clients.close()
