"""The request path end to end on the real stack."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from flotilla.clients.client import FlotillaClient
from flotilla.common.probe import is_serving
from flotilla.common.runtime_env import (
    EXPERIMENTS_VARIABLE,
    SERVICE_ENV,
    SERVICE_GRPC_EXPERIMENTS,
    SERVICE_MALLOC_TUNABLES,
    TUNABLES_VARIABLE,
)
from flotilla.errors import Code, FlotillaError
from flotilla.services.preprocess.imaging import decode_for_model, to_batch_tensor
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MAX_BATCH_SIZE, MODEL, MODEL_ONNX, sample, triton_counts

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


def in_process_top5(jpeg: bytes, stack: LocalStack) -> list[tuple[int, float]]:
    """The same JPEG through the same preprocessing and ONNX file, in this process."""
    assert stack.settings is not None
    spec = stack.settings.models[MODEL].input
    pixels = decode_for_model(jpeg, spec, what="reference", max_pixels=10**9)
    session = ort.InferenceSession(str(MODEL_ONNX))
    probabilities = session.run(None, {spec.name: to_batch_tensor([pixels], spec)})[0][0]
    best = np.argsort(-probabilities)[:5]
    return [(int(i), float(probabilities[i])) for i in best]


async def test_cat_is_a_cat_and_coffee_is_espresso(client: FlotillaClient) -> None:
    cat, coffee = await asyncio.gather(
        client.classify_jpeg(sample("chelsea.jpg"), MODEL),
        client.classify_jpeg(sample("coffee.jpg"), MODEL),
    )
    assert cat.classes[0].index in CAT_CLASSES, cat.classes
    assert cat.classes[0].label == "Egyptian cat"
    assert coffee.classes[0].index in (ESPRESSO, CUP), coffee.classes
    assert len(cat.classes) == 5
    assert [c.score for c in cat.classes] == sorted((c.score for c in cat.classes), reverse=True)


@pytest.mark.parametrize("photo", ["chelsea.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg"])
async def test_mesh_matches_in_process_onnx(client: FlotillaClient, stack: LocalStack, photo: str) -> None:
    jpeg = sample(photo)
    result = await client.classify_jpeg(jpeg, MODEL)
    reference = in_process_top5(jpeg, stack)
    assert [c.index for c in result.classes] == [i for i, _ in reference]
    for got, (_, want) in zip(result.classes, reference, strict=True):
        assert got.score == pytest.approx(want, abs=1e-4)


async def test_concurrent_requests_share_triton_executions(client: FlotillaClient, stack: LocalStack) -> None:
    n = 4 * MAX_BATCH_SIZE
    uuids = [await client.upload(sample("coffee.jpg")) for _ in range(n)]
    before = [triton_counts(a) for a in stack.state.triton]  # type: ignore[union-attr]
    results = await asyncio.gather(*(client.classify(u, MODEL) for u in uuids))
    after = [triton_counts(a) for a in stack.state.triton]  # type: ignore[union-attr]

    inferences = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    executions = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    assert all(r.classes[0].index in (ESPRESSO, CUP) for r in results)
    assert inferences == n  # every image ran exactly once
    assert executions < n, f"{n} requests took {executions} Triton executions: no batching"
    assert executions <= n // 2


async def test_both_triton_replicas_do_work(client: FlotillaClient, stack: LocalStack) -> None:
    assert stack.state is not None and len(stack.state.triton) == 2
    uuid = await client.upload(sample("chelsea.jpg"))
    before = [triton_counts(a) for a in stack.state.triton]
    for _ in range(6):  # one request at a time: one batch each, round-robin
        await client.classify(uuid, MODEL)
    after = [triton_counts(a) for a in stack.state.triton]
    executions = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    assert sum(executions) == 6
    assert all(e >= 2 for e in executions), f"executions per replica: {executions}"


async def test_missing_object_is_not_found_naming_the_uuid(client: FlotillaClient) -> None:
    missing = "0b7e8c9a-1234-4cde-8f00-00000000abcd"
    with pytest.raises(FlotillaError) as caught:
        await client.classify(missing, MODEL)
    assert caught.value.code == Code.NOT_FOUND
    assert missing in caught.value.message


async def test_bad_image_fails_alone_in_its_batch(client: FlotillaClient) -> None:
    good = [await client.upload(sample("coffee.jpg")) for _ in range(3)]
    bad = await client.upload(b"this is not a jpeg at all")
    results = await asyncio.gather(
        *(client.classify(u, MODEL) for u in [*good, bad]), return_exceptions=True
    )
    assert all(not isinstance(r, BaseException) for r in results[:3]), results
    assert isinstance(results[3], FlotillaError) and results[3].code == Code.INVALID_ARGUMENT
    assert "not a JPEG" in results[3].message


def test_every_service_is_healthy(stack: LocalStack) -> None:
    for proc in stack.flotilla_services():
        assert proc.alive(), proc.exit_summary()
        assert is_serving(proc.address), f"{proc.name} at {proc.address} is not SERVING"


def test_the_services_run_in_flotillas_environment_and_triton_in_its_own(stack: LocalStack) -> None:
    def environment(pid: int | None) -> dict[str, str]:
        assert pid is not None
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if entry)

    for proc in stack.flotilla_services():
        env = environment(proc.pid)
        assert env.get(EXPERIMENTS_VARIABLE) == SERVICE_GRPC_EXPERIMENTS, proc.name
        # glibc parses GLIBC_TUNABLES in place at start (a NUL after the first tunable), so the process's
        # original environment block shows the first of them only.
        tunables = env.get(TUNABLES_VARIABLE, "")
        assert tunables and SERVICE_MALLOC_TUNABLES.startswith(tunables), (proc.name, tunables)
    for triton in stack.tritons:
        env = environment(triton.pid)
        assert {name: env.get(name) for name in SERVICE_ENV} == {name: os.environ.get(name) for name in SERVICE_ENV}


def test_cli_infer_prints_top5(stack: LocalStack, tmp_path: Path) -> None:
    import subprocess
    import sys

    state = stack.run_dir / "stack.json"
    result = subprocess.run(
        [sys.executable, "-m", "flotilla", "infer", str(Path("build/samples/chelsea.jpg").resolve()),
         "--model", MODEL, "--state", str(state), "--api-key", "integration-test-key"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("chelsea.jpg")
    assert "Egyptian cat" in lines[1]
    assert len([line for line in lines if line.strip()[:2] in {"1.", "2.", "3.", "4.", "5."}]) == 5
