"""The worker's KServe v2 HTTP codec and replica (services.preprocess.triton.http_replica): requests as
Triton reads them, answers split into the named output, error answers and transport failures as
the gRPC status codes the rest of the backend acts on. Against real Triton: the integration tests."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest

from flotilla.config import BackendSettings, PoolSettings
from flotilla.errors import Code, ReplicaInTransition
from flotilla.services.preprocess.http_client import HttpAnswer, HttpProtocolError
from flotilla.services.preprocess.triton.backend import TritonBackend, translate_triton_error
from flotilla.services.preprocess.triton.http_replica import (
    HttpReplica,
    code_of,
    decode_answer,
    encode_inline_header,
    encode_shm_request,
    error_of,
    infer_target,
)
from flotilla.services.preprocess.triton.replica import InferCall, ReplicaCallError, lost_region


def a_call(batch: np.ndarray | None = None) -> InferCall:
    batch = np.zeros((2, 4, 4, 3), np.uint8) if batch is None else batch
    return InferCall("m", "", "images", batch, "probabilities")


def answer(outputs: list[tuple[str, np.ndarray]], *, declared: bool = True) -> HttpAnswer:
    header = json.dumps({"model_name": "m", "outputs": [
        {"name": name, "datatype": "FP32", "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
        for name, a in outputs
    ]}).encode()
    head = b"HTTP/1.1 200 OK\r\n"
    if declared:
        head += b"Inference-Header-Content-Length: %d\r\n" % len(header)
    return HttpAnswer(200, bytearray(header + b"".join(a.tobytes() for _, a in outputs)), head=head + b"\r\n")


def test_the_infer_target_names_the_model_and_version_escaped() -> None:
    assert infer_target("efficientnet-lite0", "") == "/v2/models/efficientnet-lite0/infer"
    assert infer_target("a b/c", "2") == "/v2/models/a%20b%2Fc/versions/2/infer"


def test_a_request_names_the_region_or_declares_the_bytes_that_follow() -> None:
    call = a_call()
    shm = json.loads(encode_shm_request(call, "flotilla-worker-7-0"))
    assert shm["inputs"] == [{"name": "images", "shape": [2, 4, 4, 3], "datatype": "UINT8", "parameters": {
        "shared_memory_region": "flotilla-worker-7-0", "shared_memory_byte_size": 96}}]
    assert shm["outputs"] == [{"name": "probabilities", "parameters": {"binary_data": True}}]
    inline = json.loads(encode_inline_header(call))
    assert inline["inputs"][0]["parameters"] == {"binary_data_size": 96}


def test_the_named_output_is_read_past_the_ones_before_it() -> None:
    first, wanted = np.arange(6, dtype=np.float32).reshape(2, 3), np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)
    got = decode_answer(answer([("logits", first), ("probabilities", wanted)]), "probabilities")
    assert got is not None
    np.testing.assert_array_equal(got, wanted)
    assert decode_answer(answer([("logits", first)]), "probabilities") is None


def test_an_answer_without_binary_outputs_is_read_from_its_json() -> None:
    body = json.dumps({"outputs": [{"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]})
    got = decode_answer(HttpAnswer(200, bytearray(body.encode()), head=b"HTTP/1.1 200 OK\r\n\r\n"), "p")
    assert got is not None and got.tolist() == [[0.25, 0.75]]


def test_an_answer_shorter_than_its_header_says_is_a_protocol_error() -> None:
    whole = answer([("p", np.ones((2, 4), np.float32))])
    with pytest.raises(HttpProtocolError, match="runs past the end"):
        decode_answer(whole._replace(body=whole.body[:-4]), "p")
    with pytest.raises(HttpProtocolError, match="inference header"):
        decode_answer(whole._replace(head=b"HTTP/1.1 200 OK\r\nInference-Header-Content-Length: 99999\r\n\r\n"), "p")
    for body in (b"not json", b"[1, 2]", b'{"outputs": [{"name": "p"}]}'):
        with pytest.raises(HttpProtocolError, match="does not parse"):
            decode_answer(HttpAnswer(200, bytearray(body), head=b"HTTP/1.1 200 OK\r\n\r\n"), "p")


@pytest.mark.parametrize(
    ("status", "body", "code", "details"),
    [
        (404, b'{"error":"Request for unknown model: \'m\' is not found"}', Code.NOT_FOUND,
         "Request for unknown model: 'm' is not found"),
        (400, b'{"error":"unexpected shape for input"}', Code.INVALID_ARGUMENT, "unexpected shape for input"),
        (503, b"", Code.UNAVAILABLE, "HTTP 503"),
        (500, b"not json", Code.INTERNAL, "not json"),
        (507, b"{}", Code.INTERNAL, "{}"),
        (418, b'{"error":"teapot"}', Code.UNKNOWN, "teapot"),
    ],
)
def test_an_error_answer_becomes_its_grpc_status(status: int, body: bytes, code: Code, details: str) -> None:
    error = error_of(HttpAnswer(status, bytearray(body)))
    assert (error.code, error.details) == (code, details)
    assert code_of(status) == code


def test_triton_http_errors_mean_what_the_grpc_ones_do() -> None:
    # Triton's HTTP answers (seen against the real server) for a lost region and an unloaded model.
    lost = error_of(HttpAnswer(404, bytearray(b'{"error":"Unable to find shared memory region: \'r\'"}')))
    assert lost_region(lost.code, lost.details)
    gone = error_of(HttpAnswer(404, bytearray(b'{"error":"Request for unknown model: \'m\' has no available versions"}')))
    assert not lost_region(gone.code, gone.details)
    assert type(translate_triton_error(gone.code, gone.details, "h:8001", "m")) is ReplicaInTransition


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A server that accepts and reads but never answers (a hung replica)."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_replica_that_refuses_is_unavailable_and_one_that_hangs_is_past_the_deadline(silent_port: int) -> None:
    refusing = HttpReplica("127.0.0.1:1", f"127.0.0.1:{closed_port()}")
    hanging = HttpReplica("127.0.0.1:2", f"127.0.0.1:{silent_port}")
    try:
        with pytest.raises(ReplicaCallError) as refused:
            await refusing.infer(a_call(), False, 2.0)
        assert refused.value.code == Code.UNAVAILABLE
        with pytest.raises(ReplicaCallError) as late:
            await hanging.infer(a_call(), False, 0.2)
        assert late.value.code == Code.DEADLINE_EXCEEDED
    finally:
        await refusing.close()
        await hanging.close()


async def test_a_replica_is_called_over_http_once_its_endpoint_is_known_unless_grpc_is_asked_for() -> None:
    settings = BackendSettings()
    http, grpc_only = TritonBackend(PoolSettings()), TritonBackend(PoolSettings(), protocol="grpc")
    try:
        for backend in (http, grpc_only):
            backend.set_copies("m", ["10.0.0.1:8001", "10.0.0.2:8001"], settings)
            backend.set_http_endpoints({"10.0.0.1:8001": "10.0.0.1:8000"})
        assert [e.client.protocol for e in http.pools["m"].endpoints] == ["http", "grpc"]
        assert [e.client.protocol for e in grpc_only.pools["m"].endpoints] == ["grpc", "grpc"]
        http.set_http_endpoints({"10.0.0.2:8001": "10.0.0.2:8000"})  # the first's endpoint is no longer known
        assert [e.client.protocol for e in http.pools["m"].endpoints] == ["grpc", "http"]
        assert http.pools["m"].endpoints[1].client.http_address == "10.0.0.2:8000"  # type: ignore[attr-defined]
    finally:
        await http.close()
        await grpc_only.close()
