"""Batches to a Triton replica on this host through system shared memory, against the real
replicas of the session stack, over HTTP and over gRPC: same answers as inline, a lost
registration is made again, a region Triton cannot map falls back to inline, and stopping
leaves nothing registered."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from prometheus_client import REGISTRY

from flotilla.config import BackendSettings, PoolSettings
from flotilla.services.preprocess.imaging import decode_for_model
from flotilla.services.preprocess.triton.backend import TritonBackend
from flotilla.services.preprocess.triton.shm import SHM_DIR, SharedMemoryRegions
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MODEL, SAMPLES

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def photos_batch(stack: LocalStack) -> np.ndarray:
    spec = stack.settings.models[MODEL].input  # type: ignore[union-attr]
    files = sorted(SAMPLES.glob("*.jpg"))[:4]
    batch = np.empty((len(files), spec.height_px, spec.width_px, 3), np.uint8)
    for row, path in zip(batch, files, strict=True):
        decode_for_model(path.read_bytes(), spec, what=path.name, max_pixels=50_000_000, out=row)
    return batch


def registered(address: str) -> set[str]:
    client = triton_grpc.InferenceServerClient(address)
    try:
        status = client.get_system_shared_memory_status(as_json=True)
    finally:
        client.close()
    return set(status.get("regions", {}))


@pytest.fixture(params=["http", "grpc"])
def protocol(request: pytest.FixtureRequest) -> str:
    """Every test here runs with batches over each protocol the worker speaks to Triton."""
    return request.param  # type: ignore[no-any-return]


def make_backend(stack: LocalStack, protocol: str, shm: SharedMemoryRegions | None = None) -> TritonBackend:
    """A worker's backend on the stack's replicas, as a fleet snapshot would set it up."""
    assert stack.state is not None
    backend = TritonBackend(PoolSettings(), shm=shm, protocol=protocol)
    backend.set_http_endpoints(dict(zip(stack.state.triton, stack.state.triton_http, strict=True)))
    backend.set_copies(MODEL, stack.state.triton, BackendSettings())
    assert {e.client.protocol for e in backend.pools[MODEL].endpoints} == {protocol}
    return backend


@pytest.fixture
async def backends(
    stack: LocalStack, protocol: str
) -> AsyncIterator[tuple[TritonBackend, TritonBackend, SharedMemoryRegions]]:
    shm = SharedMemoryRegions("flotilla-test-", max_bytes=64 << 20)
    via_shm, inline = make_backend(stack, protocol, shm), make_backend(stack, protocol)
    try:
        yield via_shm, inline, shm
    finally:
        await via_shm.close()
        await inline.close()


def batches(transfer: str, addresses: list[str]) -> float:
    """Batches the worker-side counter saw go to ``addresses`` by ``transfer`` (shm or inline)."""
    return sum(
        REGISTRY.get_sample_value(
            "flotilla_backend_batches_total", {"model": MODEL, "replica": a, "transfer": transfer}
        ) or 0.0
        for a in addresses
    )


def assert_same_scores(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


async def infer(backend: TritonBackend, stack: LocalStack, batch: np.ndarray) -> np.ndarray:
    spec = stack.settings.models[MODEL]  # type: ignore[union-attr]
    result = await backend.infer(MODEL, spec.input.name, batch, spec.output_name, timeout_s=30.0)
    return result.outputs


async def test_a_batch_through_shared_memory_gets_the_inline_answer(
    stack: LocalStack, backends: tuple[TritonBackend, TritonBackend, SharedMemoryRegions]
) -> None:
    via_shm, inline, shm = backends
    batch = photos_batch(stack)
    expected = await infer(inline, stack, batch)
    replicas = stack.state.triton  # type: ignore[union-attr]
    before = batches("shm", replicas)
    for _ in range(2 * len(replicas)):  # every replica, round robin
        assert_same_scores(await infer(via_shm, stack, batch), expected)
    [region] = shm.regions  # one batch in flight at a time: one region, reused
    assert region.registered == set(stack.state.triton)  # type: ignore[union-attr]
    for address in replicas:
        assert region.name in registered(address)
    assert batches("shm", replicas) - before == 2 * len(replicas)
    # A different batch in the same region: the answer follows the pixels, not a stale copy.
    flipped = np.ascontiguousarray(batch[::-1])
    assert_same_scores(await infer(via_shm, stack, flipped), expected[::-1])


async def test_a_replica_that_lost_the_registration_is_given_it_again(
    stack: LocalStack, backends: tuple[TritonBackend, TritonBackend, SharedMemoryRegions]
) -> None:
    via_shm, inline, shm = backends
    batch = photos_batch(stack)
    expected = await infer(inline, stack, batch)
    await infer(via_shm, stack, batch)
    await infer(via_shm, stack, batch)
    [region] = shm.regions
    for address in stack.state.triton:  # type: ignore[union-attr]  # as a restarted Triton would be
        client = triton_grpc.InferenceServerClient(address)
        client.unregister_system_shared_memory(region.name)
        client.close()
    for _ in range(2):
        assert_same_scores(await infer(via_shm, stack, batch), expected)
    for address in stack.state.triton:  # type: ignore[union-attr]
        assert region.name in registered(address)


async def test_a_region_triton_cannot_map_sends_batches_inline(
    stack: LocalStack, protocol: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.state is not None
    # Files outside /dev/shm: Triton's shm_open of the key finds nothing, as on another host.
    shm = SharedMemoryRegions("flotilla-test-", max_bytes=64 << 20, directory=tmp_path)
    backend = make_backend(stack, protocol, shm)
    inline = make_backend(stack, protocol)
    batch = photos_batch(stack)
    shm_before, inline_before = batches("shm", stack.state.triton), batches("inline", stack.state.triton)
    try:
        with caplog.at_level(logging.WARNING):
            expected = await infer(inline, stack, batch)
            for _ in range(3):
                assert_same_scores(await infer(backend, stack, batch), expected)
    finally:
        await backend.close()
        await inline.close()
    assert "cannot map shared memory" in caplog.text
    assert all(not r.registered for r in shm.regions)
    assert batches("shm", stack.state.triton) == shm_before
    assert batches("inline", stack.state.triton) - inline_before == 1 + 3


async def test_stopping_unregisters_and_removes_every_region(stack: LocalStack, protocol: str) -> None:
    assert stack.state is not None
    shm = SharedMemoryRegions("flotilla-test-", max_bytes=64 << 20)
    backend = make_backend(stack, protocol, shm)
    batch = photos_batch(stack)
    await asyncio.gather(*(infer(backend, stack, batch) for _ in range(4)))  # several regions at once
    names = {r.name for r in shm.regions}
    assert names and all((SHM_DIR / n).exists() for n in names)
    await backend.close()
    for address in stack.state.triton:
        assert not names & registered(address)
    assert not any((SHM_DIR / n).exists() for n in names)


async def test_a_killed_workers_registrations_are_removed_before_the_first_batch(
    stack: LocalStack, protocol: str
) -> None:
    assert stack.state is not None
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = f"flotilla-test-{int(exited.stdout)}-0", f"flotilla-test-{os.getpid()}-kept"
    for name in (stale, live):  # registered as a worker would have, its file then removed
        (SHM_DIR / name).write_bytes(bytes(1 << 20))
        for address in stack.state.triton:
            client = triton_grpc.InferenceServerClient(address)
            client.register_system_shared_memory(name, "/" + name, 1 << 20)
            client.close()
        (SHM_DIR / name).unlink()
    backend = make_backend(stack, protocol, SharedMemoryRegions("flotilla-test-", max_bytes=64 << 20))
    try:
        for _ in stack.state.triton:  # a batch to every replica
            await infer(backend, stack, photos_batch(stack))
        for address in stack.state.triton:
            names = registered(address)
            assert stale not in names, "the stopped worker's registration (Triton held its memory) is gone"
            assert live in names, "a running process's registration is left alone"
    finally:
        await backend.close()
        for address in stack.state.triton:
            client = triton_grpc.InferenceServerClient(address)
            client.unregister_system_shared_memory(live)
            client.close()
