"""The controller when a replica holding copies goes down: its copies are not capacity (not ready,
not counted), a cold start or the min-copies rule places a stand-in on a replica that is up, and
the stand-in goes again when the replica returns with its copy. Fake replicas and a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from fakes import FakeClock
from prometheus_client import REGISTRY
from test_controller import FakeArtifacts, FakeReplica, spec

from flotilla.common import metrics
from flotilla.config import AutoscaleSettings, ControllerSettings, ModelSettings
from flotilla.errors import ModelLoadFailed
from flotilla.services.controller.controller import Controller
from flotilla.services.controller.registry import READY, MemoryRecords
from tests.waiting import until


class DyingReplica(FakeReplica):
    """Dies during its next load of a model (a SIGKILL while Triton loads it)."""

    def __init__(self, address: str, budget_mb: float) -> None:
        super().__init__(address, budget_mb)
        self.die_on_load = False

    async def load(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None:
        if self.die_on_load:
            self.loads.append(name)
            self.live = False
            raise ConnectionRefusedError(f"{self.address}: connection refused")
        await super().load(name, spec, uri, manifest)


def running_controller(replicas: list[FakeReplica]) -> tuple[Controller, FakeClock]:
    clock = FakeClock()
    settings = ControllerSettings(
        drain_s=0.0, measure_memory=False, evict_idle_after_s=0.0,
        autoscale=AutoscaleSettings(interval_s=1.0, cooldown_s=0.0),
    )
    ctl = Controller(settings, replicas, FakeArtifacts(), MemoryRecords(), clock=clock)  # type: ignore[arg-type]
    return ctl, clock


def ready_reason(ctl: Controller, name: str) -> str:
    return ctl.records[name].conditions[(READY, "")].reason


async def test_a_model_whose_only_copy_is_on_a_down_replica_is_not_ready() -> None:
    a, b = FakeReplica("a:1", 300), FakeReplica("b:2", 100)
    ctl, clock = running_controller([a, b])
    await ctl.deploy("big", spec(memory_mb=200, min_copies=1, max_copies=2))  # b has no room for it
    await ctl.start()
    try:
        a.live = False
        for _ in range(2):
            await clock.advance(1.0)
        assert ready_reason(ctl, "big") == "ReplicaDown"
        assert copies_gauge("big", "ready") == 0.0 and copies_gauge("big", "unreachable") == 1.0
    finally:
        await ctl.stop()


def copies_gauge(name: str, state: str) -> float:
    """The exported ``flotilla_model_copies`` sample; a label set the controller removed counts as 0."""
    sample = REGISTRY.get_sample_value(metrics.MODEL_COPIES.describe()[0].name, {"model": name, "state": state})
    return sample or 0.0


async def test_a_cold_start_whose_copy_vanishes_loads_another_instead_of_failing() -> None:
    # The replica with the only copy is SIGKILLed under load: requests wait in a cold start while
    # the replica restarts empty. Before, they got FAILED_PRECONDITION "no copy loading any more".
    # min_copies 0: the autoscaler's min-copies rule stays out of it, the cold start alone acts.
    a, b = FakeReplica("a:1", 300), FakeReplica("b:2", 300)
    ctl, clock = running_controller([a, b])
    await ctl.deploy("m", spec(min_copies=0, max_copies=2))
    await ctl.ensure_loaded("m")
    assert ctl.ready_copies("m") == ["a:1"]
    await ctl.start()
    try:
        a.live = False
        await clock.advance(1.0)  # the health loop sees it down
        assert ctl.ready_copies("m") == [] and ctl.copies("m") == ["a:1"]

        waiters = [asyncio.ensure_future(ctl.ensure_loaded("m")) for _ in range(8)]
        for _ in range(10):  # they are waiting before the replica comes back
            await asyncio.sleep(0)
        a.live, a.models = True, {}  # restarted empty
        for _ in range(5):
            await clock.advance(1.0)
        results = await asyncio.gather(*waiters, return_exceptions=True)

        assert [r for r in results if isinstance(r, BaseException)] == []
        assert ctl.ready_copies("m"), ctl.records["m"].events
    finally:
        await ctl.stop()


async def test_a_replica_that_dies_during_a_cold_start_load_is_retried_elsewhere() -> None:
    a, b = DyingReplica("a:1", 300), DyingReplica("b:2", 300)
    ctl, clock = running_controller([a, b])
    await ctl.deploy("m", spec(min_copies=0, max_copies=2))
    a.die_on_load = True

    await ctl.ensure_loaded("m")

    assert a.loads == ["m"] and b.loads == ["m"]
    assert ctl.ready_copies("m") == ["b:2"]
    assert any(e.kind == "load_failed" and "went down" in e.message for e in ctl.records["m"].events)


async def test_a_copy_on_a_hung_replica_is_replaced_and_the_stand_in_goes_when_it_returns() -> None:
    a, b = FakeReplica("a:1", 300), FakeReplica("b:2", 300)
    ctl, clock = running_controller([a, b])
    await ctl.deploy("hung", spec(min_copies=1, max_copies=2))
    assert ctl.copies("hung") == ["a:1"]
    await ctl.start()
    try:
        a.live = False  # SIGSTOP: it holds its copy but answers nothing
        for _ in range(2):  # the health loop sees it down; the next decision places a stand-in
            await clock.advance(1.0)
        assert ctl.ready_copies("hung") == ["b:2"], ctl.records["hung"].events
        assert any(e.kind == "scale_add" and "down: a:1" in e.message for e in ctl.records["hung"].events)
        assert ready_reason(ctl, "hung") == "CopiesReady"
        assert copies_gauge("hung", "ready") == 1.0 and copies_gauge("hung", "unreachable") == 1.0

        a.live = True  # SIGCONT: back, still holding its copy
        for _ in range(4):
            await clock.advance(1.0)
        assert len(ctl.copies("hung")) == 1, ctl.records["hung"].events
        assert a.unloads + b.unloads == ["hung"]
        assert copies_gauge("hung", "ready") == 1.0 and copies_gauge("hung", "unreachable") == 0.0
    finally:
        await ctl.stop()


async def test_a_stand_in_stays_when_the_replica_comes_back_empty() -> None:
    a, b = FakeReplica("a:1", 300), FakeReplica("b:2", 300)
    ctl, clock = running_controller([a, b])
    await ctl.deploy("m", spec(min_copies=1, max_copies=2))
    await ctl.start()
    try:
        a.live = False
        for _ in range(4):
            await clock.advance(1.0)
        assert ctl.ready_copies("m") == ["b:2"]
        a.live, a.models = True, {}  # restarted: its copy is gone
        for _ in range(4):
            await clock.advance(1.0)
        assert ctl.copies("m") == ["b:2"] and b.unloads == []
    finally:
        await ctl.stop()


async def test_a_load_that_times_out_is_unloaded_from_its_replica() -> None:
    # Triton may still finish a load the controller gave up on: the copy must not stay there uncounted.
    a = FakeReplica("a:1", 300)
    a.load_gate = asyncio.Event()  # the load never finishes
    settings = ControllerSettings(drain_s=0.0, measure_memory=False, load_timeout_s=0.05)
    ctl = Controller(settings, [a], FakeArtifacts(), MemoryRecords())  # type: ignore[arg-type]
    try:
        with pytest.raises(ModelLoadFailed, match="did not finish within"):
            await ctl.deploy("slow", spec(min_copies=1))
        await until(lambda: a.unloads == ["slow"], 5, "the timed-out load unloaded")
    finally:
        await ctl.stop()
