"""Triton replicas over KServe v2 gRPC: a grpc.aio channel per replica, with tritonclient's
generated messages but not its client.

The request is the small ModelInferRequest header serialised once plus the
batch's bytes appended as ``raw_input_contents`` straight from the numpy
buffer (one copy, where tritonclient's InferInput, the message and its
serialisation make three), and the output is read with ``np.frombuffer`` on
``raw_output_contents``. A batch in a shared-memory region is a request
naming the region. Failed calls raise ``ReplicaCallError`` with the call's
status code. Used for replicas whose HTTP endpoint the worker does not know
(``http_replica`` is cheaper per batch), for ``preprocess.triton_protocol: grpc``
and for every replica with TLS to Triton (``tls.triton``: the channel is the
worker ``Dialer``'s, mutual TLS with the worker's certificate, reopened when the
files are renewed).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray
from tritonclient.grpc import service_pb2
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from flotilla.common import tracing
from flotilla.common.keepalive import PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S, keepalive_options
from flotilla.common.tls import PLAINTEXT, Dialer, RenewingChannel
from flotilla.common.wire import varint
from flotilla.errors import Code
from flotilla.services.preprocess.triton.replica import InferCall, ReplicaCallError, SharedMemoryRegistrations
from flotilla.services.preprocess.triton.shm import Region, is_loopback

log = logging.getLogger(__name__)


MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SHM_REGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryRegister"
SHM_UNREGISTER = "/inference.GRPCInferenceService/SystemSharedMemoryUnregister"
SHM_STATUS = "/inference.GRPCInferenceService/SystemSharedMemoryStatus"
MAX_MESSAGE_BYTES = 2**31 - 1
"""gRPC message limit both ways (tritonclient's): a batch of large FP32 images exceeds the 4 MiB default."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A replica that vanished without a reset fails its batches UNAVAILABLE (retried on
    # another copy) within seconds, not at their deadlines; Triton runs with TRITON_PING_ARGS.
    *keepalive_options(PEER_KEEPALIVE_S, PEER_KEEPALIVE_TIMEOUT_S),
]
# ModelInferRequest.raw_input_contents (field 7, length-delimited): its tag byte on the wire.
_RAW_INPUT_TAG = bytes([(service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3) | 2])


def encode_infer_request(
    model: str, version: str, input_name: str, batch: NDArray[Any], output_name: str
) -> bytes:
    """A serialised ModelInferRequest for one input tensor, its contents raw.

    The header (names, shape, datatype) is a small message; the tensor's
    bytes follow as field ``raw_input_contents``, joined straight from the
    array's buffer (protobuf parses concatenated fields as one message).
    """
    batch = np.ascontiguousarray(batch)
    header = service_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=input_name, datatype=np_to_triton_dtype(batch.dtype), shape=batch.shape
            )
        ],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=output_name)],
    )
    data = batch.data.cast("B")
    return b"".join((header.SerializeToString(), _RAW_INPUT_TAG, varint(data.nbytes), data))


def encode_shm_infer_request(
    model: str, version: str, input_name: str, batch: NDArray[Any], output_name: str, region: str
) -> bytes:
    """A serialised ModelInferRequest whose one input is ``batch``'s bytes at the start of the
    shared-memory ``region`` (Triton's system shared memory parameters), not in the message."""
    request = service_pb2.ModelInferRequest(
        model_name=model,
        model_version=version,
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=output_name)],
    )
    tensor = request.inputs.add(name=input_name, datatype=np_to_triton_dtype(batch.dtype), shape=batch.shape)
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = batch.nbytes
    serialized: bytes = request.SerializeToString()
    return serialized


def decode_infer_response(response: service_pb2.ModelInferResponse, output_name: str) -> NDArray[Any] | None:
    """The named output of a ModelInferResponse as an array (a view of the message's bytes); None if absent."""
    for index, output in enumerate(response.outputs):
        if output.name != output_name:
            continue
        if output.datatype == "BYTES" or index >= len(response.raw_output_contents):
            return None  # never what a classifier returns; Triton's gRPC always sends raw contents
        flat = np.frombuffer(response.raw_output_contents[index], dtype=triton_to_np_dtype(output.datatype))
        return flat.reshape(tuple(output.shape))
    return None


class GrpcReplica(SharedMemoryRegistrations):
    """One replica's channel, its ModelInfer method on pre-serialised requests, and its
    registrations of the worker's shared-memory regions.

    ``dialer`` opens the channel: plaintext, or TLS with the worker's certificate. Renewed
    certificate files (``Dialer.generation``, looked at before each batch) open a new channel
    (``RenewingChannel``); calls in flight finish on the old one."""

    protocol = "grpc"
    http_address = None

    def __init__(self, address: str, *, shm_prefix_base: str | None = None, dialer: Dialer = PLAINTEXT) -> None:
        super().__init__(address, shared_memory=shm_prefix_base is not None and is_loopback(address),
                         shm_prefix_base=shm_prefix_base)
        self.dialer = dialer
        self._channel = RenewingChannel(dialer, address, CHANNEL_OPTIONS)  # TlsFilesError: unusable files
        self._bind()

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel.channel

    def _bind(self) -> None:
        """This replica's methods on the current channel."""
        # No request serialiser: the request arrives as bytes from encode_infer_request.
        self.model_infer: grpc.aio.UnaryUnaryMultiCallable[bytes, service_pb2.ModelInferResponse]
        self.model_infer = self.channel.unary_unary(
            MODEL_INFER, request_serializer=None, response_deserializer=service_pb2.ModelInferResponse.FromString
        )
        self._register_call = self.channel.unary_unary(
            SHM_REGISTER,
            request_serializer=service_pb2.SystemSharedMemoryRegisterRequest.SerializeToString,
            response_deserializer=service_pb2.SystemSharedMemoryRegisterResponse.FromString,
        )
        self._unregister_call = self.channel.unary_unary(
            SHM_UNREGISTER,
            request_serializer=service_pb2.SystemSharedMemoryUnregisterRequest.SerializeToString,
            response_deserializer=service_pb2.SystemSharedMemoryUnregisterResponse.FromString,
        )
        self._status = self.channel.unary_unary(
            SHM_STATUS,
            request_serializer=service_pb2.SystemSharedMemoryStatusRequest.SerializeToString,
            response_deserializer=service_pb2.SystemSharedMemoryStatusResponse.FromString,
        )

    async def infer(self, call: InferCall, in_region: bool, timeout_s: float | None) -> NDArray[Any] | None:
        """See ``replica.Replica.infer``."""
        if self._channel.renew():  # certificate files renewed (TLS to Triton)
            self._bind()
        if in_region:
            assert call.region is not None
            region = call.region.name
            request = call.encoded("grpc", True, lambda: encode_shm_infer_request(
                call.model, call.version, call.input_name, call.batch, call.output_name, region))
        else:
            request = call.encoded("grpc", False, lambda: encode_infer_request(
                call.model, call.version, call.input_name, call.batch, call.output_name))
        try:
            reply = await self.model_infer(request, timeout=timeout_s, metadata=tracing.inject())
        except grpc.aio.AioRpcError as exc:
            raise call_error(exc) from exc
        return decode_infer_response(reply, call.output_name)

    async def _register(self, region: Region, timeout_s: float) -> None:
        request = service_pb2.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key, byte_size=region.nbytes)
        try:
            await self._register_call(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # registered by this worker before it lost track
                raise call_error(exc) from exc

    async def _registered_names(self, timeout_s: float) -> list[str]:
        try:
            return list((await self._status(service_pb2.SystemSharedMemoryStatusRequest(), timeout=timeout_s)).regions)
        except grpc.aio.AioRpcError as exc:
            raise call_error(exc) from exc

    async def _unregister(self, name: str, timeout_s: float) -> None:
        try:
            await self._unregister_call(service_pb2.SystemSharedMemoryUnregisterRequest(name=name), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise call_error(exc) from exc

    async def close(self) -> None:
        await self._channel.close()


def call_error(exc: grpc.aio.AioRpcError) -> ReplicaCallError:
    """A failed call's status as the protocol-neutral ReplicaCallError."""
    code = exc.code()
    return ReplicaCallError(Code[code.name] if code.name in Code.__members__ else Code.UNKNOWN,
                            exc.details() or code.name)
