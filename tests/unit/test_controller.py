"""The controller's core with fake replicas and artifacts: deploy, rollback, cold
starts, eviction, undeploy and restart adoption (the real stack is in
tests/integration/test_control_plane.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fakes import FakeClock

from flotilla.config import AutoscaleSettings, ControllerSettings, FlotillaSettings, ModelSettings
from flotilla.errors import (
    AlreadyExists,
    ArtifactUnavailable,
    Code,
    ModelLoadFailed,
    ModelNotFound,
    UnsupportedFramework,
)
from flotilla.services.controller.controller import CONFIGURED_RETRY_S, Controller
from flotilla.services.controller.graph import ModelGraph, SpecMismatch, TensorInfo
from flotilla.services.controller.placement import NoCapacity
from flotilla.services.controller.registry import LOADED, SPEC_MATCHES_GRAPH, MemoryRecords
from flotilla.services.controller.server import build_controller
from flotilla.services.controller.shards import QueueCounts
from tests.waiting import until

URI = "s3://flotilla-models/m"
DEFAULT_GRAPH = ModelGraph(
    (TensorInfo("images", "UINT8", ("batch", 224, 224, 3)),), (TensorInfo("probabilities", "FP32", ("batch", 2)),)
)
"""What the default spec describes: a UINT8 NHWC 224x224 input, two classes (cat, dog)."""


class FakeArtifacts:
    """Every URI holds version 1 (and 2), except the ones marked missing; each version's graph is
    ``DEFAULT_GRAPH`` unless ``graphs`` names another for its URI."""

    def __init__(self) -> None:
        self.missing: set[str] = set()
        self.checks = 0
        self.graphs: dict[str, ModelGraph] = {}

    def check(self, uri: str, versions: list[int]) -> dict[str, dict[str, object]]:
        self.checks += 1
        if uri in self.missing:
            raise ArtifactUnavailable(f"no artifact at {uri}")
        return {f"{v}/model.onnx": {"sha256": "0" * 64, "bytes": 1} for v in versions}

    def labels(self, uri: str, manifest: dict[str, dict[str, object]]) -> list[str]:
        return ["cat", "dog"]

    def graph(self, uri: str, version: int, manifest: dict[str, dict[str, object]]) -> ModelGraph:
        return self.graphs.get(uri, DEFAULT_GRAPH)


class FakeReplica:
    def __init__(self, address: str, budget_mb: float) -> None:
        self.address = address
        self.budget_mb = budget_mb
        self.models: dict[str, list[int]] = {}
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.fail_loads: set[str] = set()
        self.load_gate: asyncio.Event | None = None
        """When set, a load waits for it (a test sees what happens meanwhile)."""
        self.live = True
        self.loaded_specs: dict[str, ModelSettings] = {}
        self.fail_warm_ups: set[str] = set()
        self.warm_ups: list[str] = []
        self.warm_up_gate: asyncio.Event | None = None
        """When set, a warm-up waits for it (a test sees what happens meanwhile)."""
        self.memory_mb: float | None = None

    async def is_live(self) -> bool:
        return self.live

    async def loaded(self) -> dict[str, list[int]]:
        return dict(self.models)

    async def load(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None:
        self.loads.append(name)
        if self.load_gate is not None:
            await self.load_gate.wait()
        if name in self.fail_loads:
            raise ModelLoadFailed(f"Triton at {self.address} could not load {name!r}: bad graph")
        self.models[spec.backend_model or name] = list(spec.versions)
        self.loaded_specs[name] = spec

    async def unload(self, name: str, spec: ModelSettings) -> None:
        self.unloads.append(name)
        self.models.pop(spec.backend_model or name, None)

    async def warm_up(self, name: str, spec: ModelSettings) -> None:
        self.warm_ups.append(name)
        if self.warm_up_gate is not None:
            await self.warm_up_gate.wait()
        if name in self.fail_warm_ups:
            # What tritonclient raises for an execution ONNX Runtime refused.
            raise RuntimeError("[StatusCode.INTERNAL] RuntimeException: Reshape: requested shape {1,3}")

    def measure_memory_mb(self, name: str, spec: ModelSettings) -> float | None:
        return self.memory_mb

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


def graph_x_fp32_nchw_320() -> ModelGraph:
    return ModelGraph((TensorInfo("x", "FP32", ("N", 3, 320, 320)),), (TensorInfo("probs", "FP32", ("N", 2)),))


async def test_a_spec_without_input_settings_is_filled_in_from_the_graph(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    ctl.artifacts.graphs[URI] = graph_x_fp32_nchw_320()  # type: ignore[attr-defined]

    record = await ctl.deploy("m", spec(input={"mean": [0.5, 0.5, 0.5]}))

    [holder] = ctl.ready_copies("m")
    for loaded in (record.spec, next(r for r in replicas if r.address == holder).loaded_specs["m"]):
        assert (loaded.input.name, loaded.input.dtype, loaded.input.layout) == ("x", "FP32", "NCHW")
        assert (loaded.input.height_px, loaded.input.width_px, loaded.output_name) == (320, 320, "probs")
        assert loaded.input.mean == (0.5, 0.5, 0.5)
    condition = record.conditions[(SPEC_MATCHES_GRAPH, "")]
    assert condition.status == "True" and condition.reason == "ReadFromGraph"
    assert "read from the graph: input.name, input.dtype, input.layout" in condition.message
    assert any(e.kind == "spec_from_graph" for e in record.events)


async def test_a_spec_that_does_not_match_the_graph_is_rejected_before_any_load(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    ctl.artifacts.graphs[URI] = graph_x_fp32_nchw_320()  # type: ignore[attr-defined]
    explicit = {"name": "images", "dtype": "UINT8", "layout": "NHWC", "height_px": 224, "width_px": 224}

    with pytest.raises(SpecMismatch) as caught:
        await ctl.deploy("m", spec(input=explicit))

    assert caught.value.code == Code.FAILED_PRECONDITION
    assert "spec says input 'images' UINT8 NHWC 224x224" in caught.value.message
    assert "model.onnx version 1 at s3://flotilla-models/m has input 'x' FP32 [N,3,320,320]" in caught.value.message
    assert "Pass --spec with input: {name: x, dtype: FP32, layout: NCHW" in caught.value.message
    assert "m" not in ctl.records and all(r.loads == [] for r in replicas)


async def test_a_failed_warm_up_fails_the_deploy_and_leaves_nothing_loaded(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    for replica in replicas:
        replica.fail_warm_ups.add("m")

    with pytest.raises(ModelLoadFailed) as caught:
        await ctl.deploy("m", spec())

    assert caught.value.code == Code.FAILED_PRECONDITION
    assert "failed its warm-up" in caught.value.message and "Reshape: requested shape {1,3}" in caught.value.message
    assert "a batch of 8 for input 'images' UINT8 NHWC 224x224" in caught.value.message
    assert "m" not in ctl.records and ctl.committed() == []
    assert [r.unloads for r in replicas if r.loads] == [["m"]] and all(r.models == {} for r in replicas)


async def test_a_deploy_warms_up_and_measures_its_copies_before_it_commits(replicas: list[FakeReplica]) -> None:
    settings = ControllerSettings(evict_idle_after_s=0.0, drain_s=0.0, measure_memory=True)
    records = MemoryRecords()
    ctl = Controller(settings, replicas, FakeArtifacts(), records)  # type: ignore[arg-type]
    gate = asyncio.Event()
    for replica in replicas:
        replica.warm_up_gate, replica.memory_mb = gate, 120.0

    deploy = asyncio.create_task(ctl.deploy("m", spec(memory_mb=100)))
    await until(lambda: any(r.warm_ups for r in replicas), 5, "the warm-up")
    assert not deploy.done() and ctl.committed() == [], "not registered while its copy warms up"
    gate.set()
    record = await deploy

    assert record.measured_memory_mb == 120.0 and record.memory_mb == 120.0
    assert records.data["m"]["measured_memory_mb"] == 120.0, "committed with the measured memory"
    [holder] = ctl.ready_copies("m")
    assert ctl.replicas[holder].copies["m"].memory_mb == 120.0
    assert [e.kind for e in record.events][-3:] == ["warmed_up", "measured", "deployed"]
    assert sum(len(r.warm_ups) for r in replicas) == 1, "warmed up once, not again in the background"


async def test_a_later_copy_that_fails_its_warm_up_leaves_the_fleet(replicas: list[FakeReplica]) -> None:
    # A cold start does not wait for the warm-up (it runs in the background); a failed one takes the
    # copy out, as a failed load would.
    settings = ControllerSettings(evict_idle_after_s=0.0, drain_s=0.0, measure_memory=True)
    ctl = Controller(settings, replicas, FakeArtifacts(), MemoryRecords())  # type: ignore[arg-type]
    await ctl.deploy("m", spec(min_copies=0))
    for replica in replicas:
        replica.fail_warm_ups.add("m")

    await ctl.ensure_loaded("m")
    [holder] = ctl.copies("m")
    await until(lambda: not ctl.copies("m"), 5, "the copy taken out")

    condition = ctl.records["m"].conditions[(LOADED, holder)]
    assert condition.status == "False" and condition.reason == "WarmUpFailed"
    assert "Reshape: requested shape {1,3}" in condition.message
    assert next(r for r in replicas if r.address == holder).unloads == ["m"]
    assert any(e.kind == "warm_up_failed" for e in ctl.records["m"].events)
    await ctl.stop()


async def test_concurrent_cold_starts_share_one_load(replicas: list[FakeReplica]) -> None:
    ctl = controller(replicas)
    await ctl.deploy("m", spec(min_copies=0))
    assert ctl.copies("m") == []
    gate = asyncio.Event()
    for replica in replicas:
        replica.load_gate = gate

    waiters = asyncio.gather(*(ctl.ensure_loaded("m") for _ in range(20)))
    await until(lambda: any(r.loads for r in replicas), 5, "the load")
    gate.set()
    await waiters

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
    # Counters observed every 3 s, decisions every 1 s, heartbeats every 0.5 s: a request that reaches
    # the shard between an observation and a decision must keep the copy it is about to use.
    arrivals = 1
    clock = FakeClock()
    settings = ControllerSettings(
        drain_s=0.0, measure_memory=False, usage_poll_interval_s=3.0,
        autoscale=AutoscaleSettings(interval_s=1.0, scale_to_zero_idle_s=4.0, cooldown_s=0.0),
    )
    ctl = Controller(settings, replicas, FakeArtifacts(), MemoryRecords(), clock=clock)  # type: ignore[arg-type]
    await ctl.start()
    try:
        await ctl.deploy("m", spec(min_copies=0))
        await ctl.ensure_loaded("m")
        reported = 0

        async def run_until(t_s: float) -> None:
            nonlocal reported
            while clock.now() < t_s:
                # The shard reports its counters only when they changed.
                counts = {"m": QueueCounts(arrivals, arrivals)} if arrivals != reported else {}
                ctl.shard_heartbeat("batcher:1", counters=counts)
                reported = arrivals
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


LOOPS = 4
"""The controller's own loops (replicas, usage, autoscale, shards), each parked on the clock between rounds."""


async def test_a_configured_model_is_deployed_once_its_artifact_is_uploaded(
    replicas: list[FakeReplica], caplog: pytest.LogCaptureFixture
) -> None:
    ctl, artifacts, clock = configured_controller(replicas, {"m": ModelSettings.model_validate_json(spec())})
    artifacts.missing.add(URI)
    await ctl.start()
    try:
        await until(lambda: clock.sleepers == LOOPS + 1, 5, "the first attempt")
        assert "m" not in ctl.records
        assert "configured model 'm' not deployed yet (no artifact at s3://flotilla-models/m)" in caplog.text
        await clock.advance(CONFIGURED_RETRY_S)
        await until(lambda: artifacts.checks == 2 and clock.sleepers == LOOPS + 1, 5, "the second attempt")
        assert "m" not in ctl.records and caplog.text.count("not deployed yet") == 1, "each reason is logged once"
        artifacts.missing.clear()  # the operator uploads it
        await clock.advance(CONFIGURED_RETRY_S)
        await until(lambda: "m" in ctl.records and ctl.records["m"].committed, 5, "the deploy")
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
        await until(lambda: clock.sleepers == LOOPS + 1, 5, "the first attempt")
        artifacts.missing.clear()
        await ctl.deploy("m", spec(memory_mb=120))  # an operator's own deploy
        await clock.advance(CONFIGURED_RETRY_S)
        await until(lambda: "configured:m" not in ctl.running_tasks, 5, "the retry")
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
