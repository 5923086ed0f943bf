"""The control plane on the real stack: registry, placement, load/unload, scaling.

A dedicated stack: 2 Triton replicas with 500 MiB budgets each, and the three
real models (EfficientNet-Lite0 200 MiB, Open-NSFW 250 MiB, document
orientation 150 MiB with min_copies 0) - they cannot all live everywhere.
Declared memory is used as is (measurement off) so placements are exact;
measurement is checked on the session stack. Autoscaling runs with short
windows so that scale-up, scale-down and scale-to-zero happen within a test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, inference_pb2, inference_pb2_grpc
from flotilla.clients.client import FlotillaClient
from flotilla.clients.models import ModelsClient, upload_artifact
from flotilla.common.probe import is_serving
from flotilla.common.wire import CLASSIFIER_SERVICE, MODEL_HEADER
from flotilla.config import ModelSettings
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from flotilla.stack.processes import free_port, wait_until
from tests.integration.conftest import API_KEY, MODELS_DIR, sample, stack_settings, write_unloadable
from tests.waiting import until

EFFNET, NSFW, ORIENT = "efficientnet-lite0", "open-nsfw", "document-orientation"
BUDGET_MB = 500.0
DECLARED_MB = {EFFNET: 200.0, NSFW: 250.0, ORIENT: 150.0}
DOCUMENTS = MODELS_DIR.parent / "samples" / "documents"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(
        tmp_path_factory.mktemp("control-plane"),
        models=(EFFNET, NSFW, ORIENT),
        controller={
            "replica_memory_mb": [BUDGET_MB],
            "measure_memory": False,
            "evict_idle_after_s": 1.0,
            "drain_s": 0.2,
            "usage_poll_interval_s": 0.2,
            "autoscale": {
                "interval_s": 0.2, "queue_wait_high_ms": 30.0, "scale_up_window_s": 1.0,
                "scale_down_idle_s": 3.0, "scale_to_zero_idle_s": 4.0, "cooldown_s": 1.0,
            },
        },
    )
    for name, memory in DECLARED_MB.items():
        settings.models[name].memory_mb = memory
    settings.models[EFFNET].min_copies, settings.models[EFFNET].max_copies = 1, 2
    settings.models[NSFW].min_copies = settings.models[NSFW].max_copies = 1
    settings.models[ORIENT].min_copies, settings.models[ORIENT].max_copies = 0, 1
    with LocalStack(settings) as stack:
        yield stack


@pytest.fixture
def models(fleet: LocalStack) -> Iterator[ModelsClient]:
    with fleet.models_client() as client:
        yield client


@pytest.fixture
async def client(fleet: LocalStack) -> AsyncIterator[FlotillaClient]:
    assert fleet.state is not None and fleet.settings is not None
    async with FlotillaClient(fleet.state.router, API_KEY, fleet.settings.s3, transparent_retries=False) as c:
        yield c


def loaded_on(address: str) -> dict[str, list[str]]:
    """Triton's own repository index: model -> versions READY on that replica."""
    client = triton_grpc.InferenceServerClient(address)
    try:
        index = client.get_model_repository_index(as_json=True)
    finally:
        client.close()
    ready: dict[str, list[str]] = {}
    for entry in index.get("models", []):
        if entry.get("state") == "READY":
            ready.setdefault(entry["name"], []).append(entry["version"])
    return ready


def stubs_on(fleet: LocalStack, replica: int) -> set[str]:
    """Models with a live Python-backend stub process in that replica's repository."""
    repository = f"{fleet.run_dir}/triton-{replica}/models/"
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 1:
            path = argv[1].decode()
            if path.startswith(repository):
                found.add(path[len(repository):].split("/")[0])
    return found


def placement(models: ModelsClient, name: str, state: str = "ready") -> list[str]:
    return sorted(c.replica for c in models.status(name).copies if c.state == state)


def events(models: ModelsClient, name: str, kind: str | None = None) -> list[str]:
    return [f"{e.kind}: {e.message}" for e in models.status(name).events if kind is None or e.kind == kind]


def write_classifier(directory: Path, *, reshape_batch: int = -1) -> Path:
    """``directory/1/model.onnx`` and ``labels.txt``: a small real classifier whose input is ``x`` FP32
    NCHW 320x320 (the mean colour times a 3x10 matrix, softmax: 10 scores in ``probs``).
    ``reshape_batch`` 1 hard-codes the batch in a Reshape, as an export with ``view(1, -1)`` does:
    the model loads and runs a batch of 1, and fails any larger batch."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = np.linspace(-1.0, 1.0, 30, dtype=np.float32).reshape(3, 10)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
            helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "mean-colour",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 320, 320])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.array([reshape_batch, 3], dtype=np.int64), "shape"),
         numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (directory / "labels.txt").write_text("".join(f"colour-{i}\n" for i in range(10)))
    return directory


def models_cli(fleet: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    """``flotilla models ARGS`` against the fleet, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "flotilla", "models", "--state", str(fleet.run_dir / "stack.json"), *args],
        capture_output=True, text=True, timeout=120,
    )


def test_models_are_placed_on_different_replicas_within_their_budgets(fleet: LocalStack, models: ModelsClient) -> None:
    # Most free memory first: EfficientNet on one replica, then Open-NSFW on the other.
    [a] = placement(models, EFFNET)
    [b] = placement(models, NSFW)
    assert a != b
    assert placement(models, ORIENT) == [], "min_copies 0: nothing loaded until a request comes"
    assert loaded_on(a) == {EFFNET: ["1"]} and loaded_on(b) == {NSFW: ["1"]}
    index = {p.address: i for i, p in enumerate(fleet.tritons)}
    assert stubs_on(fleet, index[a]) == {EFFNET} and stubs_on(fleet, index[b]) == {NSFW}
    fleet_state = models.fleet()
    used = {r.address: r.used_mb for r in fleet_state.replicas}
    assert used == {a: DECLARED_MB[EFFNET], b: DECLARED_MB[NSFW]}
    status = models.status(EFFNET)
    conditions = {(c.type, c.replica): c for c in status.conditions}
    for kind in ("FrameworkSupported", "ArtifactAvailable", "MemoryResourceAvailable", "Ready"):
        assert conditions[(kind, "")].status == "True", conditions[(kind, "")]
    assert conditions[("Loaded", a)].status == "True" and conditions[("Loaded", a)].last_transition_unix_s > 0
    assert json.loads(status.spec_json)["labels"][285] == "Egyptian cat", "labels come from the artifact"


async def test_each_model_classifies_through_the_mesh(client: FlotillaClient) -> None:
    cat = await client.upload(sample("chelsea.jpg"))
    effnet = await client.classify(cat, EFFNET, timeout_s=30)
    nsfw = await client.classify(cat, NSFW, timeout_s=30)
    assert effnet.classes[0].label == "Egyptian cat"
    assert nsfw.classes[0].label == "sfw" and nsfw.classes[0].score > 0.9
    for name in ("page-rot90.jpg", "page-upright.jpg"):
        page = await client.upload((DOCUMENTS / name).read_bytes())
        result = await client.classify(page, ORIENT, timeout_s=60)
        assert result.classes[0].label in ("0", "90", "180", "270")


async def test_scale_to_zero_then_one_shared_cold_start_answers_20_requests(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    await until(lambda: not placement(models, ORIENT), 15, "the idle model scales to zero")
    assert any("scale to zero" in e or "idle" in e for e in events(models, ORIENT, "scale_zero"))
    loads_before = len(events(models, ORIENT, "loading"))
    page = await client.upload((DOCUMENTS / "page-rot90.jpg").read_bytes())

    started = time.monotonic()
    results = await asyncio.gather(*(client.classify(page, ORIENT, timeout_s=30) for _ in range(20)))
    elapsed_s = time.monotonic() - started

    assert len(results) == 20 and len({r.classes[0].label for r in results}) == 1
    loads = events(models, ORIENT, "loading")[loads_before:]
    assert len(loads) == 1 and "cold start" in loads[0], loads
    assert len(placement(models, ORIENT)) == 1
    assert elapsed_s < 30


async def test_a_hot_model_gains_a_copy_and_loses_it_when_idle(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    uuids = [await client.upload(sample(p)) for p in ("coffee.jpg", "chelsea.jpg", "rocket.jpg")]
    stop = asyncio.Event()

    async def loop(i: int) -> None:
        while not stop.is_set():
            await client.classify(uuids[i % len(uuids)], EFFNET, timeout_s=60)

    workers = [asyncio.create_task(loop(i)) for i in range(48)]
    try:
        await until(lambda: len(placement(models, EFFNET)) == 2, 40, "a second copy under load")
    finally:
        stop.set()
        await asyncio.gather(*workers)
    [added] = events(models, EFFNET, "scale_add")[-1:]
    assert "30 ms" in added and "window 1.0 s" in added or "for 1." in added, added
    assert [e for e in events(models, EFFNET, "loaded") if "autoscaler" in e]
    await until(lambda: len(placement(models, EFFNET)) == 1, 30, f"back to one copy when idle: {events(models, EFFNET)[-8:]}")
    assert "idle" in events(models, EFFNET, "scale_remove")[-1], events(models, EFFNET)


async def test_full_replicas_evict_the_least_recently_used_idle_copy(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    def settled() -> bool:  # no copy loading or draining anywhere (earlier tests scaled things)
        return all(c.state == "ready" for m in models.list() for c in m.copies)

    await until(settled, 30, "no copy in transition")
    # An earlier test may have left a copy that is about to scale to zero: start from zero.
    await until(lambda: not placement(models, ORIENT), 30, f"{ORIENT} scaled to zero")
    # Load the min_copies-0 model (cold start), then let it go idle (not long enough to scale to zero).
    page = await client.upload((DOCUMENTS / "page-upright.jpg").read_bytes())
    await client.classify(page, ORIENT, timeout_s=60)
    [holder] = placement(models, ORIENT)
    await asyncio.sleep(1.2)  # duration: idle past evict_idle_after_s, not yet scaled to zero
    assert placement(models, ORIENT) == [holder]
    free = {r.address: r.budget_mb - r.used_mb for r in models.fleet().replicas}
    # Needs more than any replica has free: only evicting the idle copy makes room.
    need = max(free.values()) + 10
    assert need <= free[holder] + DECLARED_MB[ORIENT]
    spec = ModelSettings(
        storage_uri="s3://flotilla-models/efficientnet-lite0", memory_mb=need, input=fleet.base.models[EFFNET].input,
    )
    models.deploy("effnet-big", spec)
    try:
        assert placement(models, "effnet-big") == [holder]
        assert placement(models, ORIENT) == []
        evicted = events(models, ORIENT, "evicted")
        assert evicted and "effnet-big" in evicted[-1], evicted
        assert placement(models, NSFW) and placement(models, EFFNET), "pinned copies are never evicted"
    finally:
        models.undeploy("effnet-big")


@pytest.mark.parametrize(
    ("name", "spec", "code", "reason"),
    [
        ("tf-model", {"framework": "tensorflow"}, Code.FAILED_PRECONDITION, "framework 'tensorflow' is not supported"),
        ("no-artifact", {"storage_uri": "s3://flotilla-models/nothing-here"}, Code.FAILED_PRECONDITION,
         "manifest.json' is missing"),
        ("bad-spec", {"input": {"layout": "NCWH"}}, Code.INVALID_ARGUMENT, "input.layout"),
        ("too-big", {"memory_mb": 4000}, Code.RESOURCE_EXHAUSTED, "no replica's whole budget"),
        ("Bad_Name", {}, Code.INVALID_ARGUMENT, "is not valid"),
        ("open-nsfw", {}, Code.ALREADY_EXISTS, "already registered"),
    ],
)
def test_deploy_rejections_say_why_and_register_nothing(
    models: ModelsClient, name: str, spec: dict[str, object], code: Code, reason: str
) -> None:
    before = sorted(m.name for m in models.list())
    full = {"storage_uri": "s3://flotilla-models/efficientnet-lite0", "memory_mb": 100, **spec}
    with pytest.raises(FlotillaError) as caught:
        models.deploy(name, full)
    assert caught.value.code == code and reason in caught.value.message, caught.value.message
    assert sorted(m.name for m in models.list()) == before


def test_a_broken_artifact_fails_the_load_and_leaves_nothing_behind(fleet: LocalStack, models: ModelsClient, tmp_path: Path) -> None:
    assert fleet.settings is not None
    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an ONNX graph")
    upload_artifact(fleet.settings.s3, broken, "s3://flotilla-models/broken")
    spec = ModelSettings(storage_uri="s3://flotilla-models/broken", memory_mb=50)

    with pytest.raises(FlotillaError) as caught:
        models.deploy("broken", spec)

    assert caught.value.code == Code.FAILED_PRECONDITION
    assert "s3://flotilla-models/broken/1/model.onnx is not a readable ONNX model" in caught.value.message
    assert "broken" not in [m.name for m in models.list()]
    for proc in fleet.tritons:
        assert "broken" not in loaded_on(proc.address)


async def test_a_model_deployed_at_run_time_serves_without_restarts(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    assert fleet.settings is not None
    pids = {p.name: p.pid for p in [fleet.router, fleet.controller, *fleet.preprocess, *fleet.tritons] if p}
    # Two versions of one artifact: a request may name either.
    two = MODELS_DIR.parent / "two-versions"
    for version in ("1", "2"):
        (two / version).mkdir(parents=True, exist_ok=True)
        target = two / version / "model.onnx"
        if not target.exists():
            target.hardlink_to(MODELS_DIR / EFFNET / "1" / "model.onnx")
    (two / "labels.txt").write_bytes((MODELS_DIR / EFFNET / "labels.txt").read_bytes())
    upload_artifact(fleet.settings.s3, two, "s3://flotilla-models/runtime-effnet")
    spec = fleet.base.models[EFFNET].model_copy(update={
        "artifact": None, "storage_uri": "s3://flotilla-models/runtime-effnet", "versions": [1, 2],
        "memory_mb": 50.0, "min_copies": 1, "max_copies": 1,
    })
    fleet.deploy("runtime-effnet", spec)
    try:
        cat = await client.upload(sample("chelsea.jpg"))
        default = await client.classify(cat, "runtime-effnet", timeout_s=30)
        first = await client.classify(cat, "runtime-effnet", timeout_s=30, version=1)
        assert default.classes[0].label == first.classes[0].label == "Egyptian cat"
        assert models.status("runtime-effnet").default_version == 2
        with pytest.raises(FlotillaError) as caught:
            await client.classify(cat, "runtime-effnet", timeout_s=30, version=7)
        assert caught.value.code == Code.INVALID_ARGUMENT and "live versions: [1, 2]" in caught.value.message
    finally:
        models.undeploy("runtime-effnet")
    await until(lambda: "runtime-effnet" not in fleet.batchers, 10, "its batcher goes with it")
    with pytest.raises(FlotillaError) as caught:
        await client.classify(cat, "runtime-effnet", timeout_s=10)
    assert caught.value.code == Code.NOT_FOUND
    assert pids == {p.name: p.pid for p in [fleet.router, fleet.controller, *fleet.preprocess, *fleet.tritons] if p}


async def test_controller_restart_keeps_the_registry_and_the_placements(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient
) -> None:
    assert fleet.controller is not None
    before = {m.name: sorted((c.replica, c.state) for c in m.copies) for m in models.list()}
    loads_before = len(events(models, EFFNET, "loading"))
    old_pid = fleet.controller.pid

    fleet.controller.kill()  # SIGKILL; the supervisor starts it again

    await until(lambda: fleet.controller.pid != old_pid and fleet.controller.alive(), 20, "controller restarted")

    def registry_back() -> bool:
        try:
            return {m.name: sorted((c.replica, c.state) for c in m.copies) for m in models.list()} == before
        except FlotillaError:
            return False

    await until(registry_back, 30, "the same models on the same replicas")
    assert len(events(models, EFFNET, "loading")) == loads_before, "adopted, not loaded again"
    assert any("Adopted" == c.reason for c in models.status(EFFNET).conditions)
    cat = await client.upload(sample("chelsea.jpg"))
    assert (await client.classify(cat, EFFNET, timeout_s=30)).classes[0].label == "Egyptian cat"


@pytest.mark.parametrize("tier", ["batcher", "router"])
async def test_a_killed_batcher_or_router_fails_fast_and_comes_back_by_itself(
    fleet: LocalStack, client: FlotillaClient, tier: str
) -> None:
    victim = fleet.batchers[NSFW] if tier == "batcher" else fleet.router
    assert victim is not None
    cat = await client.upload(sample("chelsea.jpg"))
    old_pid = victim.pid

    victim.kill()
    started = time.monotonic()
    with pytest.raises(FlotillaError) as caught:
        await client.classify(cat, NSFW, timeout_s=20)
    assert caught.value.code == Code.UNAVAILABLE
    assert time.monotonic() - started < 2.0, "UNAVAILABLE at once, not a hang to the deadline"

    async def serving() -> bool:
        try:
            await client.classify(cat, NSFW, timeout_s=5)
        except FlotillaError:
            return False
        return True

    await until(serving, 30, f"the {tier} back", interval_s=0.2)
    assert victim.pid != old_pid and fleet.supervisor.restarts(victim.name) >= 1
    log = victim.log_path.read_text()
    assert log.count(f"==== {victim.name} started pid") >= 2


async def test_a_cold_start_that_fails_answers_the_held_requests_with_its_reason(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient, tmp_path: Path
) -> None:
    assert fleet.settings is not None
    # Its graph matches the spec (the deploy's check passes); Triton cannot load it.
    upload_artifact(fleet.settings.s3, write_unloadable(tmp_path / "broken-lazy"), "s3://flotilla-models/broken-lazy")
    spec = fleet.base.models[EFFNET].model_copy(update={
        "artifact": None, "storage_uri": "s3://flotilla-models/broken-lazy", "memory_mb": 50.0,
        "min_copies": 0, "max_copies": 1,
    })
    fleet.deploy("broken-lazy", spec)  # min_copies 0: nothing is loaded yet, so the deploy succeeds
    try:
        cat = await client.upload(sample("chelsea.jpg"))
        answers = await asyncio.gather(
            *(client.classify(cat, "broken-lazy", timeout_s=30) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(a, FlotillaError) for a in answers), answers
        assert {a.code for a in answers} == {Code.FAILED_PRECONDITION}  # type: ignore[union-attr]
        assert all("could not load" in a.message for a in answers)  # type: ignore[union-attr]
        assert any("load_failed" in e for e in events(models, "broken-lazy"))
    finally:
        models.undeploy("broken-lazy")


def test_the_models_cli_uploads_deploys_shows_and_undeploys(fleet: LocalStack, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return models_cli(fleet, *args)

    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"input": fleet.base.models[EFFNET].input.model_dump(mode="json"),
                                "batching": {"max_batch_size": 4}}))
    uploaded = cli("upload", "cli-effnet", str(MODELS_DIR / EFFNET))
    assert uploaded.returncode == 0 and "s3://flotilla-models/cli-effnet" in uploaded.stdout, uploaded.stderr
    deployed = cli("deploy", "cli-effnet", "--storage-uri", "s3://flotilla-models/cli-effnet", "--framework", "onnx",
                   "--memory", "64Mi", "--min-copies", "0", "--max-copies", "1", "--spec", str(spec))
    assert deployed.returncode == 0, deployed.stderr
    assert "Ready" in deployed.stdout and "ScaledToZero" in deployed.stdout
    listed = cli("list")
    assert "cli-effnet" in listed.stdout and "64* MiB" in listed.stdout, listed.stdout
    rejected = cli("deploy", "cli-tf", "--storage-uri", "s3://flotilla-models/cli-effnet", "--framework", "tensorflow",
                   "--memory", "1Gi")
    assert rejected.returncode != 0 and "FAILED_PRECONDITION: framework 'tensorflow'" in rejected.stderr
    assert cli("undeploy", "cli-effnet").returncode == 0
    missing = cli("status", "cli-effnet")
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr and "is not registered" in missing.stderr


def test_a_dedicated_batcher_started_before_its_model_serves_nothing_then_hosts_it(
    fleet: LocalStack, models: ModelsClient, tmp_path: Path
) -> None:
    """As in Kubernetes, where a model's dedicated batcher Deployment may start before the operator
    deploys the model: it serves at once (health and its classifier answer) with no model, a call for
    the model is NOT_FOUND saying it hosts none, and once the model is registered the controller's
    heartbeat answers give it the model."""
    assert fleet.settings is not None
    name = "early-effnet"
    address = f"{fleet.host}:{free_port(fleet.host)}"
    batcher = fleet.service(f"batcher-{name}-early", "batcher", address, fleet.run_dir / "flotilla.resolved.yaml", name)
    try:
        wait_until(lambda: is_serving(address, service=CLASSIFIER_SERVICE), 30, "the early batcher serving",
                   procs=[batcher])
        with grpc.insecure_channel(address) as channel:
            classify = inference_pb2_grpc.ImageClassifierStub(channel).Classify
            request = inference_pb2.ClassifyRequest(image_uuid=str(uuid.uuid4()), model_name=name)
            with pytest.raises(grpc.RpcError) as caught:
                classify(request, metadata=((MODEL_HEADER, name),), timeout=5)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"the dedicated batcher of {name!r} hosts 0 models" in (caught.value.details() or "")

            upload_artifact(fleet.settings.s3, MODELS_DIR / EFFNET, f"s3://flotilla-models/{name}")
            spec = fleet.base.models[EFFNET].model_copy(update={
                "artifact": None, "storage_uri": f"s3://flotilla-models/{name}", "memory_mb": 50.0,
                "min_copies": 0, "max_copies": 1, "dedicated_batcher": True,
            })
            fleet.deploy(name, spec, wait=False)
            admin = batcher_pb2_grpc.BatcherAdminStub(channel)

            def hosted() -> bool:
                listed = admin.ListStats(batcher_pb2.ListStatsRequest(), timeout=5)
                return [m.model_name for m in listed.models] == [name] and listed.dedicated_model == name

            wait_until(hosted, 30, "the early dedicated batcher hosting its model", procs=[batcher])
            wait_until(lambda: address in models.status(name).batchers, 30, "the fleet listing it")
    finally:
        batcher.stop()
        if name in {m.name for m in models.list()}:
            models.undeploy(name)


async def test_a_deploy_without_a_spec_reads_the_input_from_the_graph_and_a_mismatching_spec_is_refused(
    fleet: LocalStack, models: ModelsClient, client: FlotillaClient, tmp_path: Path
) -> None:
    """The issue's case: an ONNX classifier whose input is ``x`` FP32 NCHW 320x320, deployed with the
    CLI and no --spec. A spec that says otherwise is refused naming both sides; without one the input
    comes from the graph, the status says so, and a real classification works."""
    assert fleet.settings is not None
    name, uri = "graph-x", "s3://flotilla-models/graph-x"
    upload_artifact(fleet.settings.s3, write_classifier(tmp_path / "graph-x"), uri)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(json.dumps({"input": {"name": "images", "dtype": "UINT8", "layout": "NHWC",
                                           "height_px": 224, "width_px": 224}}))

    refused = models_cli(fleet, "deploy", name, "--storage-uri", uri, "--framework", "onnx", "--memory", "40Mi",
                         "--spec", str(wrong))
    assert refused.returncode != 0
    assert "FAILED_PRECONDITION: the spec does not match the model: spec says input 'images' UINT8 NHWC 224x224" \
        in refused.stderr, refused.stderr
    assert f"model.onnx version 1 at {uri} has input 'x' FP32 [N,3,320,320]" in refused.stderr
    assert "Pass --spec with input: {name: x, dtype: FP32, layout: NCHW, height_px: 320, width_px: 320}" \
        in refused.stderr
    assert name not in [m.name for m in models.list()]

    deployed = models_cli(fleet, "deploy", name, "--storage-uri", uri, "--framework", "onnx", "--memory", "40Mi")
    try:
        assert deployed.returncode == 0, deployed.stderr
        assert "input:      'x' FP32 NCHW 320x320 RGB, stretch" in deployed.stdout, deployed.stdout
        assert "SpecMatchesGraph" in deployed.stdout and "ReadFromGraph" in deployed.stdout
        assert "read from the graph: input.name, input.dtype, input.layout, input.height_px, input.width_px, " \
            "output_name" in deployed.stdout
        status = models.status(name)
        assert next(c for c in status.conditions if c.type == "Ready").reason == "CopiesReady"
        assert any(e.kind == "warmed_up" for e in status.events), "its copy ran a batch before it was Ready"
        fleet.wait_model(name)

        cat = await client.upload(sample("chelsea.jpg"))
        result = await client.classify(cat, name, timeout_s=30)
        assert result.classes[0].label.startswith("colour-") and 0.0 < result.classes[0].score <= 1.0
    finally:
        if name in [m.name for m in models.list()]:
            models.undeploy(name)


def test_a_model_that_fails_its_warm_up_is_not_deployed(fleet: LocalStack, models: ModelsClient, tmp_path: Path) -> None:
    """It loads, but its Reshape hard-codes a batch of 1: the warm-up at the model's batch size (8)
    fails in ONNX Runtime, and the deploy with it, leaving nothing loaded."""
    assert fleet.settings is not None
    uri = "s3://flotilla-models/batch-of-one"
    upload_artifact(fleet.settings.s3, write_classifier(tmp_path / "batch-of-one", reshape_batch=1), uri)

    with pytest.raises(FlotillaError) as caught:
        models.deploy("batch-of-one", {"storage_uri": uri, "memory_mb": 40})

    message = caught.value.message
    assert caught.value.code == Code.FAILED_PRECONDITION, message
    assert "loaded but failed its warm-up: a batch of 8 for input 'x' FP32 NCHW 320x320" in message, message
    assert "Reshape" in message, "ONNX Runtime's own reason"
    assert "batch-of-one" not in [m.name for m in models.list()]
    for proc in fleet.tritons:
        assert "batch-of-one" not in loaded_on(proc.address)
