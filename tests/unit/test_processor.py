"""BatchProcessor: per-item outcomes around one backend call, with fake store and backend."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from flotilla.config import InputSpec, ModelSettings
from flotilla.errors import (
    BackendUnavailable,
    Code,
    FlotillaError,
    ImageNotFound,
    InvalidArgument,
    InvalidImage,
    InvalidImageUuid,
    ModelNotFound,
)
from flotilla.services.preprocess.backend import InferResult
from flotilla.services.preprocess.processor import (
    DEFAULT_TOP_K,
    BatchProcessor,
    ItemRequest,
    ServedModel,
)

GOOD = "123e4567-e89b-42d3-a456-426614174000"
GOOD_2 = "00000000-0000-4000-8000-000000000002"
MISSING = "00000000-0000-4000-8000-00000000dead"
NOT_JPEG = "00000000-0000-4000-8000-0000000000aa"

N_CLASSES = 8
# Scores per class; the best classes are 3, 1, 4, 0, 2, ... in that order.
SCORES = np.array([0.12, 0.2, 0.05, 0.3, 0.15, 0.08, 0.06, 0.04], dtype=np.float32)
LABELS = [f"class-{i}" for i in range(N_CLASSES)]


def jpeg(height: int, width: int) -> bytes:
    rng = np.random.default_rng(height * width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeStore:
    """An ImageSource over a dict of key -> bytes (or an exception to raise)."""

    def __init__(self, objects: dict[str, bytes | BaseException]) -> None:
        self.objects = objects
        self.requested: list[str] = []

    async def get(self, key: str, max_bytes: int) -> bytes:
        self.requested.append(key)
        if key not in self.objects:
            raise ImageNotFound(f"no object {key!r}")
        value = self.objects[key]
        if isinstance(value, BaseException):
            raise value
        return value


class FakeBackend:
    """An InferenceBackend answering SCORES for every row and recording what it got."""

    def __init__(self, error: FlotillaError | None = None) -> None:
        self.error = error
        self.calls: list[dict] = []

    async def infer(self, model, input_name, batch, output_name, *, version=0, timeout_s=None) -> InferResult:
        self.calls.append(
            {
                "model": model,
                "version": version,
                "input_name": input_name,
                "shape": batch.shape,
                "dtype": batch.dtype,
                "output_name": output_name,
                "timeout_s": timeout_s,
            }
        )
        if self.error is not None:
            raise self.error
        return InferResult(np.tile(SCORES, (batch.shape[0], 1)), backend="fake:1")


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def served(labels: list[str] = LABELS, **settings) -> dict[str, ServedModel]:
    model_settings = ModelSettings(input=InputSpec(height_px=32, width_px=48), **settings)
    return {"tiny": ServedModel("tiny", model_settings, labels)}


def make_processor(executor, store: FakeStore, backend: FakeBackend, models=None) -> BatchProcessor:
    return BatchProcessor(
        models or served(), store, backend, executor, max_object_bytes=1 << 20, max_image_pixels=10_000_000
    )


async def test_mixed_batch_gives_per_item_outcomes_in_order(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(60, 80), f"{NOT_JPEG}.jpg": png()})
    backend = FakeBackend()
    processor = make_processor(executor, store, backend)
    items = [
        ItemRequest(GOOD, top_k=2),
        ItemRequest(MISSING),
        ItemRequest(NOT_JPEG),
        ItemRequest("../../etc/passwd"),
    ]

    outcome = await processor.process("tiny", items)

    good, missing, not_jpeg, bad_uuid = outcome.items
    assert good.error is None
    assert [(c.index, c.label) for c in good.classes] == [(3, "class-3"), (1, "class-1")]
    assert good.classes[0].score == pytest.approx(0.3)
    assert missing.classes is None and isinstance(missing.error, ImageNotFound)
    assert missing.error.code == Code.NOT_FOUND
    assert not_jpeg.classes is None and isinstance(not_jpeg.error, InvalidImage)
    assert NOT_JPEG in not_jpeg.error.message
    assert bad_uuid.classes is None and isinstance(bad_uuid.error, InvalidImageUuid)
    assert bad_uuid.error.code == Code.INVALID_ARGUMENT
    assert outcome.backend == "fake:1"

    [call] = backend.calls
    assert call["shape"] == (1, 32, 48, 3)
    assert call["dtype"] == np.uint8


async def test_an_invalid_uuid_never_reaches_the_store(executor) -> None:
    store = FakeStore({})
    processor = make_processor(executor, store, FakeBackend())

    outcome = await processor.process("tiny", [ItemRequest("a/b"), ItemRequest("../x")])

    assert all(isinstance(o.error, InvalidImageUuid) for o in outcome.items)
    assert store.requested == []


async def test_good_images_of_any_size_are_stacked_in_item_order(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(60, 80), f"{GOOD_2}.jpg": jpeg(300, 200)})
    backend = FakeBackend()
    processor = make_processor(executor, store, backend)

    outcome = await processor.process("tiny", [ItemRequest(GOOD, 1), ItemRequest(MISSING), ItemRequest(GOOD_2, 3)])

    assert backend.calls[0]["shape"] == (2, 32, 48, 3)
    assert [c.index for c in outcome.items[0].classes] == [3]
    assert isinstance(outcome.items[1].error, ImageNotFound)
    assert [c.index for c in outcome.items[2].classes] == [3, 1, 4]


async def test_top_k_zero_means_the_default(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    processor = make_processor(executor, store, FakeBackend())

    outcome = await processor.process("tiny", [ItemRequest(GOOD, top_k=0)])

    assert len(outcome.items[0].classes) == DEFAULT_TOP_K


async def test_top_k_beyond_the_class_count_gives_every_class(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    processor = make_processor(executor, store, FakeBackend())

    outcome = await processor.process("tiny", [ItemRequest(GOOD, top_k=100)])

    assert [c.index for c in outcome.items[0].classes] == list(np.argsort(-SCORES, kind="stable"))


async def test_all_scores_gives_every_class_probability_to_the_items_that_ask(executor) -> None:
    """What a KServe v2 answer's FP32 [N, classes] tensor is made of; the other items carry none."""
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40), f"{GOOD_2}.jpg": jpeg(50, 30)})
    processor = make_processor(executor, store, FakeBackend())

    outcome = await processor.process("tiny", [ItemRequest(GOOD, 2, all_scores=True), ItemRequest(GOOD_2, 2)])

    asked, plain = outcome.items
    assert asked.scores is not None and asked.scores.dtype == np.float32
    np.testing.assert_allclose(asked.scores, SCORES, rtol=1e-6)
    assert [c.index for c in asked.classes] == [3, 1]
    assert plain.scores is None


async def test_classes_without_a_label_are_named_by_index(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    processor = make_processor(executor, store, FakeBackend(), models=served(labels=["zero", "one", "two"]))

    outcome = await processor.process("tiny", [ItemRequest(GOOD, top_k=3)])

    assert [c.label for c in outcome.items[0].classes] == ["3", "one", "4"]


async def test_backend_gets_the_backend_model_name_tensor_names_and_timeout(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    backend = FakeBackend()
    models = served(backend_model="tiny_onnx", output_name="probs")
    processor = make_processor(executor, store, backend, models=models)

    await processor.process("tiny", [ItemRequest(GOOD)], timeout_s=1.5)

    [call] = backend.calls
    assert (call["model"], call["input_name"], call["output_name"], call["timeout_s"]) == (
        "tiny_onnx",
        "images",
        "probs",
        1.5,
    )


async def test_batch_of_only_bad_images_skips_the_backend(executor) -> None:
    backend = FakeBackend()
    processor = make_processor(executor, FakeStore({}), backend)

    outcome = await processor.process("tiny", [ItemRequest(MISSING), ItemRequest("nope")])

    assert backend.calls == []
    assert outcome.backend == ""
    assert [type(o.error) for o in outcome.items] == [ImageNotFound, InvalidImageUuid]


async def test_unexpected_store_failure_fails_only_that_item_as_internal(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40), f"{GOOD_2}.jpg": RuntimeError("disk on fire")})
    processor = make_processor(executor, store, FakeBackend())

    outcome = await processor.process("tiny", [ItemRequest(GOOD), ItemRequest(GOOD_2)])

    assert outcome.items[0].classes is not None
    error = outcome.items[1].error
    assert error is not None and error.code == Code.INTERNAL
    assert "disk on fire" not in error.message


async def test_unknown_model_raises_model_not_found_listing_served_models(executor) -> None:
    processor = make_processor(executor, FakeStore({}), FakeBackend())

    with pytest.raises(ModelNotFound, match="tiny") as info:
        await processor.process("resnet", [ItemRequest(GOOD)])
    assert "resnet" in info.value.message


async def test_backend_unavailable_fails_the_whole_batch(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    processor = make_processor(executor, store, FakeBackend(error=BackendUnavailable("triton is down")))

    with pytest.raises(BackendUnavailable, match="triton is down"):
        await processor.process("tiny", [ItemRequest(GOOD), ItemRequest(MISSING)])


def test_served_model_takes_labels_from_the_spec_else_its_labels_file(tmp_path) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\ndog\n", encoding="utf-8")

    from_file = ServedModel.from_spec("tiny", ModelSettings(backend_model="tiny_onnx", labels_file=labels_file))
    from_spec = ServedModel.from_spec("tiny", ModelSettings(labels=["sfw", "nsfw"], labels_file=labels_file))

    assert from_file.labels == ["cat", "dog"]
    assert from_file.backend_model == "tiny_onnx"
    assert (from_file.label(1), from_file.label(2)) == ("dog", "2")
    assert from_spec.labels == ["sfw", "nsfw"]


def test_served_model_without_labels_uses_indices() -> None:
    model = ServedModel.from_spec("tiny", ModelSettings())
    assert model.labels == []
    assert model.backend_model == "tiny"
    assert model.label(7) == "7"


async def test_the_default_version_runs_unless_a_live_version_is_named(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    backend = FakeBackend()
    processor = make_processor(executor, store, backend, models=served(versions=[1, 2, 3], default_version=2))

    await processor.process("tiny", [ItemRequest(GOOD)])
    await processor.process("tiny", [ItemRequest(GOOD)], version=3)
    with pytest.raises(InvalidArgument, match=r"no version 9; live versions: \[1, 2, 3\]"):
        await processor.process("tiny", [ItemRequest(GOOD)], version=9)

    assert [c["version"] for c in backend.calls] == [2, 3]


async def test_logits_are_turned_into_probabilities_before_top_k(executor) -> None:
    store = FakeStore({f"{GOOD}.jpg": jpeg(40, 40)})
    processor = make_processor(executor, store, FakeBackend(), models=served(output_kind="logits"))

    outcome = await processor.process("tiny", [ItemRequest(GOOD)], version=0)

    classes = outcome.items[0].classes
    expected = np.exp(SCORES) / np.exp(SCORES).sum()
    assert [c.index for c in classes] == [3, 1, 4, 0, 5]
    assert classes[0].score == pytest.approx(float(expected[3]), rel=1e-5)
