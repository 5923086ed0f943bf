"""The real local stack, started once per test session.

SeaweedFS, two Triton replicas, the controller, a preprocess worker, the
router and the model's batcher run as separate processes on 127.0.0.1 with
free ports, exactly as `flotilla up` starts them; the model is deployed
through the registry with a copy on each replica. The fixture stops every
process at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton_grpc

from flotilla.clients.client import FlotillaClient
from flotilla.common.admin import admin_metadata
from flotilla.config import FlotillaSettings, load_settings
from flotilla.modelbuild.catalog import EFFICIENTNET_LITE0
from flotilla.stack.local import LocalStack

REPO = Path(__file__).resolve().parents[2]
MODEL = EFFICIENTNET_LITE0
API_KEY = "integration-test-key"
SAMPLES = REPO / "build" / "samples"
MODELS_DIR = REPO / "build" / "models"
MODEL_ONNX = MODELS_DIR / MODEL / "1" / "model.onnx"
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
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    settings.models[MODEL].batching.max_queue_delay_us = MAX_QUEUE_DELAY_US
    settings.models[MODEL].batching.max_batch_size = MAX_BATCH_SIZE
    # A copy on each replica, as the batching-tier tests need.
    settings.models[MODEL].min_copies = settings.models[MODEL].max_copies = 2
    with LocalStack(settings) as running:
        yield running


def stack_settings(run_dir: Path, models: tuple[str, ...] = (MODEL,), **overrides: object) -> FlotillaSettings:
    """flotilla.yaml with a test API key, only ``models`` deployed, artifact paths absolute."""
    for model in models:
        if not (MODELS_DIR / model / "1" / "model.onnx").exists():
            pytest.fail(f"model {model} is not built; run `make models` (make test does it)")
    values: dict[str, object] = {
        "run_dir": run_dir,
        "router": {"api_keys": [API_KEY]},
        "preprocess": {"workers": 1, "max_object_bytes": MAX_OBJECT_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS},
        "triton": {"replicas": 2},
    }
    values.update(overrides)
    settings = load_settings(REPO / "flotilla.yaml", **values)
    settings.models = {
        name: spec.model_copy(update={"artifact": REPO / spec.artifact if spec.artifact else None})
        for name, spec in settings.models.items()
        if name in models
    }
    return settings


class _WithAdminKey(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends the admin key with every unary call of its channel (SetBatching needs it)."""

    def __init__(self, key: str) -> None:
        self.metadata = admin_metadata(key)

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        metadata = grpc.aio.Metadata(*tuple(client_call_details.metadata or ()), *self.metadata)
        return await continuation(client_call_details._replace(metadata=metadata), request)


def admin_channel(stack: LocalStack, address: str) -> grpc.aio.Channel:
    """A channel to a batcher whose calls carry the stack's admin key (its admin API's SetBatching)."""
    return grpc.aio.insecure_channel(address, interceptors=[_WithAdminKey(stack.admin_key)])


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


def write_unloadable(directory: Path) -> Path:
    """``directory/1/model.onnx``: a graph that declares what the EfficientNet spec says (``images`` UINT8
    NHWC 224x224 in, ``probabilities`` out) but uses an operator ONNX Runtime does not have, so
    Triton refuses to load it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
         helper.make_node("NoSuchOperator", ["pixels"], ["probabilities"])],
        "unloadable",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 224, 224, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 1000])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes(model.SerializeToString())
    return directory


PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "motorcycle_left.jpg")
"""The sample photos the front-door tests compare with Flotilla's own API."""


@dataclass(frozen=True)
class Photo:
    name: str
    uuid: str
    index: int
    """Top-1 class index by the Flotilla API."""
    label: str


@pytest.fixture(scope="module")
async def photos(stack: LocalStack) -> dict[str, Photo]:
    """``PHOTOS`` uploaded, each with its top-1 by Flotilla's own API (what the KServe and Triton
    clients must get too)."""
    assert stack.state is not None and stack.settings is not None
    async with FlotillaClient(stack.state.router, API_KEY, stack.settings.s3) as client:
        uploaded = {name: await client.upload(sample(name)) for name in PHOTOS}
        answers = await asyncio.gather(*(client.classify(u, MODEL, top_k=1) for u in uploaded.values()))
    return {
        name: Photo(name, image_uuid, answer.classes[0].index, answer.classes[0].label)
        for (name, image_uuid), answer in zip(uploaded.items(), answers, strict=True)
    }
