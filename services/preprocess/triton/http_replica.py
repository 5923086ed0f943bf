"""Triton replicas over KServe v2 HTTP/1.1, on the worker's own client (``preprocess.http_client``).

Why not gRPC: measured against one real replica on this project's 2-core
machine, a batch of 8 images in shared memory cost 40 client CPU-µs per call
this way against 170-185 with a grpc.aio ModelInfer (150-165 on a
ModelStreamInfer stream), and 105-118 tritonserver CPU-µs against 170-230.

A request is a small JSON header: the input names its shared-memory region,
or its bytes follow the JSON in the same body (Triton's binary tensor
extension, ``Inference-Header-Content-Length``), sent from the array's buffer
without a copy. The output is asked for as binary data and read with
``np.frombuffer`` from the answer's body. An error answer's HTTP status
becomes the gRPC status code Triton's gRPC endpoint would have given (404 ->
NOT_FOUND, ...), a connection that broke or could not be made UNAVAILABLE,
and a call past its deadline DEADLINE_EXCEEDED: ``ReplicaCallError`` either way.

Connections are kept alive and reused; TCP keepalive and a user timeout
(``liveness_s``) break one whose replica vanished without a reset, as the
gRPC channel's pings do, so its batches are retried on another copy within
seconds instead of waiting for their deadlines.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

import numpy as np
from numpy.typing import NDArray
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from flotilla.common import tracing
from flotilla.common.addresses import split_endpoint
from flotilla.common.keepalive import PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S
from flotilla.errors import Code
from flotilla.services.preprocess.http_client import (
    HttpAnswer,
    HttpConnectionPool,
    HttpProtocolError,
    IncompleteBody,
    header_value,
)
from flotilla.services.preprocess.triton.replica import InferCall, ReplicaCallError, SharedMemoryRegistrations
from flotilla.services.preprocess.triton.shm import Region, is_loopback

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 1 << 30
"""The largest inference answer accepted (a classifier's is a few KB per image)."""
DEFAULT_TIMEOUT_S = 60.0
"""A call's timeout when its batch has no deadline."""
_HTTP_TO_CODE = {
    400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
    409: Code.ALREADY_EXISTS, 429: Code.RESOURCE_EXHAUSTED, 499: Code.CANCELLED, 500: Code.INTERNAL,
    501: Code.UNIMPLEMENTED, 502: Code.UNAVAILABLE, 503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED,
}


def code_of(status: int) -> Code:
    """The gRPC status code of a Triton HTTP error answer."""
    return _HTTP_TO_CODE.get(status, Code.INTERNAL if status >= 500 else Code.UNKNOWN)


def infer_target(model: str, version: str) -> str:
    """The infer endpoint's path for ``model`` (``version`` "" : its default)."""
    path = f"/v2/models/{quote(model, safe='')}"
    if version:
        path += f"/versions/{quote(version, safe='')}"
    return path + "/infer"


def _input(batch: NDArray[Any], name: str, parameters: dict[str, object]) -> dict[str, object]:
    return {"name": name, "shape": list(batch.shape), "datatype": np_to_triton_dtype(batch.dtype),
            "parameters": parameters}


def _outputs(name: str) -> list[dict[str, object]]:
    return [{"name": name, "parameters": {"binary_data": True}}]


def encode_shm_request(call: InferCall, region: str) -> bytes:
    """The JSON body of an inference whose input is ``call.batch``'s bytes at the start of ``region``."""
    tensor = _input(call.batch, call.input_name,
                    {"shared_memory_region": region, "shared_memory_byte_size": call.batch.nbytes})
    return json.dumps({"inputs": [tensor], "outputs": _outputs(call.output_name)}).encode()


def encode_inline_header(call: InferCall) -> bytes:
    """The JSON header of an inference whose input's bytes follow it in the body."""
    tensor = _input(call.batch, call.input_name, {"binary_data_size": call.batch.nbytes})
    return json.dumps({"inputs": [tensor], "outputs": _outputs(call.output_name)}).encode()


def decode_answer(answer: HttpAnswer, output_name: str) -> NDArray[Any] | None:
    """The named output of a 200 answer as an array (a view of its body); None if absent.
    Raises HttpProtocolError when the body is not what its header says."""
    try:
        return _decode_answer(answer, output_name)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # a header that is not Triton's
        raise HttpProtocolError(f"the inference answer does not parse: {type(exc).__name__}: {exc}") from exc


def _decode_answer(answer: HttpAnswer, output_name: str) -> NDArray[Any] | None:
    body = memoryview(answer.body)
    declared = header_value(answer.head, b"inference-header-content-length")
    json_bytes = len(body) if declared is None else int(declared)
    if not 0 <= json_bytes <= len(body):
        raise HttpProtocolError(f"an inference header of {json_bytes} bytes in a body of {len(body)}")
    header = json.loads(body[:json_bytes].tobytes())
    offset = json_bytes
    for output in header.get("outputs", []):
        size = (output.get("parameters") or {}).get("binary_data_size")
        if output.get("name") != output_name:
            offset += size or 0
            continue
        if output["datatype"] == "BYTES":
            return None  # never what a classifier returns
        dtype, shape = triton_to_np_dtype(output["datatype"]), tuple(output["shape"])
        if size is None:  # Triton sent it as JSON after all
            return np.asarray(output["data"], dtype=dtype).reshape(shape)
        if offset + size > len(body):
            raise HttpProtocolError(f"output {output_name!r} runs past the end of the answer")
        return np.frombuffer(body[offset : offset + size], dtype=dtype).reshape(shape)
    return None


def error_of(answer: HttpAnswer) -> ReplicaCallError:
    """A Triton error answer (``{"error": "..."}``) as ReplicaCallError."""
    text = bytes(answer.body).decode(errors="replace")
    try:
        details = json.loads(text).get("error", text)
    except (ValueError, AttributeError):
        details = text
    return ReplicaCallError(code_of(answer.status), str(details) or f"HTTP {answer.status}")


class HttpReplica(SharedMemoryRegistrations):
    """One replica's kept-alive connections, its inference endpoint, and its registrations of
    the worker's shared-memory regions."""

    protocol = "http"

    def __init__(
        self, address: str, http_address: str, *, shm_prefix_base: str | None = None, max_connections: int = 64
    ) -> None:
        super().__init__(address, shared_memory=shm_prefix_base is not None and is_loopback(http_address),
                         shm_prefix_base=shm_prefix_base)
        self.http_address = http_address
        host, port = split_endpoint(http_address)
        self._connections = HttpConnectionPool(
            host, port, max_connections=max_connections, timeout_s=DEFAULT_TIMEOUT_S,
            liveness_s=PEER_KEEPALIVE_S + PEER_KEEPALIVE_TIMEOUT_S,
        )

    async def _call(
        self, method: str, target: str, body: Sequence[bytes | memoryview], headers: Mapping[str, str],
        timeout_s: float | None,
    ) -> HttpAnswer:
        """One request's 200 answer; an error answer or a transport failure (UNAVAILABLE,
        DEADLINE_EXCEEDED) as ReplicaCallError."""
        try:
            answer = await self._connections.request(
                method, target, headers, body, max_bytes=MAX_ANSWER_BYTES, timeout_s=timeout_s
            )
        except TimeoutError:
            raise ReplicaCallError(Code.DEADLINE_EXCEEDED, f"no answer from {self.http_address} in time") from None
        except (OSError, IncompleteBody) as exc:
            raise ReplicaCallError(Code.UNAVAILABLE, f"{self.http_address}: {exc or type(exc).__name__}") from exc
        except HttpProtocolError as exc:
            raise ReplicaCallError(Code.INTERNAL, f"{self.http_address} answered malformed HTTP: {exc}") from exc
        if answer.status != 200:
            raise error_of(answer)
        return answer

    async def _json(self, method: str, target: str, payload: object, timeout_s: float | None) -> Any:
        body = [] if payload is None else [json.dumps(payload).encode()]
        answer = await self._call(method, target, body, {"Content-Type": "application/json"}, timeout_s)
        try:
            return json.loads(bytes(answer.body)) if answer.body else None
        except ValueError as exc:
            raise ReplicaCallError(Code.INTERNAL, f"{self.http_address} answered {target} with no JSON: {exc}") from exc

    async def infer(self, call: InferCall, in_region: bool, timeout_s: float | None) -> NDArray[Any] | None:
        """See ``replica.Replica.infer``."""
        headers = dict(tracing.inject())
        if in_region:
            assert call.region is not None
            region = call.region.name
            body: list[bytes | memoryview] = [call.encoded("http", True, lambda: encode_shm_request(call, region))]
            headers["Content-Type"] = "application/json"
        else:
            header = call.encoded("http", False, lambda: encode_inline_header(call))
            body = [header, call.batch.data.cast("B")]
            headers["Content-Type"] = "application/octet-stream"
            headers["Inference-Header-Content-Length"] = str(len(header))
        answer = await self._call("POST", infer_target(call.model, call.version), body, headers, timeout_s)
        try:
            return decode_answer(answer, call.output_name)
        except HttpProtocolError as exc:
            raise ReplicaCallError(Code.INTERNAL, f"{self.http_address}: {exc}") from exc

    async def _register(self, region: Region, timeout_s: float) -> None:
        target = f"/v2/systemsharedmemory/region/{quote(region.name, safe='')}/register"
        try:
            await self._json("POST", target, {"key": region.key, "offset": 0, "byte_size": region.nbytes}, timeout_s)
        except ReplicaCallError as exc:
            if "already in manager" not in exc.details:  # registered by this worker before it lost track
                raise

    async def _registered_names(self, timeout_s: float) -> list[str]:
        status = await self._json("GET", "/v2/systemsharedmemory/status", None, timeout_s)
        try:
            return [str(region["name"]) for region in status or []]
        except (TypeError, KeyError) as exc:
            raise ReplicaCallError(Code.INTERNAL, f"unexpected shared-memory status {status!r:.200}") from exc

    async def _unregister(self, name: str, timeout_s: float) -> None:
        await self._json("POST", f"/v2/systemsharedmemory/region/{quote(name, safe='')}/unregister", None, timeout_s)

    async def close(self) -> None:
        self._connections.close()
