"""WatchFleet deltas: a watcher applying them holds what a whole snapshot says, and each carries the
change, not the fleet."""

from __future__ import annotations

from fakes import FakeClock

from flotilla.common.fleet import FleetState
from flotilla.config import ControllerSettings
from flotilla.services.controller.controller import Controller
from flotilla.services.controller.registry import MemoryRecords
from flotilla.services.controller.server import FleetFeed, fleet_to_pb
from tests.unit.test_controller import FakeArtifacts, FakeReplica, spec


def controller(change_log: int = 4096) -> Controller:
    settings = ControllerSettings(drain_s=0.0, measure_memory=False)
    replicas = [FakeReplica("a:1", 1000.0), FakeReplica("b:1", 1000.0)]
    return Controller(settings, replicas, FakeArtifacts(), MemoryRecords(), clock=FakeClock(),  # type: ignore[arg-type]
                      change_log=change_log)


def same(state: FleetState, ctl: Controller) -> None:
    whole = FleetState()
    whole.apply(fleet_to_pb(ctl))
    for status in [*state.models.values(), *whole.models.values()]:
        status.ClearField("last_used_unix_s")  # wall-clock seconds, computed when the message is built
    assert state.models == whole.models
    assert state.replicas == whole.replicas
    assert state.shards == whole.shards
    assert state.generation == ctl.generation


async def test_deltas_rebuild_the_whole_fleet_and_carry_only_the_change() -> None:
    ctl = controller()
    feed = FleetFeed(ctl)
    state = FleetState()
    ctl.shard_heartbeat("s1:1", started=True)
    for i in range(20):
        await ctl.deploy(f"m{i}", spec(min_copies=0))
    first = feed.message(None)
    change = state.apply(first)
    assert change.full and len(change.changed) == 20

    await ctl.ensure_loaded("m3")
    message = feed.message(state.generation)
    assert message.delta and [m.name for m in message.models] == ["m3"]
    assert {r.address for r in message.replicas} <= {"a:1", "b:1"} and message.replicas
    change = state.apply(message)
    assert change.changed == ["m3"] and not change.full
    same(state, ctl)

    await ctl.undeploy("m5")
    message = feed.message(state.generation)
    assert list(message.removed_models) == ["m5"] and "m5" not in [m.name for m in message.models]
    change = state.apply(message)
    assert change.removed == ["m5"]
    same(state, ctl)
    assert all(not m.events for m in state.models.values()), "the fleet leaves events to GetModel"


async def test_a_watcher_too_far_behind_gets_the_whole_fleet_and_learns_what_went() -> None:
    ctl = controller(change_log=2)
    feed = FleetFeed(ctl)
    state = FleetState()
    await ctl.deploy("keep", spec(min_copies=0))
    await ctl.deploy("gone", spec(min_copies=0))
    state.apply(feed.message(None))
    await ctl.undeploy("gone")
    await ctl.ensure_loaded("keep")  # more changes than the log of 2 keeps: it no longer reaches back
    message = feed.message(state.generation)
    assert not message.delta
    change = state.apply(message)
    assert change.full and change.removed == ["gone"]
    same(state, ctl)


async def test_watchers_at_the_same_generation_share_one_message() -> None:
    ctl = controller()
    feed = FleetFeed(ctl)
    await ctl.deploy("m", spec(min_copies=0))
    generation = ctl.generation
    await ctl.ensure_loaded("m")
    assert feed.message(generation) is feed.message(generation)
