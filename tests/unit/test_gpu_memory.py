"""GPU memory budgets (``controller.memory_kind: gpu``): Triton's metrics text parsed, the HTTP source's
errors, a copy's growth from its load to after its warm-up, and the budget clamped to the GPUs' total.
A fake source stands in for the GPU; a fake tritonclient for the replica's Triton."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flotilla.config import ModelSettings
from flotilla.errors import Code
from flotilla.services.controller.artifacts import ArtifactCache, ArtifactStore
from flotilla.services.controller.gpu_memory import (
    GpuMemory,
    GpuMemoryMeter,
    GpuMetricsUnavailable,
    NoGpuReported,
    TritonGpuMetrics,
    metrics_url,
    parse_gpu_memory,
)
from flotilla.services.controller.replicas import TritonReplica

GIB = 1024.0  # MiB

GPU_A = "GPU-c06bbf33-c250-ca45-579b-19134b518844"
GPU_B = "GPU-5f0e1d2c-7a41-4b0e-9f3d-2a7c88e1b001"

# As Triton 2.x writes /metrics on a host with two GPUs and one model loaded (values trimmed).
TRITON_METRICS = f"""\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{{model="resnet",version="1"}} 12.000000
# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{{model="resnet",version="1"}} 96.000000
# HELP nv_inference_compute_infer_duration_us Cumulative compute inference duration in microseconds
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{{model="resnet",version="1"}} 48213.000000
# HELP nv_pinned_memory_pool_total_bytes Pinned memory pool total memory size, in bytes
# TYPE nv_pinned_memory_pool_total_bytes gauge
nv_pinned_memory_pool_total_bytes 268435456.000000
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.031250
# HELP nv_cpu_memory_total_bytes CPU total memory (RAM), in bytes
# TYPE nv_cpu_memory_total_bytes gauge
nv_cpu_memory_total_bytes 134217728000.000000
# HELP nv_cpu_memory_used_bytes CPU used memory (RAM), in bytes
# TYPE nv_cpu_memory_used_bytes gauge
nv_cpu_memory_used_bytes 9663676416.000000
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{{gpu_uuid="{GPU_A}"}} 0.120000
nv_gpu_utilization{{gpu_uuid="{GPU_B}"}} 0.000000
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{{gpu_uuid="{GPU_A}"}} 85899345920.000000
nv_gpu_memory_total_bytes{{gpu_uuid="{GPU_B}"}} 85899345920.000000
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{{gpu_uuid="{GPU_A}"}} 3221225472.000000
nv_gpu_memory_used_bytes{{gpu_uuid="{GPU_B}"}} 536870912.000000
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{{gpu_uuid="{GPU_A}"}} 71.245000
nv_gpu_power_usage{{gpu_uuid="{GPU_B}"}} 64.012000
# HELP nv_energy_consumption GPU energy consumption in joules since the Triton Server started
# TYPE nv_energy_consumption counter
nv_energy_consumption{{gpu_uuid="{GPU_A}"}} 3594017.400000
nv_energy_consumption{{gpu_uuid="{GPU_B}"}} 3412876.100000
"""

# A Triton without a GPU: the same text less every nv_gpu_* and energy series.
CPU_TRITON_METRICS = "\n".join(
    line for line in TRITON_METRICS.splitlines() if "nv_gpu_" not in line and "nv_energy" not in line
) + "\n"


# -- parsing Triton's metrics ------------------------------------------------------


def test_used_and_total_are_summed_over_the_gpus_and_other_series_ignored() -> None:
    memory = parse_gpu_memory(TRITON_METRICS, "t:8002")
    assert memory == GpuMemory(used_mb=3 * GIB + 512, total_mb=160 * GIB, gpus=2)


def test_the_sum_can_be_limited_to_the_gpus_a_replica_uses() -> None:
    assert parse_gpu_memory(TRITON_METRICS, "t:8002", gpu_uuids={GPU_B}) == GpuMemory(512, 80 * GIB, 1)


def test_metrics_without_gpu_series_say_triton_reports_no_gpu() -> None:
    with pytest.raises(NoGpuReported) as caught:
        parse_gpu_memory(CPU_TRITON_METRICS, "http://t:8002/metrics")
    assert caught.value.code == Code.FAILED_PRECONDITION
    message = caught.value.message
    assert "Triton at http://t:8002/metrics reports no GPU; memory_kind gpu needs a GPU replica" in message
    assert "--allow-gpu-metrics=false" in message


def test_text_that_is_not_prometheus_is_an_unavailable_endpoint() -> None:
    with pytest.raises(GpuMetricsUnavailable, match="not Prometheus text"):
        parse_gpu_memory("nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-1\" 12\n", "t:8002")


def test_a_metrics_address_becomes_its_url() -> None:
    assert metrics_url("triton-0.triton:8002") == "http://triton-0.triton:8002/metrics"
    assert metrics_url("http://t:8002/metrics") == "http://t:8002/metrics"


# -- the HTTP source ---------------------------------------------------------------


@pytest.fixture
def metrics_server() -> Iterator[str]:
    """A local HTTP server answering /metrics with TRITON_METRICS, on a port the OS picked."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = TRITON_METRICS.encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_http_source_reads_tritons_metrics_endpoint(metrics_server: str) -> None:
    assert TritonGpuMetrics(metrics_server).read().gpus == 2


def test_an_unreachable_metrics_endpoint_is_unavailable_and_named() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(GpuMetricsUnavailable) as caught:
        TritonGpuMetrics(address, timeout_s=1.0).read()
    assert caught.value.code == Code.UNAVAILABLE
    assert f"Triton metrics at http://{address}/metrics did not answer" in caught.value.message


def test_an_http_error_status_is_unavailable(metrics_server: str) -> None:
    with pytest.raises(GpuMetricsUnavailable, match="did not answer: Not Found"):
        TritonGpuMetrics(f"http://{metrics_server}/other").read()


# -- a copy's growth ---------------------------------------------------------------


class FakeGpu:
    """A GpuMemorySource whose used figure the test moves (MiB); ``fail`` makes reads raise it."""

    def __init__(self, used_mb: float = 500.0, total_mb: float = 16 * GIB, gpus: int = 1) -> None:
        self.used_mb = used_mb
        self.total_mb = total_mb
        self.gpus = gpus
        self.fail: Exception | None = None
        self.reads = 0

    def read(self) -> GpuMemory:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        return GpuMemory(self.used_mb, self.total_mb, self.gpus)


def meter(gpu: FakeGpu, clock: list[float] | None = None) -> GpuMemoryMeter:
    now = clock or [0.0]
    return GpuMemoryMeter(gpu, settle_s=0.0, clock=lambda: now[0])


def test_a_copy_alone_measures_used_after_its_warm_up_less_used_before_its_load() -> None:
    gpu = FakeGpu(used_mb=500)
    m = meter(gpu)
    m.begin("a", declared_mb=100)
    gpu.used_mb += 700  # load
    gpu.used_mb += 300  # warm-up arena
    assert m.end("a") == 1000
    assert m.end("a") is None, "one measurement per window"


def test_overlapping_loads_share_the_growth_in_proportion_to_declared_memory() -> None:
    gpu = FakeGpu(used_mb=500)
    m = meter(gpu)
    m.begin("a", declared_mb=300)
    gpu.used_mb += 600  # a alone
    m.begin("b", declared_mb=100)  # a's 600 so far are its own
    gpu.used_mb += 400  # both: split 3:1
    a = m.end("a")
    gpu.used_mb += 200  # b alone
    b = m.end("b")
    assert (a, b) == (900, 300)
    assert 900 + 300 == gpu.used_mb - 500, "the shares add up to the growth"


def test_an_unload_during_a_window_is_not_counted_against_it() -> None:
    gpu = FakeGpu(used_mb=500)
    m = meter(gpu)
    m.begin("old", declared_mb=100)
    gpu.used_mb += 400
    assert m.end("old") == 400
    m.begin("new", declared_mb=100)
    m.unloaded("old", declared_mb=100)  # frees its measured 400, not its declared 100
    gpu.used_mb += 250 - 400
    assert m.end("new") == 250


def test_a_window_never_closed_expires() -> None:
    gpu, clock = FakeGpu(), [0.0]
    m = meter(gpu, clock)
    m.begin("gave-up", declared_mb=100)
    clock[0] = 10_000.0
    m.begin("next", declared_mb=100)
    gpu.used_mb += 300
    assert m.end("next") == 300, "the expired window takes no share"
    assert m.end("gave-up") is None


def test_the_budget_is_the_configured_one_at_most_the_total_less_a_reserve_per_gpu() -> None:
    gpu = FakeGpu(total_mb=2 * 16 * GIB, gpus=2)
    m = GpuMemoryMeter(gpu, reserve_mb_per_gpu=512)
    assert m.budget_mb(64 * GIB) == 64 * GIB, "total unknown before a reading"
    m.read()
    assert m.budget_mb(64 * GIB) == 32 * GIB - 1024
    assert m.budget_mb(8 * GIB) == 8 * GIB


# -- the replica -------------------------------------------------------------------


class FakeTriton:
    """The tritonclient calls TritonReplica makes; loads and warm-ups grow the fake GPU's used figure."""

    def __init__(self, gpu: FakeGpu, load_mb: float, warm_up_mb: float) -> None:
        self.gpu, self.load_mb, self.warm_up_mb = gpu, load_mb, warm_up_mb

    async def is_server_live(self, client_timeout: float) -> bool:
        return True

    async def load_model(self, name: str, config: str) -> None:
        self.gpu.used_mb += self.load_mb

    async def infer(self, name: str, inputs: list[Any], model_version: str) -> None:
        self.gpu.used_mb += self.warm_up_mb

    async def unload_model(self, name: str) -> None:
        self.gpu.used_mb -= self.load_mb + self.warm_up_mb

    async def close(self) -> None:
        pass


def model_spec() -> ModelSettings:
    return ModelSettings.model_validate({
        "storage_uri": "s3://models/m", "memory_mb": 200, "backend": {"max_batch_size": 4},
        "batching": {"max_batch_size": 4}, "input": {"height_px": 8, "width_px": 8},
    })


def cached_manifest(cache_root: Path) -> dict[str, dict[str, object]]:
    """A manifest whose version 1 is already in the replica's artifact cache (nothing downloads)."""
    data = b"onnx"
    digest = hashlib.sha256(data).hexdigest()
    path = cache_root / "m" / "1" / digest / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return {"1/model.onnx": {"sha256": digest, "bytes": len(data)}}


def no_store(bucket: str) -> Any:
    raise AssertionError("the artifact is cached; nothing is downloaded")


def gpu_replica(tmp_path: Path, gpu: FakeGpu, budget_mb: float) -> TritonReplica:
    replica = TritonReplica(
        "t:8001", budget_mb, tmp_path / "models", ArtifactCache(tmp_path / "cache", ArtifactStore(no_store)),
        memory_kind="gpu", gpu_memory=meter(gpu),
    )
    replica.client = FakeTriton(gpu, load_mb=600, warm_up_mb=150)
    return replica


async def test_a_gpu_replica_measures_a_copy_as_the_growth_its_load_and_warm_up_cause(tmp_path: Path) -> None:
    gpu = FakeGpu(used_mb=700)
    replica = gpu_replica(tmp_path, gpu, budget_mb=8 * GIB)
    spec = model_spec()
    await replica.load("m", spec, spec.storage_uri, cached_manifest(tmp_path / "cache"))
    await replica.warm_up("m", spec)
    assert await asyncio.to_thread(replica.measure_memory_mb, "m", spec) == 750
    assert replica.budget_mb == 8 * GIB


async def test_a_gpu_replicas_budget_is_clamped_to_its_gpus_once_it_answers(tmp_path: Path) -> None:
    gpu = FakeGpu(total_mb=16 * GIB)
    big, small = gpu_replica(tmp_path / "big", gpu, 20 * GIB), gpu_replica(tmp_path / "small", gpu, 4 * GIB)
    assert big.budget_mb == 20 * GIB, "configured until a reading gives the total"
    assert await big.is_live() and await small.is_live()
    assert big.budget_mb == 15 * GIB  # 16 GiB less the default reserve of 1 GiB
    assert small.budget_mb == 4 * GIB


async def test_a_gpu_replica_whose_triton_reports_no_gpu_says_so_once_and_keeps_its_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gpu = FakeGpu()
    gpu.fail = NoGpuReported("Triton at http://t:8002/metrics reports no GPU; memory_kind gpu needs a GPU replica")
    replica = gpu_replica(tmp_path, gpu, budget_mb=4 * GIB)
    with caplog.at_level(logging.WARNING):
        assert await replica.is_live() and await replica.is_live()
    warnings = [r.getMessage() for r in caplog.records if "GPU memory not read" in r.getMessage()]
    assert warnings == [
        "replica t:8001: GPU memory not read: Triton at http://t:8002/metrics reports no GPU; "
        "memory_kind gpu needs a GPU replica"
    ]
    assert replica.budget_mb == 4 * GIB and gpu.reads == 2


async def test_an_unreachable_source_leaves_the_copy_unmeasured_not_the_load_failed(tmp_path: Path) -> None:
    gpu = FakeGpu()
    replica = gpu_replica(tmp_path, gpu, budget_mb=4 * GIB)
    spec = model_spec()
    gpu.fail = GpuMetricsUnavailable("Triton metrics at http://t:8002/metrics did not answer: refused")
    await replica.load("m", spec, spec.storage_uri, cached_manifest(tmp_path / "cache"))
    await replica.warm_up("m", spec)
    assert await asyncio.to_thread(replica.measure_memory_mb, "m", spec) is None


def test_memory_kind_gpu_needs_a_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory_kind gpu needs its Triton metrics"):
        TritonReplica("t:8001", 1024, tmp_path, ArtifactCache(tmp_path, ArtifactStore(no_store)), memory_kind="gpu")


def test_a_failed_load_frees_what_its_window_counted_not_its_declared_memory() -> None:
    gpu = FakeGpu(used_mb=500)
    m = meter(gpu)
    m.begin("ok", declared_mb=100)
    m.begin("failed", declared_mb=100)  # Triton refuses it at once: it grew by nothing
    m.unloaded("failed", declared_mb=100)
    gpu.used_mb += 350
    assert m.end("ok") == 350


def test_a_copy_that_grew_by_nothing_is_not_measured() -> None:
    gpu = FakeGpu(used_mb=500)
    m = meter(gpu)
    m.begin("cpu-instances", declared_mb=100)
    assert m.end("cpu-instances") is None, "the declared figure stands, not a copy that costs nothing"
