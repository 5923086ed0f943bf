"""What an idle model costs the mesh (`flotilla bench --only idle-fleet`).

A local stack (one Triton replica, ``batcher.shards`` shards, one router, one
worker) is measured twice over a quiet window: with one model deployed, then
with ``IDLE_MODELS`` more, each deployed with ``min_copies: 0`` (no copy
loaded) on the same near-free artifact and never called. Per tier
(controller, routers, shards, workers): memory (USS: what the process alone
holds) at the end of each window and CPU seconds over it, read from the
processes' own counters (psutil). Per idle model = the difference / the
count. The issue's target, across controller, routers and its shard: at
most 1 MiB and 0.1 ms of CPU per second per idle model. The same stack
before shards (one batcher process per model) held 2.4 GiB and 0.39 of a
core for 33 models, 30 of them idle.

Also measured: how long the deploys took, how long until the router routes
every model, and then, one deploy at a time on the full fleet, the time from
a deploy's answer until the router routes it (the fleet's delta reaching
it; target: within 1 s).

A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

from flotilla.api.v1 import inference_pb2, inference_pb2_grpc
from flotilla.bench.overhead import ensure_model, near_free_spec
from flotilla.common.wire import MODEL_HEADER
from flotilla.config import FlotillaSettings, load_settings
from flotilla.modelbuild.catalog import EFFICIENTNET_LITE0
from flotilla.stack.local import LocalStack, default_storage_uri
from flotilla.stack.processes import ManagedProcess

CONFIG = Path("flotilla.yaml")
IDLE_MODELS = 1000
QUIET_S = 20.0
DEPLOY_THREADS = 8
VISIBILITY_PROBES = 5
TARGET_MIB = 1.0
TARGET_CPU_MS_PER_S = 0.1
BEFORE_SHARDS = {"models": 33, "idle": 30, "rss_gib": 2.4, "cores": 0.39}
"""The issue's measurement of the stack with one batcher process per model."""


def idle_settings(run_dir: Path) -> FlotillaSettings:
    settings = load_settings(CONFIG, run_dir=run_dir)
    settings.models = {}
    settings.triton.replicas = 1
    settings.preprocess.workers = 1
    settings.router.processes = 1
    settings.observability.prometheus = False
    return settings


def tier_processes(stack: LocalStack) -> dict[str, list[ManagedProcess]]:
    return {
        "controller": [p for p in [stack.controller] if p is not None],
        "router": list(stack.routers),
        "shard": list(stack.batcher_processes()),
        "worker": list(stack.preprocess),
    }


def _uss_mib(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_full_info().uss) / 2**20
    except psutil.Error:
        return 0.0


def _cpu_s(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except psutil.Error:
        return 0.0


def quiet_window(stack: LocalStack, seconds: float) -> dict[str, dict[str, float]]:
    """Per tier: USS at the end (MiB) and CPU over the window (ms per second)."""
    tiers = tier_processes(stack)
    pids = {tier: [p.pid for p in procs if p.pid is not None] for tier, procs in tiers.items()}
    start = {tier: sum(_cpu_s(pid) for pid in ps) for tier, ps in pids.items()}
    began = time.monotonic()
    time.sleep(seconds)  # duration: the quiet window itself
    elapsed = time.monotonic() - began
    return {
        tier: {
            "uss_mib": round(sum(_uss_mib(pid) for pid in ps), 1),
            "cpu_ms_per_s": round((sum(_cpu_s(pid) for pid in ps) - start[tier]) / elapsed * 1000.0, 3),
            "processes": len(ps),
        }
        for tier, ps in pids.items()
    }


def run(models: int = IDLE_MODELS, quiet_s: float = QUIET_S) -> dict[str, Any]:
    artifact = ensure_model()
    with tempfile.TemporaryDirectory(prefix="flotilla-idle-") as run_dir:
        settings = idle_settings(Path(run_dir))
        base = load_settings(CONFIG).models[EFFICIENTNET_LITE0]
        spec = near_free_spec(base, 1).model_copy(update={"min_copies": 0, "max_copies": 1})
        spec.artifact = artifact
        with LocalStack(settings) as stack:
            assert stack.settings is not None
            stack.deploy("idle-0", spec, wait=True)  # uploads the artifact once
            shared = spec.model_copy(update={"artifact": None, "storage_uri": default_storage_uri(stack.settings, "idle-0")})
            before = quiet_window(stack, quiet_s)

            names = [f"idle-{i}" for i in range(1, models + 1)]
            started = time.monotonic()
            with stack.models_client() as client, concurrent.futures.ThreadPoolExecutor(DEPLOY_THREADS) as pool:
                list(pool.map(lambda n: client.deploy(n, shared), names))
            deploy_s = time.monotonic() - started
            key = stack.settings.router.api_keys[0].get_secret_value()
            routed_after_s = _until_routed(stack, key, names, started)
            after = quiet_window(stack, quiet_s)
            # One more deploy at a time on the full fleet: from the deploy's answer to the router routing it.
            visible = []
            with stack.models_client() as client:
                for i in range(VISIBILITY_PROBES):
                    name = f"probe-{i}"
                    client.deploy(name, shared)
                    visible.append(_until_routed(stack, key, [name], time.monotonic()))
    per_model = {
        tier: {
            "mib": round((after[tier]["uss_mib"] - before[tier]["uss_mib"]) / models, 4),
            "cpu_ms_per_s": round((after[tier]["cpu_ms_per_s"] - before[tier]["cpu_ms_per_s"]) / models, 5),
        }
        for tier in before
    }
    mesh = ("controller", "router", "shard")
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "idle_models": models,
        "quiet_window_s": quiet_s,
        "shards": settings.batcher.shards,
        "before": before,
        "after": after,
        "per_idle_model": per_model,
        "per_idle_model_mesh": {
            "mib": round(sum(per_model[t]["mib"] for t in mesh), 4),
            "cpu_ms_per_s": round(sum(per_model[t]["cpu_ms_per_s"] for t in mesh), 5),
        },
        "targets": {"mib": TARGET_MIB, "cpu_ms_per_s": TARGET_CPU_MS_PER_S},
        "deploy_s": round(deploy_s, 1),
        "deploys_per_s": round(models / deploy_s, 1),
        "all_routed_after_s": round(routed_after_s, 1),
        "deploy_visible_on_router_s": {"max": round(max(visible), 3), "median": round(sorted(visible)[len(visible) // 2], 3)},
        "before_shards": {
            **BEFORE_SHARDS,
            "mib_per_model": round(BEFORE_SHARDS["rss_gib"] * 1024 / BEFORE_SHARDS["models"], 1),
            "cpu_ms_per_s_per_model": round(BEFORE_SHARDS["cores"] * 1000 / BEFORE_SHARDS["models"], 2),
        },
    }


def _until_routed(stack: LocalStack, key: str, names: list[str], since: float, timeout_s: float = 120.0) -> float:
    """Seconds from ``since`` until the router routes every name (NOT_FOUND for none)."""
    assert stack.settings is not None
    router = stack.settings.endpoints.router
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    with grpc.insecure_channel(router) as channel:
        stub = inference_pb2_grpc.ImageClassifierStub(channel)
        while pending and time.monotonic() < deadline:
            still = []
            for name in pending:
                try:
                    # An empty body: a routed model's shard answers INVALID_ARGUMENT (no image uuid).
                    stub.Classify(inference_pb2.ClassifyRequest(), timeout=2.0,
                                  metadata=[(MODEL_HEADER, name), ("authorization", f"Bearer {key}")])
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:
                        still.append(name)
            pending = still
            if pending:
                time.sleep(0.01)  # duration: poll interval while routes land
    return time.monotonic() - since


def table(idle: dict[str, Any]) -> list[str]:
    """Markdown lines for the results page."""
    rows = ["| tier | MiB per idle model | CPU ms/s per idle model |", "|---|---|---|"]
    for tier, cost in idle["per_idle_model"].items():
        rows.append(f"| {tier} | {cost['mib']:.3f} | {cost['cpu_ms_per_s']:.4f} |")
    mesh = idle["per_idle_model_mesh"]
    rows.append(f"| **controller + router + shard** | **{mesh['mib']:.3f}** (target ≤ {TARGET_MIB}) | "
                f"**{mesh['cpu_ms_per_s']:.4f}** (target ≤ {TARGET_CPU_MS_PER_S}) |")
    old = idle["before_shards"]
    rows.append(f"| before shards (one batcher per model) | {old['mib_per_model']} | {old['cpu_ms_per_s_per_model']} |")
    return rows


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
