"""The router's routes over batching shards: deltas, shared peers, shard groups.

BatcherRoutes is driven with FleetState/FleetChange exactly as the fleet
watch drives it; its peers are fakes that record their closing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
from fakes import FakeClock, settle

from flotilla.api.v1 import controller_pb2
from flotilla.common.fleet import FleetState
from flotilla.config import PoolSettings
from flotilla.errors import ModelNotFound, NoHealthyEndpoint
from flotilla.pool.pool import Endpoint
from flotilla.services.router.server import BatcherRoutes
from flotilla.services.router.shards import ShardRoutes, SharedClients

A, B, C = "10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"


class FakePeer:
    """What the routes hold per shard: answers health probes, remembers being closed."""

    made: list[FakePeer] = []

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False
        FakePeer.made.append(self)

    async def serving(self, service: str = "") -> bool:
        return True

    async def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


class Fleet:
    """Drives routes as the watcher does: each message through FleetState, then ``apply``."""

    def __init__(self, routes: BatcherRoutes) -> None:
        self.routes = routes
        self.state = FleetState()
        self.generation = 0

    async def send(self, models: dict[str, Sequence[str]], removed: Sequence[str] = (), *, full: bool = False) -> None:
        self.generation += 1
        message = controller_pb2.Fleet(
            generation=self.generation, delta=not full, removed_models=removed,
            models=[controller_pb2.ModelStatus(name=n, batchers=list(b)) for n, b in models.items()],
        )
        await self.routes.apply(self.state, self.state.apply(message))


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    FakePeer.made = []
    routes = BatcherRoutes(PoolSettings(health_check_interval_s=3600.0), make_peer=FakePeer, linger_s=0.0)  # type: ignore[arg-type]
    try:
        yield Fleet(routes)
    finally:
        await routes.close()
    assert all(p.closed for p in FakePeer.made)


def open_peers() -> dict[str, int]:
    """Address -> how many unclosed peers to it (at most 1 each, when shared)."""
    counts: dict[str, int] = {}
    for peer in FakePeer.made:
        if not peer.closed:
            counts[peer.address] = counts.get(peer.address, 0) + 1
    return counts


def addresses(routes: BatcherRoutes, model: str) -> list[str]:
    return [e.address for e in routes.table.pool_for(model).endpoints]


async def test_models_on_the_same_shards_share_one_pool_and_one_peer_per_shard(fleet: Fleet) -> None:
    await fleet.send({f"m{i}": [A] for i in range(50)} | {"hot": [A, B], "other": [B]}, full=True)
    routes = fleet.routes
    assert len(routes.table) == 52
    assert routes.table.pool_for("m0") is routes.table.pool_for("m49")
    assert len(routes.groups) == 3  # {A}, {A, B}, {B}
    assert open_peers() == {A: 1, B: 1}
    assert sorted(addresses(routes, "hot")) == [A, B]
    assert routes.table.pool_for("hot").name == f"batchers[{A},{B}]"
    # The {A} group's peer and the {A, B} group's are one and the same.
    assert routes.table.pool_for("m0").endpoints[0].client is next(
        e.client for e in routes.table.pool_for("hot").endpoints if e.address == A
    )


async def test_a_delta_adds_moves_and_removes_only_the_models_it_names(fleet: Fleet) -> None:
    await fleet.send({"m1": [A], "m2": [A], "m3": [B]}, full=True)
    routes = fleet.routes
    pool_of_m1 = routes.table.pool_for("m1")

    await fleet.send({"new": [B]})
    assert addresses(routes, "new") == [B] and routes.table.pool_for("new") is routes.table.pool_for("m3")

    await fleet.send({"m2": [C]})  # moved to a shard nobody used yet
    assert addresses(routes, "m2") == [C]
    assert routes.table.pool_for("m1") is pool_of_m1  # untouched
    assert open_peers() == {A: 1, B: 1, C: 1}

    await fleet.send({}, removed=["m3"])
    with pytest.raises(ModelNotFound):
        routes.table.pool_for("m3")
    assert routes.table.models == ["m1", "m2", "new"]


async def test_a_model_with_no_shard_has_no_route(fleet: Fleet) -> None:
    await fleet.send({"m1": [A], "m2": []}, full=True)
    assert fleet.routes.table.models == ["m1"]
    await fleet.send({"m1": []})
    assert fleet.routes.table.models == []
    assert fleet.routes.groups == {} and open_peers() == {}


async def test_a_group_goes_with_its_last_model_and_a_shard_with_its_last_group(fleet: Fleet) -> None:
    await fleet.send({"m1": [A], "m2": [A, B], "m3": [B]}, full=True)
    routes = fleet.routes
    pool_a = routes.table.pool_for("m1")

    await fleet.send({"m1": [B]})  # {A} loses its only model; A is still in {A, B}
    assert set(routes.groups) == {(A, B), (B,)}
    assert pool_a.endpoints == []  # the dropped group let go of its endpoints
    assert open_peers() == {A: 1, B: 1}

    await fleet.send({}, removed=["m2"])  # {A, B} goes, and with it the last holder of A
    assert set(routes.groups) == {(B,)}
    assert open_peers() == {B: 1}
    assert routes.clients.holders(B) == 1  # one group holds it, whatever its models


async def test_a_whole_fleet_again_drops_the_models_it_lacks(fleet: Fleet) -> None:
    await fleet.send({"m1": [A], "m2": [B], "m3": [B]}, full=True)
    pool_b = fleet.routes.table.pool_for("m2")
    await fleet.send({"m2": [B], "m4": [C]}, full=True)  # a reconnected watch: m1 and m3 are gone
    routes = fleet.routes
    assert routes.table.models == ["m2", "m4"]
    assert routes.table.pool_for("m2") is pool_b  # unchanged routes keep their pool
    assert set(routes.groups) == {(B,), (C,)}
    assert open_peers() == {B: 1, C: 1}


async def test_a_shard_moving_its_models_to_another_keeps_calls_on_the_new_one(fleet: Fleet) -> None:
    await fleet.send({"m1": [A], "m2": [A]}, full=True)
    await fleet.send({"m1": [B]})
    await fleet.send({"m2": [B]})
    routes = fleet.routes
    assert routes.table.pool_for("m1") is routes.table.pool_for("m2")
    assert addresses(routes, "m1") == [B]
    assert open_peers() == {B: 1}
    assert len(FakePeer.made) == 2  # B's peer was made once, for m1, and reused for m2


async def test_a_not_found_from_a_shard_is_passed_on_and_not_held_against_it(fleet: Fleet) -> None:
    """The model left that shard a while ago: its answer says so, the shard itself is fine."""
    await fleet.send({"m1": [A]}, full=True)
    pool = fleet.routes.table.pool_for("m1")

    async def moved_away(endpoint: Endpoint[FakePeer]) -> bytes:
        raise ModelNotFound("model 'm1' is not served by this shard")

    for _ in range(pool.eject_after_failures + 2):
        with pytest.raises(ModelNotFound):
            await pool.call(moved_away)  # type: ignore[arg-type]
    assert [e.address for e in pool.admitted()] == [A]
    assert pool.endpoints[0].failures == 0


async def test_an_undeployed_model_answers_not_found_and_its_pool_none(fleet: Fleet) -> None:
    await fleet.send({"m1": [A]}, full=True)
    pool = fleet.routes.table.pool_for("m1")
    await fleet.send({}, removed=["m1"])
    with pytest.raises(ModelNotFound):
        fleet.routes.table.pool_for("m1")

    async def call(endpoint: Endpoint[FakePeer]) -> bytes:
        return b""

    with pytest.raises(NoHealthyEndpoint):  # a call that picked the pool before the change
        await pool.call(call)  # type: ignore[arg-type]


async def test_a_released_client_lingers_and_is_kept_when_wanted_again() -> None:
    clock = FakeClock()
    closed: list[str] = []

    async def close(client: str) -> None:
        closed.append(client)

    clients = SharedClients(lambda a: f"client of {a}", close, linger_s=5.0, clock=clock)
    first = clients.acquire(A)
    await clients.release(A)
    await settle()
    await clock.advance(4.0)
    assert closed == [] and len(clients) == 1
    assert clients.acquire(A) is first  # back before it closed: the same client
    await clients.release(A)
    await settle()
    await clock.advance(5.0)
    await settle()
    assert closed == [first] and len(clients) == 0
    await clients.close()


class FakeResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers

    async def __call__(self, host: str, port: int) -> list[str]:
        return list(self.answers.get(host, []))


async def test_with_dns_refresh_each_group_resolves_its_names_to_one_endpoint_per_pod() -> None:
    FakePeer.made = []
    resolver = FakeResolver({"shard-0.flotilla": ["10.1.0.1", "10.1.0.2"], "shard-1.flotilla": ["10.1.0.3"]})
    settings = PoolSettings(health_check_interval_s=3600.0, dns_refresh_interval_s=3600.0)
    routes: ShardRoutes[FakePeer] = ShardRoutes(
        settings, FakePeer, FakePeer.close, lambda e: e.client.serving(), linger_s=0.0, resolver=resolver
    )
    try:
        await routes.follow({"m1": ["shard-0.flotilla:50052"], "m2": ["shard-0.flotilla:50052"],
                             "m3": ["shard-0.flotilla:50052", "shard-1.flotilla:50052"]}, full=True)
        assert routes.table.pool_for("m1") is routes.table.pool_for("m2")
        assert [e.address for e in routes.table.pool_for("m1").endpoints] == ["10.1.0.1:50052", "10.1.0.2:50052"]
        assert len(routes.table.pool_for("m3").endpoints) == 3
        assert open_peers() == {"10.1.0.1:50052": 1, "10.1.0.2:50052": 1, "10.1.0.3:50052": 1}

        resolver.answers["shard-0.flotilla"] = ["10.1.0.2"]  # a pod went away
        for group in routes.groups.values():
            assert group.discovery is not None
            for source in group.discovery.sources:
                await source.refresh()
        assert [e.address for e in routes.table.pool_for("m1").endpoints] == ["10.1.0.2:50052"]
        assert open_peers() == {"10.1.0.2:50052": 1, "10.1.0.3:50052": 1}
    finally:
        await routes.close()
    assert all(p.closed for p in FakePeer.made)
