"""The control plane's benchmark (part of `make bench`; alone: `flotilla bench --only fleet`).

1. Cold start: a request for a model with no copy loaded (scaled to zero)
   until its answer, against the bare Triton load of the same model (its
   artifact already in the replica's cache): target <= load + 250 ms.
2. Heterogeneous placement: under one fixed memory budget per replica, how
   many copies of EfficientNet-sized models the fleet serves when each model
   lives where it fits (min_copies 1) against everything everywhere
   (min_copies = replicas) - both counted by the controller itself, deploying
   until it answers RESOURCE_EXHAUSTED.
3. Autoscaling: queue wait of a model under a load one copy cannot carry,
   before the autoscaler adds a copy and after the copy is ready.

Every figure comes from a stack started here; nothing is asserted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import tritonclient.grpc as triton_grpc

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, controller_pb2
from flotilla.clients.client import FlotillaClient
from flotilla.clients.loadgen import closed_loop
from flotilla.config import FlotillaSettings, load_settings
from flotilla.errors import ResourceExhausted
from flotilla.modelbuild.catalog import EFFICIENTNET_LITE0
from flotilla.services.controller.replicas import triton_config
from flotilla.stack.local import LocalStack

MODEL = EFFICIENTNET_LITE0
CONFIG = Path("flotilla.yaml")
COLD_STARTS = 5
PLACEMENT_BUDGET_MB = 1000.0
MAX_CLONES = 16
LOAD_CONCURRENCY = 48


def fleet_settings(run_dir: Path) -> FlotillaSettings:
    settings = load_settings(CONFIG, run_dir=run_dir)
    settings.models = {MODEL: settings.models[MODEL]}
    settings.controller.autoscale.interval_s = 0.25
    settings.controller.autoscale.scale_to_zero_idle_s = 1.0
    settings.controller.autoscale.scale_down_idle_s = 600.0
    settings.controller.autoscale.scale_up_window_s = 2.0
    settings.controller.autoscale.queue_wait_high_ms = 50.0
    settings.controller.autoscale.cooldown_s = 1.0
    settings.controller.usage_poll_interval_s = 0.25
    settings.controller.drain_s = 0.1
    settings.controller.replica_memory_mb = [PLACEMENT_BUDGET_MB]
    return settings


def _wait(check: Callable[[], object], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("bench: condition not met")
        time.sleep(0.05)


def cold_start(stack: LocalStack, photo: bytes) -> dict[str, object]:
    assert stack.state is not None and stack.settings is not None
    state, settings = stack.state, stack.settings
    spec = stack.base.models[MODEL].model_copy(update={"min_copies": 0, "max_copies": 1})
    stack.deploy("cold", spec, wait=False)
    client_models = stack.models_client()

    def copies() -> list[controller_pb2.Copy]:
        return [c for c in client_models.status("cold").copies if c.state == "ready"]

    _wait(lambda: bool(client_models.status("cold").batchers), 60)
    time.sleep(0.5)

    async def one_request() -> float:
        async with FlotillaClient(state.router, state.api_key, settings.s3) as client:
            uuid = await client.upload(photo)
            start = time.perf_counter()
            await client.classify(uuid, "cold", timeout_s=60)
            return time.perf_counter() - start

    cold_s, warm_s = [], []
    for _ in range(COLD_STARTS):
        _wait(lambda: not copies(), 60)  # scaled to zero
        cold_s.append(asyncio.run(one_request()))
        warm_s.append(asyncio.run(one_request()))
    # The bare Triton load: the same config and cached artifact, straight to a replica.
    replica = stack.tritons[1].address
    _wait(lambda: not copies(), 60)
    config = json.dumps(triton_config("cold", spec))
    triton = triton_grpc.InferenceServerClient(replica)
    load_s = []
    try:
        for _ in range(COLD_STARTS):
            start = time.perf_counter()
            triton.load_model("cold", config=config)
            load_s.append(time.perf_counter() - start)
            triton.unload_model("cold")
            _wait(lambda: "cold" not in [m["name"] for m in triton.get_model_repository_index(as_json=True)["models"]
                                         if m.get("state") == "READY"], 30)
            time.sleep(1.5)  # the stub process exits
    finally:
        triton.close()
    client_models.undeploy("cold")
    client_models.close()
    cold, load, warm = (statistics.median(v) * 1000 for v in (cold_s, load_s, warm_s))
    return {
        "cold_start_ms_median": round(cold, 1),
        "cold_start_ms_all": [round(v * 1000, 1) for v in cold_s],
        "bare_triton_load_ms_median": round(load, 1),
        "warm_request_ms_median": round(warm, 1),
        "cold_start_minus_load_ms": round(cold - load, 1),
        "target_ms": "<= load + 250",
        "met": cold - load <= 250.0,
    }


def placement(stack: LocalStack) -> dict[str, object]:
    """Copies served under one budget: each model once where it fits, against everywhere."""
    replicas = len(stack.tritons)
    with stack.models_client() as client:
        measured = client.status(MODEL)
        _wait(lambda: client.status(MODEL).memory_measured, 60)
        memory = client.status(MODEL).memory_mb
        results: dict[str, object] = {"model_memory_mib_measured": round(memory, 1),
                                      "replicas": replicas, "budget_mib_per_replica": PLACEMENT_BUDGET_MB}
        client.undeploy(MODEL)
        for mode, copies in (("heterogeneous", 1), ("everywhere", replicas)):
            spec = stack.base.models[MODEL].model_copy(update={
                "memory_mb": memory, "min_copies": copies, "max_copies": copies, "artifact": None,
                "storage_uri": json.loads(measured.spec_json)["storage_uri"],
            })
            served = 0
            for i in range(MAX_CLONES):
                try:
                    client.deploy(f"clone-{i}", spec)
                except ResourceExhausted:
                    break
                served += 1
            results[f"{mode}_models_served"] = served
            for i in range(served):
                client.undeploy(f"clone-{i}")
    return results


def autoscaling(stack: LocalStack, photos: list[bytes], duration_s: float) -> dict[str, object]:
    assert stack.state is not None and stack.settings is not None
    state, settings = stack.state, stack.settings
    spec = stack.base.models[MODEL].model_copy(update={"min_copies": 1, "max_copies": 2, "memory_mb": 200.0})
    stack.deploy("hot", spec)
    models = stack.models_client()
    samples: list[tuple[float, float, int, int]] = []
    batcher = models.status("hot").batchers[0]

    async def drive() -> tuple[float, float]:
        async with FlotillaClient(state.router, state.api_key, settings.s3, default_timeout_s=60) as client:
            uuids = [await client.upload(p) for p in photos]
            n = 0

            def call() -> Awaitable[object]:
                nonlocal n
                n += 1
                return client.classify(uuids[n % len(uuids)], "hot")

            async def watch() -> None:
                async with grpc.aio.insecure_channel(batcher) as channel:
                    admin = batcher_pb2_grpc.BatcherAdminStub(channel)
                    while True:
                        status = await asyncio.to_thread(models.status, "hot")
                        stats = await admin.GetStats(batcher_pb2.GetStatsRequest(model_name="hot"))
                        ready = sum(c.state == "ready" for c in status.copies)
                        samples.append((time.monotonic(), status.queue_wait_ms, ready, stats.total_dispatched))
                        await asyncio.sleep(0.25)

            watcher = asyncio.create_task(watch())
            start = time.monotonic()
            try:
                result = await closed_loop(call, concurrency=LOAD_CONCURRENCY, duration_s=duration_s, warmup_s=0.5)
            finally:
                watcher.cancel()
            return start, result.throughput_per_s

    start, throughput = asyncio.run(drive())
    added_at = next((t for t, _, ready, _ in samples if ready >= 2), None)
    before_window = [s for s in samples if s[2] == 1 and s[0] - start > 1.0]
    after_window = [s for s in samples if s[2] >= 2 and added_at is not None and s[0] > added_at + 1.0]
    before = [s[1] for s in before_window if s[1] > 0]
    after = [s[1] for s in after_window if s[1] > 0]

    def rate(window: list[tuple[float, float, int, int]]) -> float | None:
        if len(window) < 2 or window[-1][0] <= window[0][0]:
            return None
        return round((window[-1][3] - window[0][3]) / (window[-1][0] - window[0][0]), 1)

    events = [f"{e.kind}: {e.message}" for e in models.status("hot").events if e.kind.startswith("scale")]
    models.undeploy("hot")
    models.close()
    return {
        "concurrency": LOAD_CONCURRENCY,
        "copy_added_after_s": None if added_at is None else round(added_at - start, 2),
        "queue_wait_ms_before": round(statistics.median(before), 1) if before else None,
        "queue_wait_ms_after": round(statistics.median(after), 1) if after else None,
        "images_per_s_before": rate(before_window),
        "images_per_s_after": rate(after_window),
        "throughput_per_s_overall": round(throughput, 1),
        "decisions": events,
    }


def run(duration_s: float = 20.0) -> dict[str, dict[str, object]]:
    photo = Path("build/samples/chelsea.jpg").read_bytes()
    photos = [p.read_bytes() for p in sorted(Path("build/samples").glob("*.jpg"))]
    settings = fleet_settings(Path(".flotilla/bench-fleet"))
    print("starting a stack for the control-plane bench ...", flush=True)
    with LocalStack(settings) as stack:
        results = {"cold_start": cold_start(stack, photo)}
        print(json.dumps(results["cold_start"]), flush=True)
        results["autoscaling"] = autoscaling(stack, photos, duration_s)
        print(json.dumps(results["autoscaling"]), flush=True)
        results["placement"] = placement(stack)
        print(json.dumps(results["placement"]), flush=True)
    return results
