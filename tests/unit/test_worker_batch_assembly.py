"""The worker's batch assembly: images decoded straight into their rows, top-k for all rows at once."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from flotilla.config import InputSpec, ModelSettings
from flotilla.errors import ImageNotFound
from flotilla.services.preprocess.backend import InferResult
from flotilla.services.preprocess.imaging import decode_for_model, to_batch_tensor, top_k, top_k_rows
from flotilla.services.preprocess.processor import BatchProcessor, ItemRequest, ServedModel

UUIDS = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]
SPEC = InputSpec(height_px=32, width_px=48, layout="NCHW", dtype="FP32", channel_order="BGR")


def jpeg(height: int, width: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class Store:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    async def get(self, key: str, max_bytes: int) -> bytes:
        if key not in self.objects:
            raise ImageNotFound(f"no object {key!r}")
        return self.objects[key]


class RecordingBackend:
    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    async def infer(self, model, input_name, batch, output_name, *, version=0, timeout_s=None) -> InferResult:
        self.batches.append(batch.copy())
        scores = np.random.default_rng(len(batch)).random((len(batch), 10), dtype=np.float32)
        return InferResult(scores, backend="fake:1")


def test_decoding_into_a_row_equals_decoding_alone() -> None:
    data = jpeg(90, 120, 1)
    alone = decode_for_model(data, SPEC, what="t", max_pixels=10**7)
    row = np.zeros((2, SPEC.height_px, SPEC.width_px, 3), np.uint8)
    written = decode_for_model(data, SPEC, what="t", max_pixels=10**7, out=row[1])
    assert np.shares_memory(written, row)
    np.testing.assert_array_equal(row[1], alone)
    assert not row[0].any()


@pytest.mark.parametrize("decode_jobs", [1, 2, 5])
async def test_the_batch_holds_the_good_images_in_item_order(decode_jobs: int) -> None:
    photos = {f"{u}.jpg": jpeg(60 + 10 * i, 80, i) for i, u in enumerate(UUIDS) if i != 1}
    backend = RecordingBackend()
    models = {"m": ServedModel("m", ModelSettings(input=SPEC), [])}
    with ThreadPoolExecutor(3) as executor:
        processor = BatchProcessor(
            models, Store(photos), backend, executor,
            max_object_bytes=1 << 20, max_image_pixels=10**7, decode_jobs=decode_jobs,
        )
        outcome = await processor.process("m", [ItemRequest(u, top_k=3) for u in UUIDS])
    assert [o.error is None for o in outcome.items] == [True, False, True, True]
    expected = to_batch_tensor(
        [decode_for_model(photos[f"{u}.jpg"], SPEC, what="t", max_pixels=10**7) for i, u in enumerate(UUIDS) if i != 1],
        SPEC,
    )
    [sent] = backend.batches
    np.testing.assert_array_equal(sent, expected)


async def test_the_decode_threads_count_their_cpu_time_per_model() -> None:
    def spent() -> float:
        return REGISTRY.get_sample_value("flotilla_preprocess_decode_cpu_seconds_total", {"model": "cpu-counted"}) or 0.0

    photos = {f"{u}.jpg": jpeg(1200, 1600, i) for i, u in enumerate(UUIDS)}
    models = {"cpu-counted": ServedModel("cpu-counted", ModelSettings(input=SPEC), [])}
    before = spent()
    with ThreadPoolExecutor(2) as executor:
        processor = BatchProcessor(
            models, Store(photos), RecordingBackend(), executor, max_object_bytes=1 << 24, max_image_pixels=10**7
        )
        cpu_started_s = time.process_time()
        await processor.process("cpu-counted", [ItemRequest(u) for u in UUIDS])
        whole_s = time.process_time() - cpu_started_s
    decode_s = spent() - before
    assert 0 < decode_s <= whole_s  # four 2 MP decodes: milliseconds each, and part of this process's CPU


@pytest.mark.parametrize("ks", [[5, 5, 5], [1, 3, 10], [12, 2, 1]])
def test_top_k_rows_equals_top_k_per_row(ks: list[int]) -> None:
    scores = np.random.default_rng(3).random((3, 10), dtype=np.float32)
    assert top_k_rows(scores, ks) == [top_k(row, k) for row, k in zip(scores, ks, strict=True)]
