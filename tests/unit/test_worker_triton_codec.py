"""The preprocess worker's Triton wire format: raw-tensor requests and responses, and error mapping.

The requests are checked by parsing them back with tritonclient's generated
messages (what Triton parses); one batch also goes through a real grpc.aio
server standing in for Triton, so the channel, method path and metadata are
exercised without a Triton.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from flotilla.config import BackendSettings, PoolSettings
from flotilla.errors import BackendError, BackendUnavailable, Code, DeadlineExceeded, ReplicaInTransition
from flotilla.services.preprocess.triton.backend import TritonBackend, translate_triton_error
from flotilla.services.preprocess.triton.grpc_replica import decode_infer_response, encode_infer_request


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((8, 224, 224, 3), np.uint8), ((2, 3, 32, 48), np.float32), ((1, 5), np.uint8), ((3, 50), np.int64)],
)
def test_a_request_parses_back_to_the_tensor(shape: tuple[int, ...], dtype: type) -> None:
    batch = np.random.default_rng(0).integers(0, 255, size=shape).astype(dtype)
    request = service_pb2.ModelInferRequest.FromString(encode_infer_request("m", "3", "images", batch, "probs"))
    assert request.model_name == "m" and request.model_version == "3"
    [tensor] = request.inputs
    assert (tensor.name, list(tensor.shape)) == ("images", list(shape))
    assert tensor.datatype == {np.uint8: "UINT8", np.float32: "FP32", np.int64: "INT64"}[dtype]
    assert [o.name for o in request.outputs] == ["probs"]
    [raw] = request.raw_input_contents
    np.testing.assert_array_equal(np.frombuffer(raw, dtype=dtype).reshape(shape), batch)


def test_a_non_contiguous_batch_is_sent_in_logical_order() -> None:
    batch = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3).transpose(0, 3, 1, 2)
    request = service_pb2.ModelInferRequest.FromString(encode_infer_request("m", "", "x", batch, "y"))
    assert request.raw_input_contents[0] == np.ascontiguousarray(batch).tobytes()


def test_the_named_output_is_read_from_its_raw_contents() -> None:
    probs = np.random.default_rng(1).random((4, 10), dtype=np.float32)
    response = service_pb2.ModelInferResponse(
        outputs=[
            service_pb2.ModelInferResponse.InferOutputTensor(name="other", datatype="INT32", shape=[4]),
            service_pb2.ModelInferResponse.InferOutputTensor(name="probs", datatype="FP32", shape=[4, 10]),
        ],
        raw_output_contents=[np.zeros(4, np.int32).tobytes(), probs.tobytes()],
    )
    np.testing.assert_array_equal(decode_infer_response(response, "probs"), probs)
    assert decode_infer_response(response, "missing") is None


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (Code.UNAVAILABLE, "connection refused", BackendUnavailable),
        (Code.INTERNAL, "Socket closed", BackendUnavailable),
        (Code.DEADLINE_EXCEEDED, "Deadline Exceeded", DeadlineExceeded),
        (Code.NOT_FOUND, "Request for unknown model", ReplicaInTransition),
        (Code.INVALID_ARGUMENT, "unexpected shape", BackendError),
    ],
)
def test_status_codes_become_flotilla_errors(code: Code, details: str, expected: type) -> None:
    error = translate_triton_error(code, details, "10.0.0.1:8001", "m")
    assert type(error) is expected
    assert "10.0.0.1:8001" in error.message


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer only: answers each row's sum as its one score, or a given status."""

    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.fail is not None:
            await context.abort(*self.fail)
        [tensor] = request.inputs
        batch = np.frombuffer(request.raw_input_contents[0], dtype=np.uint8).reshape(tuple(tensor.shape))
        scores = batch.reshape(len(batch), -1).sum(axis=1, dtype=np.float32)[:, None]
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="probs", datatype="FP32", shape=[len(batch), 1])],
            raw_output_contents=[scores.tobytes()],
        )


async def start_fake() -> tuple[grpc.aio.Server, FakeTriton, str]:
    server = grpc.aio.server()
    servicer = FakeTriton()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
async def fake_tritons() -> AsyncIterator[list[tuple[FakeTriton, str]]]:
    started = [await start_fake() for _ in range(2)]
    try:
        yield [(servicer, address) for _, servicer, address in started]
    finally:
        for server, _, _ in started:
            await server.stop(None)


async def test_a_batch_runs_over_grpc_on_the_raw_path(fake_tritons: list[tuple[FakeTriton, str]]) -> None:
    [(servicer, address), _] = fake_tritons
    backend = TritonBackend(PoolSettings())
    backend.set_copies("m", [address], BackendSettings())
    try:
        batch = np.random.default_rng(2).integers(0, 255, size=(3, 16, 16, 3), dtype=np.uint8)
        result = await backend.infer("m", "images", batch, "probs", version=2, timeout_s=5.0)
    finally:
        await backend.close()
    assert result.backend == address
    np.testing.assert_allclose(result.outputs[:, 0], batch.reshape(3, -1).sum(axis=1))
    [request] = servicer.requests
    assert (request.model_name, request.model_version) == ("m", "2")


async def test_a_replica_without_the_model_is_retried_on_another(fake_tritons: list[tuple[FakeTriton, str]]) -> None:
    [(gone, gone_address), (serving, serving_address)] = fake_tritons
    gone.fail = (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm' is not found")
    backend = TritonBackend(PoolSettings())
    backend.set_copies("m", [gone_address, serving_address], BackendSettings())
    try:
        for _ in range(4):  # whichever replica the strategy picks first, the batch is answered
            result = await backend.infer("m", "images", np.ones((1, 2, 2, 3), np.uint8), "probs", timeout_s=5.0)
            assert result.backend == serving_address
            np.testing.assert_array_equal(result.outputs, [[12.0]])
    finally:
        await backend.close()
    assert serving.requests


async def test_a_failing_replica_raises_the_translated_error(fake_tritons: list[tuple[FakeTriton, str]]) -> None:
    [(servicer, address), _] = fake_tritons
    servicer.fail = (grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'images'")
    backend = TritonBackend(PoolSettings())
    backend.set_copies("m", [address], BackendSettings())
    try:
        with pytest.raises(BackendError, match="unexpected shape for input 'images'"):
            await backend.infer("m", "images", np.ones((1, 2, 2, 3), np.uint8), "probs", timeout_s=5.0)
    finally:
        await backend.close()
