"""The real local stack, started once per test session.

SeaweedFS, two Triton replicas, a preprocess worker, the batcher and the
router run as separate processes on 127.0.0.1 with free ports, exactly as
`flotilla up` starts them; the fixture stops every one of them at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc

from flotilla.clients.client import FlotillaClient
from flotilla.config import load_settings
from flotilla.stack.local import LocalStack

REPO = Path(__file__).resolve().parents[2]
MODEL = "efficientnet-lite0"
API_KEY = "integration-test-key"
SAMPLES = REPO / "build" / "samples"
MODEL_REPOSITORY = REPO / "build" / "model-repository"
# Long enough that concurrent requests from one test reliably share batches
# on a busy 2-core machine; short enough not to slow the suite down.
MAX_QUEUE_DELAY_US = 20_000
MAX_BATCH_SIZE = 8
# Small enough that a test can upload a larger object cheaply.
MAX_OBJECT_BYTES = 2 * 1024 * 1024
MAX_IMAGE_PIXELS = 50_000_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if not (MODEL_REPOSITORY / MODEL / "1" / "model.onnx").exists():
        pytest.fail("the model is not built; run `make models` (make test does it)")
    settings = load_settings(
        REPO / "flotilla.yaml",
        run_dir=tmp_path_factory.mktemp("stack"),
        router={"api_keys": [API_KEY]},
        preprocess={"workers": 1, "max_object_bytes": MAX_OBJECT_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS},
        triton={"replicas": 2, "model_repository": str(MODEL_REPOSITORY)},
    )
    settings.models[MODEL].batching.max_queue_delay_us = MAX_QUEUE_DELAY_US
    settings.models[MODEL].batching.max_batch_size = MAX_BATCH_SIZE
    with LocalStack(settings) as running:
        yield running


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[FlotillaClient]:
    assert stack.state is not None and stack.settings is not None
    async with FlotillaClient(stack.state.router, API_KEY, stack.settings.s3) as c:
        yield c


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def triton_counts(address: str, model: str = MODEL) -> tuple[int, int]:
    """(inference_count, execution_count) from Triton's own statistics."""
    client = triton_grpc.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    entry = stats["model_stats"][0]
    return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))
