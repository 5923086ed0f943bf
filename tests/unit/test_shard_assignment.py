"""Which shard holds which model's queue: the controller's ShardBook, and the controller around it,
on a fake clock."""

from __future__ import annotations

import pytest
from fakes import FakeClock

from flotilla.config import ControllerSettings, ShardSettings
from flotilla.services.controller.controller import Controller
from flotilla.services.controller.registry import MemoryRecords
from flotilla.services.controller.shards import QueueCounts, ShardBook
from tests.unit.test_controller import FakeArtifacts, FakeReplica, spec

SETTINGS = ShardSettings(heartbeat_timeout_s=3.0, hot_model_rps=100.0, max_shards_per_model=3,
                         busy_cpu_cores=0.7, rebalance_interval_s=5.0)


def book_with(*addresses: str, now_s: float = 0.0) -> ShardBook:
    book = ShardBook(SETTINGS)
    for address in addresses:
        book.heartbeat(address, now_s, cpu_seconds_total=0.0, started=True)
    return book


def test_new_models_spread_over_the_shared_shards_by_models_held() -> None:
    book = book_with("s1:1", "s2:1")
    for i in range(10):
        book.add(f"m{i}", 0.0)
    held = sorted(len(s.models) for s in book.shards.values())
    assert held == [5, 5]
    assert all(len(book.holders[f"m{i}"]) == 1 for i in range(10))


def test_the_least_busy_shard_by_reported_rate_gets_the_next_model() -> None:
    book = book_with("s1:1", "s2:1")
    book.add("hot", 0.0)
    hot_shard = book.holders["hot"][0]
    # The hot model's shard reports 500 requests/s over a second; the other none.
    book.heartbeat(hot_shard, 1.0, counters={"hot": QueueCounts(500, 500)}, cpu_seconds_total=0.5)
    other = next(a for a in book.shards if a != hot_shard)
    book.heartbeat(other, 1.0, cpu_seconds_total=0.0)
    for i in range(3):
        book.add(f"cold{i}", 1.0)
    assert all(book.holders[f"cold{i}"] == [other] for i in range(3))


def test_a_silent_shard_loses_its_models_to_the_live_one_after_the_timeout() -> None:
    clock = FakeClock()
    book = book_with("s1:1", "s2:1")
    for i in range(6):
        book.add(f"m{i}", clock.now())
    on_s2 = {m for m, h in book.holders.items() if h == ["s2:1"]}
    assert on_s2

    clock.set(2.9)
    book.heartbeat("s1:1", clock.now())
    assert book.expire(clock.now()) == set(), "not silent long enough"
    clock.set(3.0)
    moved = book.expire(clock.now())
    assert moved == on_s2
    assert all(book.holders[m] == ["s1:1"] for m in moved)
    assert "s2:1" not in book.shards


def test_with_no_live_shard_models_stay_where_they_were() -> None:
    book = book_with("s1:1")
    book.add("m", 0.0)
    assert book.expire(10.0) == set()
    assert book.holders["m"] == ["s1:1"], "a route to a dead batcher (UNAVAILABLE) beats no route (NOT_FOUND)"
    # A shard reports again (a restart on another port): the stranded model goes there.
    book.heartbeat("s9:1", 10.0, started=True)
    assert book.expire(10.0) == {"m"}
    assert book.holders["m"] == ["s9:1"]


def test_a_model_added_while_no_shard_reports_gets_one_when_one_does() -> None:
    book = ShardBook(SETTINGS)
    assert book.add("m", 0.0) is False
    book.heartbeat("s1:1", 1.0, started=True)
    assert book.expire(1.0) == {"m"}
    assert book.holders["m"] == ["s1:1"]


def test_a_dedicated_model_moves_to_its_own_batcher_and_no_other_model_goes_there() -> None:
    book = book_with("s1:1")
    book.add("iso", 0.0, dedicated=True)
    assert book.holders["iso"] == ["s1:1"], "waits on a shared shard while no batcher of its own reports"
    moved = book.heartbeat("own:1", 1.0, dedicated_model="iso", started=True)
    assert moved == {"iso"}
    assert book.holders["iso"] == ["own:1"] and "iso" not in book.shards["s1:1"].models
    for i in range(5):
        book.add(f"m{i}", 1.0)
    assert book.shards["own:1"].models == {"iso"}


def test_a_hot_model_gets_another_shard_and_gives_it_back_when_it_cools() -> None:
    book = book_with("s1:1", "s2:1", "s3:1")

    def rebalance(now_s: float) -> tuple[set[str], str]:
        for address in list(book.shards):
            book.heartbeat(address, now_s)
        return book.rebalance(now_s)

    book.add("hot", 0.0)
    book.rates["hot"] = 250.0  # 250 on one shard, above 100 each
    moved, why = rebalance(0.0)
    assert moved == {"hot"} and len(book.holders["hot"]) == 2 and "hot_model_rps" in why
    assert rebalance(1.0) == (set(), ""), "one look per rebalance interval"
    moved, _ = rebalance(5.0)
    assert moved == {"hot"} and len(book.holders["hot"]) == 3
    moved, _ = rebalance(10.0)
    assert moved == set(), "max_shards_per_model"

    book.rates["hot"] = 20.0
    moved, why = rebalance(15.0)
    assert moved == {"hot"} and len(book.holders["hot"]) == 2 and "leaves" in why


def test_a_busy_shard_makes_room_around_its_hot_model_until_it_has_a_shard_of_its_own() -> None:
    book = book_with("s1:1", "s2:1")
    for name in ("hot", "a", "b", "c"):
        book.holders[name] = ["s1:1"]
        book.shards["s1:1"].models.add(name)
    busy, idle = book.shards["s1:1"], book.shards["s2:1"]
    book.rates.update({"hot": 90.0, "a": 20.0, "b": 10.0, "c": 5.0})  # below hot_model_rps: no spreading
    moves = []
    for t in (1.0, 6.0, 11.0, 16.0):
        book.heartbeat(busy.address, t)
        book.heartbeat(idle.address, t)
        busy.cpu_cores, idle.cpu_cores = 0.9, 0.1  # the hot model keeps its shard busy
        moved, why = book.rebalance(t)
        moves.append(moved)
        assert not moved or ("busy_cpu_cores" in why and "making room for hot" in why)
    assert moves == [{"a"}, {"b"}, {"c"}, set()], "the busiest of the rest first, the hot one never"
    assert busy.models == {"hot"} and idle.models == {"a", "b", "c"}


def test_counters_are_summed_over_shards_and_reset_by_a_restart() -> None:
    book = book_with("s1:1", "s2:1")
    book.heartbeat("s1:1", 1.0, counters={"m": QueueCounts(10, 9, 0.5, 1, 1)})
    book.heartbeat("s2:1", 1.0, counters={"m": QueueCounts(5, 5, 0.25, 0, 0)})
    assert book.counters("m") == QueueCounts(15, 14, 0.75, 1, 1)
    assert book.take_reported() == {"m"} and book.take_reported() == set()
    book.heartbeat("s2:1", 2.0, started=True)  # restarted: its counters start again
    assert book.counters("m") == QueueCounts(10, 9, 0.5, 1, 1)


def test_presumed_shards_keep_their_models_until_the_timeout() -> None:
    book = ShardBook(SETTINGS)
    book.presume("m", ["old:1"], 0.0)
    book.heartbeat("new:1", 1.0, started=True)
    assert book.expire(2.0) == set(), "the record's shard gets heartbeat_timeout_s to report in"
    assert book.expire(3.0) == {"m"} and book.holders["m"] == ["new:1"]


# -- the controller around the book -----------------------------------------------------------------


@pytest.fixture
def ctl() -> Controller:
    settings = ControllerSettings(drain_s=0.0, measure_memory=False, shards=SETTINGS)
    return Controller(settings, [FakeReplica("a:1", 1000.0)], FakeArtifacts(), MemoryRecords(),  # type: ignore[arg-type]
                      clock=FakeClock())


async def test_a_heartbeat_lists_the_shards_models_only_when_its_assignment_changed(ctl: Controller) -> None:
    first = ctl.shard_heartbeat("s1:1", started=True)
    await ctl.deploy("m", spec(min_copies=0))
    reply = ctl.shard_heartbeat("s1:1", assignment=first.assignment)
    assert reply.changed and [name for name, _ in reply.models] == ["m"]
    assert reply.models[0][1].batching.max_batch_size == ctl.records["m"].spec.batching.max_batch_size
    again = ctl.shard_heartbeat("s1:1", assignment=reply.assignment)
    assert not again.changed and again.models == []
    assert ctl.records["m"].batchers == ["s1:1"]


async def test_a_dead_shards_models_move_and_the_fleet_says_only_what_changed(ctl: Controller) -> None:
    clock = ctl.clock
    assert isinstance(clock, FakeClock)
    ctl.shard_heartbeat("s1:1", started=True)
    ctl.shard_heartbeat("s2:1", started=True)
    for i in range(4):
        await ctl.deploy(f"m{i}", spec(min_copies=0))
    on_s2 = {r.name for r in ctl.committed() if r.batchers == ["s2:1"]}
    before = ctl.generation

    clock.set(3.5)
    ctl.shard_heartbeat("s1:1")
    await ctl.shards_once()
    assert all(r.batchers == ["s1:1"] for r in ctl.committed())
    change = ctl.changes_since(before)
    assert change is not None and change.models == frozenset(on_s2)
    assert "s2:1" in change.shards and "s2:1" not in ctl.shards.shards


async def test_routes_name_a_shard_only_once_it_says_it_holds_the_model(ctl: Controller) -> None:
    from flotilla.services.controller.server import status_to_pb

    first = ctl.shard_heartbeat("s1:1", started=True)
    await ctl.deploy("m", spec(min_copies=0))
    assert ctl.records["m"].batchers == ["s1:1"], "assigned (and recorded) at once"
    assert list(status_to_pb(ctl, ctl.records["m"]).batchers) == [], "but not routed before the shard has a queue"
    reply = ctl.shard_heartbeat("s1:1", assignment=first.assignment)
    assert reply.changed
    before = ctl.generation
    ctl.shard_heartbeat("s1:1", assignment=reply.assignment)  # the shard applied the list: it says so
    assert list(status_to_pb(ctl, ctl.records["m"]).batchers) == ["s1:1"]
    change = ctl.changes_since(before)
    assert change is not None and change.models == frozenset({"m"})
    # Restarted, it stays named: its calls wait for its next heartbeat's answer, which gives the model back.
    reply = ctl.shard_heartbeat("s1:1", started=True)
    assert list(status_to_pb(ctl, ctl.records["m"]).batchers) == ["s1:1"]
    assert reply.changed and [n for n, _ in reply.models] == ["m"]


async def test_a_held_heartbeat_answers_as_soon_as_the_shard_is_given_a_model(ctl: Controller) -> None:
    import asyncio

    first = ctl.shard_heartbeat("s1:1", started=True)
    ctl.shard_heartbeat("s1:1", assignment=first.assignment)
    waiting = asyncio.create_task(ctl.shard_wait("s1:1", first.assignment))
    await asyncio.sleep(0)
    assert not waiting.done()
    await ctl.deploy("m", spec(min_copies=0))
    reply = await asyncio.wait_for(waiting, 0.5)
    assert reply.changed and [n for n, _ in reply.models] == ["m"] and reply.interval_s == 0.0


async def test_a_moved_model_stays_routed_to_its_old_shard_until_the_new_one_has_it(ctl: Controller) -> None:
    from flotilla.services.controller.server import status_to_pb

    clock = ctl.clock
    assert isinstance(clock, FakeClock)
    a = ctl.shard_heartbeat("s1:1", started=True)
    a = ctl.shard_heartbeat("s1:1", assignment=a.assignment)
    await ctl.deploy("m", spec(min_copies=0))
    a = ctl.shard_heartbeat("s1:1", assignment=a.assignment)
    ctl.shard_heartbeat("s1:1", assignment=a.assignment)
    assert list(status_to_pb(ctl, ctl.records["m"]).batchers) == ["s1:1"]

    b = ctl.shard_heartbeat("s2:1", started=True)
    clock.set(3.5)  # s1 falls silent; s2 keeps reporting
    b = ctl.shard_heartbeat("s2:1", assignment=b.assignment)
    await ctl.shards_once()
    assert ctl.records["m"].batchers == ["s2:1"]
    assert list(status_to_pb(ctl, ctl.records["m"]).batchers) == ["s1:1"], (
        "until s2 has the queue, calls go where it was (UNAVAILABLE, retryable), not NOT_FOUND"
    )
    reply = ctl.shard_heartbeat("s2:1", assignment=b.assignment)
    ctl.shard_heartbeat("s2:1", assignment=reply.assignment)
    assert list(status_to_pb(ctl, ctl.records["m"]).batchers) == ["s2:1"]


async def test_a_registered_model_with_no_shard_recorded_gets_one_when_a_shard_reports() -> None:
    records = MemoryRecords()
    first = Controller(ControllerSettings(drain_s=0.0, measure_memory=False, shards=SETTINGS),
                       [FakeReplica("a:1", 1000.0)], FakeArtifacts(), records, clock=FakeClock())  # type: ignore[arg-type]
    await first.deploy("m", spec(min_copies=0))
    assert first.records["m"].batchers == []

    second = Controller(ControllerSettings(drain_s=0.0, measure_memory=False, shards=SETTINGS),
                        [FakeReplica("a:1", 1000.0)], FakeArtifacts(), records, clock=FakeClock())  # type: ignore[arg-type]
    await second.start()
    try:
        second.shard_heartbeat("s1:1", started=True)
        await second.shards_once()
        assert second.records["m"].batchers == ["s1:1"]
    finally:
        await second.stop()


async def test_a_shard_hears_the_change_to_its_models_not_its_whole_list(ctl: Controller) -> None:
    held = ctl.shard_heartbeat("s1:1", started=True).assignment
    for i in range(3):
        await ctl.deploy(f"m{i}", spec(min_copies=0))
    first = ctl.shard_heartbeat("s1:1", assignment=held)
    assert [n for n, _ in first.models] == ["m0", "m1", "m2"] and not first.full, "given since it held nothing"

    await ctl.deploy("m3", spec(min_copies=0))
    added = ctl.shard_heartbeat("s1:1", assignment=first.assignment)
    assert not added.full and [n for n, _ in added.models] == ["m3"] and added.removed == []

    await ctl.undeploy("m1")
    removed = ctl.shard_heartbeat("s1:1", assignment=added.assignment)
    assert not removed.full and removed.models == [] and removed.removed == ["m1"]

    restarted = ctl.shard_heartbeat("s1:1", started=True)
    assert restarted.full and [n for n, _ in restarted.models] == ["m0", "m2", "m3"]
