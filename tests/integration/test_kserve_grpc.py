"""KServe v2 over gRPC on the router, driven by Triton's own clients (tritonclient.grpc and
tritonclient.grpc.aio), unchanged but for the ``authorization`` header, against the real stack: the
same top-1 as the Flotilla API on the sample photos, the stream, the descriptions, and each error
with the protocol's status."""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US, MODEL, PHOTOS, Photo
from tests.waiting import until_sync

HEADERS = {"authorization": f"Bearer {API_KEY}"}
STREAM_WAIT_S = 60.0  # an answer's bound on a stream; a lost answer fails the test instead of hanging it


@pytest.fixture
def triton(stack: LocalStack) -> Iterator[triton_grpc.InferenceServerClient]:
    assert stack.state is not None
    client = triton_grpc.InferenceServerClient(stack.state.router)
    yield client
    client.close()


def uuid_input(uuids: list[str], shape: list[int] | None = None) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("IMAGE_UUID", shape or [len(uuids)], "BYTES")
    tensor.set_data_from_numpy(np.array([u.encode() for u in uuids], dtype=np.object_).reshape(shape or [len(uuids)]))
    return tensor


def missing_uuid() -> str:
    """A well-formed uuid no image was uploaded under."""
    return str(uuid.uuid4())


def assert_top1(result: Any, photos: list[Photo]) -> None:
    probabilities = result.as_numpy("PROBABILITIES")
    labels = result.as_numpy("LABELS")
    assert probabilities.dtype == np.float32 and probabilities.shape[0] == len(photos), probabilities.shape
    assert probabilities.shape[1] >= 1000  # every class of the ImageNet model
    assert labels.shape[0] == len(photos)
    for row, photo in enumerate(photos):
        assert int(np.argmax(probabilities[row])) == photo.index, photo.name
        assert labels[row][0].decode() == photo.label, photo.name
        assert abs(float(probabilities[row].sum()) - 1.0) < 1e-3


def status_of(info: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(info.value.status())


# --- tritonclient.grpc ----------------------------------------------------------------------------------


def test_infer_one_image_gives_the_flotilla_top1(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    photo = photos["chelsea.jpg"]
    result = triton.infer(MODEL, [uuid_input([photo.uuid])], request_id="one", headers=HEADERS)
    assert_top1(result, [photo])
    response = result.get_response()
    assert response.id == "one" and response.model_name == MODEL
    assert result.as_numpy("LABELS").shape == (1, 5)  # the default top_k


def test_infer_four_images_n_by_1_with_top_k_and_a_classification_output(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    four = [photos[name] for name in PHOTOS[:4]]
    outputs = [
        triton_grpc.InferRequestedOutput("PROBABILITIES"),
        triton_grpc.InferRequestedOutput("LABELS"),
    ]
    result = triton.infer(
        MODEL, [uuid_input([p.uuid for p in four], [4, 1])], outputs=outputs, parameters={"top_k": 2},
        headers=HEADERS,
    )
    assert_top1(result, four)
    assert result.as_numpy("LABELS").shape == (4, 2)
    classified = triton.infer(
        MODEL, [uuid_input([p.uuid for p in four])],
        outputs=[triton_grpc.InferRequestedOutput("PROBABILITIES", class_count=3)], headers=HEADERS,
    )
    classes = classified.as_numpy("PROBABILITIES")
    assert classes.shape == (4, 3)
    for row, photo in enumerate(four):
        score, index, label = classes[row][0].decode().split(":", 2)
        assert (int(index), label) == (photo.index, photo.label)
        assert 0.0 < float(score) <= 1.0


def test_stream_answers_each_request_by_id_and_a_bad_one_does_not_end_it(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    answers: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
    triton.start_stream(callback=lambda result, error: answers.put((result, error)), headers=HEADERS)
    sent = {"0": photos["astronaut.jpg"], "2": photos["coffee.jpg"], "3": photos["rocket.jpg"]}
    bad = missing_uuid()
    for request_id, image in (("0", sent["0"].uuid), ("1", bad), ("2", sent["2"].uuid), ("3", sent["3"].uuid)):
        triton.async_stream_infer(MODEL, [uuid_input([image])], request_id=request_id)
    results, errors = {}, []
    for _ in range(4):
        result, error = answers.get(timeout=STREAM_WAIT_S)
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result
    assert len(errors) == 1, [e.message() for e in errors]
    assert errors[0].message().startswith("[request id: 1] ") and bad in errors[0].message()
    assert sorted(results) == ["0", "2", "3"]
    for request_id, photo in sent.items():
        assert_top1(results[request_id], [photo])
    # The stream goes on after the error.
    triton.async_stream_infer(MODEL, [uuid_input([photos["chelsea.jpg"].uuid])], request_id="4")
    result, error = answers.get(timeout=STREAM_WAIT_S)
    assert error is None and result.get_response().id == "4"
    assert_top1(result, [photos["chelsea.jpg"]])
    triton.stop_stream()


def test_stream_with_a_bad_key_is_unauthenticated(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    answers: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
    triton.start_stream(
        callback=lambda result, error: answers.put((result, error)), headers={"authorization": "Bearer wrong"}
    )
    # The router ends the stream as it opens; the client may already know when it sends (it then raises).
    with contextlib.suppress(InferenceServerException):
        triton.async_stream_infer(MODEL, [uuid_input([photos["chelsea.jpg"].uuid])], request_id="0")
    result, error = answers.get(timeout=STREAM_WAIT_S)
    assert result is None and error is not None
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    triton.stop_stream()


def test_server_and_model_descriptions(triton: triton_grpc.InferenceServerClient) -> None:
    assert triton.is_server_live()  # probes need no key
    assert triton.is_server_ready()
    assert triton.get_server_metadata(headers=HEADERS).name == "flotilla"
    assert triton.is_model_ready(MODEL, headers=HEADERS)
    assert not triton.is_model_ready("no-such-model", headers=HEADERS)
    metadata = triton.get_model_metadata(MODEL, headers=HEADERS)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("IMAGE_UUID", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("PROBABILITIES", "FP32"), ("LABELS", "BYTES")]
    assert metadata.outputs[0].shape[1] >= 1000
    config = triton.get_model_config(MODEL, headers=HEADERS).config
    assert config.name == MODEL and config.max_batch_size == MAX_BATCH_SIZE
    assert config.dynamic_batching.max_queue_delay_microseconds == MAX_QUEUE_DELAY_US
    assert config.input[0].name == "IMAGE_UUID"
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata(MODEL, headers={"authorization": "Bearer wrong"})
    assert status_of(info) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_config("no-such-model", headers=HEADERS)
    assert status_of(info) == "StatusCode.NOT_FOUND"


def test_repository_index_load_and_the_methods_not_served(triton: triton_grpc.InferenceServerClient) -> None:
    index = triton.get_model_repository_index(headers=HEADERS)
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "1", "READY")]
    assert [m["name"] for m in triton.get_model_repository_index(headers=HEADERS, as_json=True)["models"]] == [MODEL]
    triton.load_model(MODEL, headers=HEADERS)  # the controller's EnsureLoaded: a copy is ready, so at once
    assert triton.is_model_ready(MODEL, headers=HEADERS)
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("no-such-model", headers=HEADERS)
    assert status_of(info) == "StatusCode.NOT_FOUND" and "'no-such-model'" in str(info.value.message())
    with pytest.raises(InferenceServerException) as info:
        triton.load_model(MODEL, config="{}", headers=HEADERS)
    assert status_of(info) == "StatusCode.UNIMPLEMENTED" and "flotilla models deploy" in str(info.value.message())
    refused = {
        "unload_model": (lambda: triton.unload_model(MODEL, headers=HEADERS), "flotilla models undeploy"),
        "get_system_shared_memory_status": (lambda: triton.get_system_shared_memory_status(headers=HEADERS), "uuids"),
        "get_trace_settings": (lambda: triton.get_trace_settings(headers=HEADERS), "observability.tracing"),
        "get_log_settings": (lambda: triton.get_log_settings(headers=HEADERS), "flotilla -v serve"),
    }
    for name, (call, words) in refused.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert status_of(info) == "StatusCode.UNIMPLEMENTED", name
        assert words in str(info.value.message()) and "Method not found" not in str(info.value.message()), name


def test_inference_statistics_count_what_the_fleets_batchers_answered(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    def stats() -> Any:
        [entry] = triton.get_inference_statistics(MODEL, headers=HEADERS).model_stats
        return entry

    before = stats()
    four = [photos[name] for name in PHOTOS[:4]]
    triton.infer(MODEL, [uuid_input([p.uuid for p in four])], headers=HEADERS)  # 4 images
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, [uuid_input([missing_uuid()])], headers=HEADERS)  # 1 image answered an error
    # The batchers' heartbeats carry their counters to the controller within about a second.
    until_sync(lambda: stats().inference_count >= before.inference_count + 4
               and stats().inference_stats.fail.count >= before.inference_stats.fail.count + 1,
               STREAM_WAIT_S, "the statistics to count the requests")
    after = stats()
    assert after.name == MODEL and after.version == ""
    assert after.execution_count > before.execution_count  # batches
    assert abs(after.last_inference / 1000 - time.time()) < 120  # unix ms of the latest request
    grown = {field: getattr(after.inference_stats, field) for field in ("success", "queue", "compute_infer")}
    for field, duration in grown.items():
        assert duration.count >= getattr(before.inference_stats, field).count + 4, field
        assert duration.ns > getattr(before.inference_stats, field).ns, field
    # Each success's time from arrival to answer holds its queue wait and its batch's time.
    assert after.inference_stats.success.ns >= after.inference_stats.compute_infer.ns
    # batch_stats: every batch that ran, by its size; they hold every image that succeeded, and each
    # batch's time once (at most the sum of its images' batch times).
    sizes = {b.batch_size: b for b in after.batch_stats}
    assert sizes and all(b.compute_infer.count > 0 and b.compute_infer.ns > 0 for b in sizes.values())
    assert sum(size * b.compute_infer.count for size, b in sizes.items()) >= after.inference_count
    assert sum(b.compute_infer.count for b in sizes.values()) <= after.execution_count
    assert sum(b.compute_infer.ns for b in sizes.values()) <= after.inference_stats.compute_infer.ns
    every = triton.get_inference_statistics(headers=HEADERS, as_json=True)["model_stats"]
    assert [m["name"] for m in every] == [MODEL]
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("no-such-model", headers=HEADERS)
    assert status_of(info) == "StatusCode.NOT_FOUND"


# --- errors ---------------------------------------------------------------------------------------------


def test_an_image_not_uploaded_fails_the_whole_request_invalid_argument_naming_it(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    bad = missing_uuid()
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [uuid_input([photos["chelsea.jpg"].uuid, bad])], headers=HEADERS)
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert f"IMAGE_UUID[1] {bad}" in info.value.message()


def test_a_malformed_uuid_is_invalid_argument_naming_it(triton: triton_grpc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [uuid_input(["../etc/passwd"])], headers=HEADERS)
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert "'../etc/passwd'" in info.value.message()


def test_an_unknown_model_is_not_found(triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer("no-such-model", [uuid_input([photos["chelsea.jpg"].uuid])], headers=HEADERS)
    assert status_of(info) == "StatusCode.NOT_FOUND"
    assert "no-such-model" in info.value.message()


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}])
def test_a_missing_or_bad_key_is_unauthenticated(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo], headers: dict[str, str]
) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [uuid_input([photos["chelsea.jpg"].uuid])], headers=headers)
    assert status_of(info) == "StatusCode.UNAUTHENTICATED"


def test_a_wrong_input_name_or_datatype_is_invalid_argument(
    triton: triton_grpc.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    image = photos["chelsea.jpg"].uuid
    misnamed = triton_grpc.InferInput("images", [1], "BYTES")
    misnamed.set_data_from_numpy(np.array([image.encode()], dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [misnamed], headers=HEADERS)
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert "'images'" in info.value.message()
    pixels = triton_grpc.InferInput("IMAGE_UUID", [1, 4], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 4), dtype=np.uint8))
    with pytest.raises(InferenceServerException) as info:
        triton.infer(MODEL, [pixels], headers=HEADERS)
    assert status_of(info) == "StatusCode.INVALID_ARGUMENT"
    assert "'UINT8'" in info.value.message()


def test_a_body_that_is_not_a_request_is_invalid_argument(stack: LocalStack) -> None:
    assert stack.state is not None
    with grpc.insecure_channel(stack.state.router) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\x0a\x03abc\xff\xff\xff", metadata=tuple(HEADERS.items()))  # a name cut short, then junk
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


# --- tritonclient.grpc.aio ------------------------------------------------------------------------------


@pytest.fixture
async def triton_async(stack: LocalStack) -> AsyncIterator[triton_aio.InferenceServerClient]:
    assert stack.state is not None
    client = triton_aio.InferenceServerClient(stack.state.router)
    yield client
    await client.close()


async def test_aio_infer_and_stream_infer(
    triton_async: triton_aio.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    two = [photos["coffee.jpg"], photos["motorcycle_left.jpg"]]
    result = await triton_async.infer(MODEL, [uuid_input([p.uuid for p in two])], headers=HEADERS)
    assert_top1(result, two)
    assert await triton_async.is_model_ready(MODEL, headers=HEADERS)

    bad = missing_uuid()
    images = {"a": photos["astronaut.jpg"].uuid, "b": bad, "c": photos["rocket.jpg"].uuid}

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for request_id, image in images.items():
            yield {"model_name": MODEL, "inputs": [uuid_input([image])], "request_id": request_id}

    results, errors = {}, []
    async for result, error in triton_async.stream_infer(requests(), headers=HEADERS):
        if error is not None:
            errors.append(error.message())
        else:
            results[result.get_response().id] = result
    assert sorted(results) == ["a", "c"]
    assert_top1(results["a"], [photos["astronaut.jpg"]])
    assert_top1(results["c"], [photos["rocket.jpg"]])
    assert len(errors) == 1 and errors[0].startswith("[request id: b] ") and bad in errors[0]
