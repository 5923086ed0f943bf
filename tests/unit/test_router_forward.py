"""``Forwarder.call`` (services.router.forward) over stand-in batcher peers: a call that fails
UNAVAILABLE after its model moved to other shards goes again on the model's pool now, and one whose
model's only shard is dead waits for the model to move while another shard could take it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc
import pytest

from flotilla.common.interceptors import AdmissionLimit, CallObserver, place_given_back
from flotilla.common.relay import RelayClient
from flotilla.errors import FlotillaError, InvalidArgument, NoHealthyEndpoint, Unavailable
from flotilla.pool.pool import EndpointPool
from flotilla.services.router.forward import ROUTE_MOVES, Forwarder
from flotilla.services.router.routing import ApiKeys, RouteTable


class Peer:
    """A batcher's client whose relay answers with ``answer`` (a function of the call's number, run
    when the call is made: it may move the route, then answer or raise)."""

    def __init__(self, answer: Callable[[int], bytes]) -> None:
        self.answer = answer
        self.calls = 0

    @property
    def relay(self) -> RelayClient:
        return self  # type: ignore[return-value]  # duck-typed: only call() is used

    async def call(
        self, method: str, request: bytes, headers: Sequence[tuple[str, str]], timeout_s: float | None
    ) -> bytes:
        self.calls += 1
        return self.answer(self.calls)


def pool(name: str, peer: Peer) -> EndpointPool[Peer]:
    return EndpointPool(name, {f"{name}:1": peer}, max_attempts=1)


def forwarder(routes: RouteTable[Peer]) -> Forwarder[Peer]:
    return Forwarder(ApiKeys(["k"]), routes)


async def test_a_call_failing_after_its_model_moved_goes_again_on_the_models_pool_now() -> None:
    routes: RouteTable[Peer] = RouteTable()
    new = Peer(lambda _: b"answer from the shard the model moved to")

    def left(_: int) -> bytes:
        routes.put("m", pool("new", new))  # the model moved while the call was under way
        raise Unavailable("relay stream to old:1 failed: the shard left the model")

    old = Peer(left)
    routes.put("m", pool("old", old))
    assert await forwarder(routes).call("m", b"req", []) == b"answer from the shard the model moved to"
    assert (old.calls, new.calls) == (1, 1)


async def test_a_call_failing_where_its_model_still_is_or_no_longer_is_raises_its_error() -> None:
    def broken(_: int) -> bytes:
        raise Unavailable("relay stream to only:1 failed")

    routes: RouteTable[Peer] = RouteTable()
    routes.put("m", pool("only", Peer(broken)))
    with pytest.raises(Unavailable, match="only:1 failed"):
        await forwarder(routes).call("m", b"req", [])

    def undeployed(_: int) -> bytes:
        routes.remove("m")
        raise Unavailable("relay stream to only:1 failed")

    routes.put("m", pool("only", Peer(undeployed)))
    with pytest.raises(Unavailable, match="only:1 failed"):
        await forwarder(routes).call("m", b"req", [])


async def test_only_unavailable_follows_the_model_and_a_model_that_keeps_moving_at_most_route_moves_times() -> None:
    routes: RouteTable[Peer] = RouteTable()
    elsewhere = Peer(lambda _: b"never asked")

    def refused(_: int) -> bytes:
        routes.put("m", pool("elsewhere", elsewhere))
        raise InvalidArgument("image uuid is not a uuid")

    routes.put("m", pool("first", Peer(refused)))
    with pytest.raises(InvalidArgument):
        await forwarder(routes).call("m", b"req", [])
    assert elsewhere.calls == 0, "an answer of the request's own is not sent again"

    hops: list[Peer] = []

    def moving(_: int) -> bytes:
        peer = Peer(moving)
        hops.append(peer)
        routes.put("m", pool(f"hop{len(hops)}", peer))
        raise Unavailable(f"hop {len(hops)} failed")

    routes.put("m", pool("start", Peer(moving)))
    with pytest.raises(FlotillaError, match=f"hop {ROUTE_MOVES + 1} failed"):
        await forwarder(routes).call("m", b"req", [])
    assert sum(p.calls for p in hops) == ROUTE_MOVES, "the call followed the model ROUTE_MOVES times"


def dead(_: int) -> bytes:
    raise Unavailable("relay stream to old:1 failed: connection refused")


def holding(routes: RouteTable[Peer], shards: list[str], hold_s: float) -> Forwarder[Peer]:
    return Forwarder(ApiKeys(["k"]), routes, move_hold_s=hold_s, shards=lambda model: shards)


async def test_a_call_whose_models_only_shard_is_dead_waits_for_the_model_to_move_to_another() -> None:
    routes: RouteTable[Peer] = RouteTable()
    routes.put("m", pool("old", Peer(dead)))
    survivor = Peer(lambda _: b"answer from the survivor")

    async def move_later() -> None:
        await asyncio.sleep(0.05)  # duration: the controller noticing the dead shard
        routes.remove("m")  # a move may pass through no route at all
        await asyncio.sleep(0.05)  # duration: the new route on its way
        routes.put("m", pool("survivor", survivor))

    mover = asyncio.create_task(move_later())
    started_s = time.monotonic()
    assert await holding(routes, ["old:1", "survivor:1"], 3600.0).call("m", b"req", []) == b"answer from the survivor"
    assert time.monotonic() - started_s >= 0.1, "the call waited for the move"
    await mover


async def test_the_wait_for_a_move_is_bounded_by_the_hold_and_by_the_calls_deadline() -> None:
    routes: RouteTable[Peer] = RouteTable()
    routes.put("m", pool("old", Peer(dead)))
    started_s = time.monotonic()
    with pytest.raises(NoHealthyEndpoint, match="connection refused"):
        await holding(routes, ["old:1", "other:1"], 0.2).call("m", b"req", [])
    assert 0.2 <= time.monotonic() - started_s < 5.0
    started_s = time.monotonic()
    with pytest.raises(NoHealthyEndpoint):
        await holding(routes, ["old:1", "other:1"], 3600.0).call("m", b"req", [], time_remaining=lambda: 0.1)
    assert time.monotonic() - started_s < 5.0, "an hour's hold ended at the call's deadline"


async def test_a_call_fails_at_once_where_no_other_shard_could_take_the_model_or_the_failure_is_from_below() -> None:
    routes: RouteTable[Peer] = RouteTable()
    routes.put("m", pool("old", Peer(dead)))
    # The only shard of the fleet (the local stack's one batcher): nothing to move to, fail fast.
    with pytest.raises(NoHealthyEndpoint):
        await asyncio.wait_for(holding(routes, ["old:1"], 3600.0).call("m", b"req", []), 5.0)

    def store_down(_: int) -> bytes:
        raise Unavailable("object store unavailable", origin="object store 127.0.0.1:8333")

    routes.put("m", pool("old", Peer(store_down)))
    # The shard answered: the tier under it failed. Moving the model would not help.
    with pytest.raises(Unavailable, match="object store unavailable"):
        await asyncio.wait_for(holding(routes, ["old:1", "other:1"], 3600.0).call("m", b"req", []), 5.0)


async def test_a_waiting_call_gives_its_admission_place_back_and_at_most_max_held_calls_wait() -> None:
    routes: RouteTable[Peer] = RouteTable()
    routes.put("m", pool("old", Peer(dead)))
    limit = AdmissionLimit("router", 2, "router.max_concurrent_calls")
    observer = CallObserver("router", limit)
    held = Forwarder(ApiKeys(["k"]), routes, move_hold_s=3600.0, shards=lambda model: ["old:1", "new:1"],
                     max_held_calls=1)

    async def admitted_call() -> bytes:
        call = observer.begin("Classify", "m", ())
        try:
            return await held.call("m", b"req", [])
        finally:
            observer.end(call, grpc.StatusCode.OK)

    waiting = asyncio.create_task(admitted_call())
    while held.held == 0:
        await asyncio.sleep(0.01)  # duration: the call failing on the dead shard and starting to wait
    assert limit.active == 0, "the waiting call's place is free for other models' calls"
    # A second call past max_held_calls fails at once, as with nowhere to move, and frees its place.
    with pytest.raises(NoHealthyEndpoint):
        await asyncio.wait_for(admitted_call(), 5.0)
    assert (held.held, limit.active) == (1, 0)

    routes.put("m", pool("new", Peer(lambda _: b"moved")))
    assert await asyncio.wait_for(waiting, 5.0) == b"moved"
    assert (held.held, limit.active) == (0, 0), "the place was taken back for the rest of the call, then freed"


async def test_a_call_holding_no_place_waits_as_it_is_and_an_ended_one_takes_none_back() -> None:
    limit = AdmissionLimit("router", 1, "router.max_concurrent_calls")
    observer = CallObserver("router", limit)
    with place_given_back():  # nothing begun in this context
        assert limit.active == 0
    call = observer.begin("Classify", "m", ())
    assert limit.active == 1
    with place_given_back():
        assert limit.active == 0
        with place_given_back():  # the same call again (one KServe request's images): given back once
            assert limit.active == 0
        observer.end(call, grpc.StatusCode.CANCELLED)  # ended while waiting (cancelled)
    assert limit.active == 0, "an ended call takes no place back"
