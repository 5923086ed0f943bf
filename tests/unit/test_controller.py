"""The controller's core with fake replicas and artifacts: deploy, rollback, cold
starts, eviction, undeploy and restart adoption (the real stack is in
tests/integration/test_control_plane.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes import FakeClock

from flotilla.config import AutoscaleSettings, ControllerSettings, FlotillaSettings, ModelSettings
from flotilla.errors import AlreadyExists, ArtifactUnavailable, ModelLoadFailed, ModelNotFound, UnsupportedFramework
from flotilla.services.controller.controller import CONFIGURED_RETRY_S, BatcherCounters, Controller
from flotilla.services.controller.placement import NoCapacity
from flotilla.services.controller.registry import MemoryRecords
from flotilla.services.controller.server import build_controller

URI = "s3://flotilla-models/m"


class FakeArtifacts:
    """Every URI holds version 1 (and 2), except the ones marked missing."""

    def __init__(self) -> None:
        self.missing: set[str] = set()
        self.checks = 0

    def check(self, uri: str, versions: list[int]) -> dict[str, dict[str, object]]:
        self.checks += 1
        if uri in self.missing:
            raise ArtifactUnavailable(f"no artifact at {uri}")
        return {f"{v}/model.onnx": {"sha256": "0" * 64, "bytes": 1} for v in versions}

    def labels(self, uri: str, manifest: dict[str, dict[str, object]]) -> list[str]:
        return ["cat", "dog"]


class FakeReplica:
    def __init__(self, address: str, budget_mb: float) -> None:
        self.address = address
        self.budget_mb = budget_mb
        self.models: dict[str, list[int]] = {}
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.fail_loads: set[str] = set()
        self.load_delay_s = 0.0
        self.live = True

    async def is_live(self) -> bool:
        return self.live

    async def loaded(self) -> dict[str, list[int]]:
        return dict(self.models)

    async def load(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None:
        self.loads.append(name)
        await asyncio.sleep(self.load_delay_s)
        if name in self.fail_loads:
            raise ModelLoadFailed(f"Triton at {self.address} could not load {name!r}: bad graph")
        self.models[spec.backend_model or name] = list(spec.versions)

    async def unload(self, name: str, spec: ModelSettings) -> None:
        self.unloads.append(name)
        self.models.pop(spec.backend_model or name, None)

    async def warm_up(self, name: str, spec: ModelSettings) -> None:
        return None

    def measure_memory_mb(self, name: str, spec: ModelSettings) -> float | None:
        return None

    async def close(self) -> None:
        return None


def spec(memory_mb: float = 100, min_copies: int = 1, max_copies: int = 1, **extra: object) -> str:
    return json.dumps({"storage_uri": URI, "memory_mb": memory_mb, "min_copies": min_copies,
                       "max_copies": max_copies, **extra})


def controller(replicas: list[FakeReplica], records: MemoryRecords | None = None) -> Controller:
    settings = ControllerSettings(evict_idle_after_s=0.0, drain_s=0.0, measure_memory=False)
    return Controller(settings, replicas, FakeArtifacts(), records or MemoryRecords())  # type: ignore[arg-type]


@pytest.fixture
def replicas() -> list[FakeReplica]:
    return [FakeReplica("a:1", 300), FakeReplica("b:2", 300)]


async def test_deploy_places_min_copies_on_different_replicas_and_records_why(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    record = await ctl.deploy("m", spec(min_copies=2, max_copies=2))

    assert sorted(ctl.ready_copies("m")) == ["a:1", "b:2"]
    assert record.spec.labels == ["cat", "dog"], "labels come from the artifact"
    conditions = {(c.type, c.replica): c.status for c in record.conditions.values()}
    assert conditions[("Ready", "")] == "True" and conditions[("Loaded", "a:1")] == "True"
    assert [e.kind for e in record.events].count("loaded") == 2


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (spec(framework="tensorflow"), UnsupportedFramework),
        (spec(memory_mb=400), NoCapacity),
    ],
)
async def test_rejected_deploys_register_nothing(replicas: list[FakeReplica], body: str, error: type) -> None:
    ctl = controller(replicas)
    with pytest.raises(error):
        await ctl.deploy("m", body)
    assert ctl.committed() == [] and "m" not in ctl.records
    assert all(r.loads == [] for r in replicas)


async def test_a_missing_artifact_is_rejected(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    ctl.artifacts.missing.add(URI)  # type: ignore[attr-defined]
    with pytest.raises(ArtifactUnavailable):
        await ctl.deploy("m", spec())
    assert "m" not in ctl.records


async def test_a_failed_second_copy_rolls_back_the_first(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    replicas[1].fail_loads.add("m")
    with pytest.raises(ModelLoadFailed, match="bad graph"):
        await ctl.deploy("m", spec(min_copies=2, max_copies=2))
    assert "m" not in ctl.records
    assert replicas[0].models == {} and replicas[0].unloads == ["m"], "nothing stays loaded"


async def test_a_name_taken_is_already_exists_unless_replaced(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    await ctl.deploy("m", spec())
    with pytest.raises(AlreadyExists):
        await ctl.deploy("m", spec())
    await ctl.deploy("m", spec(memory_mb=150), replace=True)
    assert ctl.records["m"].spec.memory_mb == 150


async def test_concurrent_cold_starts_share_one_load(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    await ctl.deploy("m", spec(min_copies=0))
    assert ctl.copies("m") == []
    for replica in replicas:
        replica.load_delay_s = 0.05

    await asyncio.gather(*(ctl.ensure_loaded("m") for _ in range(20)))

    assert sum(r.loads.count("m") for r in replicas) == 1
    assert len(ctl.ready_copies("m")) == 1


async def test_a_failed_cold_start_reaches_every_waiter(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    await ctl.deploy("m", spec(min_copies=0))
    for replica in replicas:
        replica.fail_loads.add("m")
    results = await asyncio.gather(*(ctl.ensure_loaded("m") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, ModelLoadFailed) for r in results)
    assert ctl.copies("m") == []


async def test_room_is_made_by_evicting_the_idle_copy_of_a_scale_to_zero_model(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas[:1])
    await ctl.deploy("lazy", spec(memory_mb=200, min_copies=0))
    await ctl.ensure_loaded("lazy")
    await ctl.deploy("big", spec(memory_mb=250))

    assert ctl.ready_copies("big") == ["a:1"] and ctl.copies("lazy") == []
    assert replicas[0].unloads == ["lazy"]
    assert any(e.kind == "evicted" and "big" in e.message for e in ctl.records["lazy"].events)


async def test_scale_to_zero_is_confirmed_on_counters_read_at_the_decision(replicas: list[FakeReplica]) -> None:
    # Counters polled every 3 s, decisions every 1 s: a request that reaches the batcher between a
    # poll and a decision must keep the copy it is about to use.
    arrivals = 1

    async def usage(model: str, batchers: list[str]) -> BatcherCounters:
        return BatcherCounters(arrivals, arrivals, 0.0, 0, 0)

    clock = FakeClock()
    settings = ControllerSettings(
        drain_s=0.0, measure_memory=False, usage_poll_interval_s=3.0,
        autoscale=AutoscaleSettings(interval_s=1.0, scale_to_zero_idle_s=4.0, cooldown_s=0.0),
    )
    ctl = Controller(settings, replicas, FakeArtifacts(), MemoryRecords(), usage=usage, clock=clock)  # type: ignore[arg-type]
    await ctl.start()
    try:
        await ctl.deploy("m", spec(min_copies=0))
        await ctl.ensure_loaded("m")
        ctl.register_batcher("m", "batcher:1")

        async def run_until(t_s: float) -> None:
            while clock.now() < t_s:
                await clock.advance(0.5)

        await run_until(6.5)  # first observed at 3 s (its poll); last poll at 6 s
        arrivals = 2  # a request arrives after the 6 s poll; at 7 s the stale counters say 4 s idle
        await run_until(10.5)
        assert ctl.ready_copies("m"), ctl.records["m"].events
        await run_until(12.5)  # idle 4 s since the 7 s decision saw the arrival
        assert ctl.copies("m") == []
        assert any(e.kind == "scale_zero" for e in ctl.records["m"].events)
    finally:
        await ctl.stop()


async def test_undeploy_unloads_everywhere_and_forgets_the_model(replicas: list[FakeReplica]) -> None:
    records = MemoryRecords()
    ctl = controller(replicas, records)
    await ctl.deploy("m", spec(min_copies=2, max_copies=2))
    await ctl.undeploy("m")
    assert all(r.models == {} for r in replicas)
    assert records.data == {}
    with pytest.raises(ModelNotFound, match="not registered"):
        ctl.record("m")


async def test_a_restarted_controller_adopts_what_the_replicas_hold(replicas: list[FakeReplica]) -> None:
    records = MemoryRecords()
    first = controller(replicas, records)
    await first.deploy("m", spec())
    [holder] = first.ready_copies("m")

    second = controller(replicas, records)
    await second.start()
    try:
        assert second.ready_copies("m") == [holder]
        assert sum(len(r.loads) for r in replicas) == 1, "adopted, not loaded again"
        assert second.records["m"].spec.labels == ["cat", "dog"]
    finally:
        await second.stop()


def test_the_triton_config_comes_from_the_record_for_either_backend() -> None:
    from flotilla.services.controller.replicas import triton_config

    record = ModelSettings.model_validate_json(spec(
        versions=[1, 2], input={"name": "x", "layout": "NCHW", "dtype": "FP32"}, output_name="probs",
        backend={"instance_groups": 2},
    ))
    python = triton_config("m", record)
    native = triton_config("m", record, backend="onnxruntime", instance_kind="KIND_GPU")

    assert python["backend"] == "python" and python["parameters"]["onnx_file"]["string_value"] == "model.onnx"
    assert python["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3, 224, 224]}]
    assert python["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [-1]}]
    assert python["version_policy"] == {"specific": {"versions": [1, 2]}}
    assert python["instance_group"] == [{"kind": "KIND_CPU", "count": 2}]
    assert native["backend"] == "onnxruntime" and native["default_model_filename"] == "model.onnx"
    assert "parameters" not in native and native["instance_group"] == [{"kind": "KIND_GPU", "count": 2}]


# -- the configuration's models, deployed at start ------------------------------------------------


def configured_controller(
    replicas: list[FakeReplica], configured: dict[str, ModelSettings], records: MemoryRecords | None = None
) -> tuple[Controller, FakeArtifacts, FakeClock]:
    artifacts, clock = FakeArtifacts(), FakeClock()
    settings = ControllerSettings(evict_idle_after_s=0.0, drain_s=0.0, measure_memory=False)
    ctl = Controller(settings, replicas, artifacts, records or MemoryRecords(), clock=clock,  # type: ignore[arg-type]
                     configured=configured)
    return ctl, artifacts, clock


LOOPS = 3
"""The controller's own loops (replicas, usage, autoscale), each parked on the clock between rounds."""


async def until(condition: Callable[[], bool], what: str) -> None:
    """Until ``condition()`` holds (a deploy reads the artifact in a thread: real time passes)."""
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_configured_model_is_deployed_once_its_artifact_is_uploaded(
    replicas: list[FakeReplica], caplog: pytest.LogCaptureFixture
) -> None:
    ctl, artifacts, clock = configured_controller(replicas, {"m": ModelSettings.model_validate_json(spec())})
    artifacts.missing.add(URI)
    await ctl.start()
    try:
        await until(lambda: clock.sleepers == LOOPS + 1, "the first attempt")
        assert "m" not in ctl.records
        assert "configured model 'm' not deployed yet (no artifact at s3://flotilla-models/m)" in caplog.text
        await clock.advance(CONFIGURED_RETRY_S)
        await until(lambda: artifacts.checks == 2 and clock.sleepers == LOOPS + 1, "the second attempt")
        assert "m" not in ctl.records and caplog.text.count("not deployed yet") == 1, "each reason is logged once"
        artifacts.missing.clear()  # the operator uploads it
        await clock.advance(CONFIGURED_RETRY_S)
        await until(lambda: "m" in ctl.records and ctl.records["m"].committed, "the deploy")
        assert ctl.ready_copies("m")
    finally:
        await ctl.stop()


async def test_the_registry_wins_over_the_configuration(
    replicas: list[FakeReplica], caplog: pytest.LogCaptureFixture
) -> None:
    records = MemoryRecords()
    first = controller(replicas, records)
    await first.deploy("m", spec(memory_mb=100))
    await first.stop()
    # Restarted with a configuration that asks for more memory: the registered spec stays, with a warning.
    ctl, _, _ = configured_controller(
        [FakeReplica("a:1", 300), FakeReplica("b:2", 300)], {"m": ModelSettings.model_validate_json(spec(memory_mb=150))},
        records,
    )
    await ctl.start()
    try:
        assert ctl.records["m"].spec.memory_mb == 100
        assert "differs from the configuration's (memory_mb)" in caplog.text
    finally:
        await ctl.stop()


async def test_a_configured_model_deployed_by_hand_meanwhile_is_left_to_the_registry(replicas: list[FakeReplica]) -> None:
    ctl, artifacts, clock = configured_controller(replicas, {"m": ModelSettings.model_validate_json(spec())})
    artifacts.missing.add(URI)
    await ctl.start()
    try:
        await until(lambda: clock.sleepers == LOOPS + 1, "the first attempt")
        artifacts.missing.clear()
        await ctl.deploy("m", spec(memory_mb=120))  # an operator's own deploy
        await clock.advance(CONFIGURED_RETRY_S)
        await until(lambda: all(t.done() for t in ctl._tasks if t.get_name() == "configured:m"), "the retry")
        assert ctl.records["m"].spec.memory_mb == 120
        assert artifacts.checks == 2, "the one deploy by hand; the retry found the model registered"
    finally:
        await ctl.stop()


@pytest.mark.parametrize("deploy_configured", [True, False])
async def test_the_server_hands_the_configurations_models_to_the_controller_only_when_asked(
    tmp_path: Path, deploy_configured: bool
) -> None:
    settings = FlotillaSettings(
        run_dir=tmp_path, endpoints={"triton": ["127.0.0.1:1"]},
        controller={"deploy_configured_models": deploy_configured},
        models={"m": json.loads(spec())},
    )
    ctl = build_controller(settings)  # its replica agents' channels need the running loop
    try:
        assert list(ctl.configured) == (["m"] if deploy_configured else [])
    finally:
        await ctl.stop()
