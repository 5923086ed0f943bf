"""KServe v2 over gRPC on the router: ``inference.GRPCInferenceService``, the service Triton and its
clients (``tritonclient.grpc``, ``tritonclient.grpc.aio``) speak.

A thin layer over ``core.KServeFront``: protobuf in, the core's value objects through, protobuf out.
Bodies arrive as bytes (identity deserialisers) so that a body that is not the message is
INVALID_ARGUMENT, not gRPC's INTERNAL, and so that ModelInfer is routed before it is parsed: the model
is the ``x-model-name`` header, else the body's ``model_name`` read off the wire (``wire.model_from_wire``);
the key and the route are checked first, then the body is parsed. Answers carry their tensors in
``raw_output_contents`` (what tritonclient reads). Errors are raised as ``FlotillaError``s and become
statuses in the ``Observe`` interceptor.

Every method but ServerLive and ServerReady (probes) takes the same ``authorization: Bearer <key>`` as
the Flotilla API.

**ModelStreamInfer**, Triton's bidirectional stream: each request is answered when its answer is ready,
matched by its ``id``; a failed request answers ``error_message`` (prefixed ``[request id: <id>]``, as
Triton's are, since tritonclient hands a stream's errors to the caller without the response) and the
stream goes on. Each request names its model (``model_name``), else the stream's ``x-model-name`` header
applies. At most ``window`` requests of a stream are in flight (``services.router.streaming``): past
it the router stops reading and HTTP/2 flow control holds the sender. Each request is admitted, traced
and counted as a call of its own (``CallObserver``: method ``ModelStreamInfer``). When the router shuts
down it stops reading, answers what it took, and ends the stream UNAVAILABLE: requests not answered
were not read and can be resent. The interceptor passes bidirectional streams through, so a stream's
own status (a bad key, shutting down) comes from its mapping function, ``interceptors.status_of``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeAlias, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from flotilla.api.kserve import grpc_service_pb2 as pb
from flotilla.common import tracing
from flotilla.common.interceptors import CallObserver, call_is_over, status_of
from flotilla.common.wire import AUTH_HEADER, KSERVE_SERVICE, MODEL_HEADER
from flotilla.errors import FlotillaError, InvalidArgument, MalformedRequest, Unavailable
from flotilla.services.router.forward import passed_headers
from flotilla.services.router.kserve.core import UNSERVED, KServeFront, unserved
from flotilla.services.router.kserve.protocol import (
    BATCH_DURATIONS,
    BYTES,
    CLASSIFICATION_PARAMETER,
    DURATIONS,
    Duration,
    InferRequest,
    InferResult,
    InputTensor,
    OutputTensor,
    ParameterValue,
    RequestedOutput,
)
from flotilla.services.router.kserve.wire import decode_bytes_tensor, encode_bytes_tensor, model_from_wire
from flotilla.services.router.streaming import answer_as_completed

log = logging.getLogger(__name__)

TIER = "router"
STREAM_METHOD = "ModelStreamInfer"
DEFAULT_STREAM_WINDOW = 64
"""Requests of one ModelStreamInfer stream in flight, when the router is given no ``window``."""

M = TypeVar("M", bound=Message)
Context: TypeAlias = "grpc.aio.ServicerContext[bytes, bytes]"
Headers: TypeAlias = Sequence[tuple[str, str | bytes]]


class Gate(Protocol):
    """What the handler needs of the router's ``Forwarder`` before the core: the key and the route."""

    def check_key(self, authorization: str | None) -> object: ...

    def authorize(self, authorization: str | None, model: str | None) -> object: ...

    def check_model(self, model: str | None) -> None: ...

    def scope(self, authorization: str | None) -> Callable[[str], bool]: ...


class InferBody:
    """A ModelInferRequest as the server hands it over: its bytes, and its ``model_name`` read off the wire
    on first use (the interceptor labels the call's metrics with it; "" when the bytes are not a request)."""

    __slots__ = ("raw", "_model_name")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._model_name: str | None = None

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            try:
                self._model_name = model_from_wire(self.raw)
            except MalformedRequest:
                self._model_name = ""
        return self._model_name


class KServeHandler(grpc.GenericRpcHandler):
    """Serves ``inference.GRPCInferenceService`` over a ``KServeFront``."""

    def __init__(
        self, front: KServeFront, gate: Gate, observer: CallObserver, *, window: int = DEFAULT_STREAM_WINDOW
    ) -> None:
        """``gate``: the router's forwarder (the same keys and routes as the Flotilla API's); ``observer``: the
        router's (its admission limit, model labels), for each request of a stream."""
        self.front = front
        self.gate = gate
        self.observer = observer
        self.window = window
        self.stopping = asyncio.Event()
        """Set when the router shuts down: streams stop reading (``drain``)."""
        unary = {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ServerMetadata": self.server_metadata,
            "ModelReady": self.model_ready,
            "ModelMetadata": self.model_metadata,
            "ModelConfig": self.model_config,
            "RepositoryIndex": self.repository_index,
            "RepositoryModelLoad": self.repository_model_load,
            "ModelStatistics": self.model_statistics,
            **{method: self._unserved(method) for method in UNSERVED},
        }
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, bytes]] = {
            f"/{KSERVE_SERVICE}/{name}": grpc.unary_unary_rpc_method_handler(behaviour)
            for name, behaviour in unary.items()
        }
        self._handlers[f"/{KSERVE_SERVICE}/ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            self.model_infer, request_deserializer=InferBody
        )
        self._handlers[f"/{KSERVE_SERVICE}/{STREAM_METHOD}"] = grpc.stream_stream_rpc_method_handler(self.stream_infer)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)

    def drain(self) -> None:
        """The router is shutting down: streams stop taking requests (``ServiceServer.on_drain``)."""
        self.stopping.set()

    # --- unary --------------------------------------------------------------------------------------

    async def server_live(self, raw: bytes, context: Context) -> bytes:
        _parse(pb.ServerLiveRequest, raw)
        return pb.ServerLiveResponse(live=self.front.live()).SerializeToString()

    async def server_ready(self, raw: bytes, context: Context) -> bytes:
        _parse(pb.ServerReadyRequest, raw)
        return pb.ServerReadyResponse(ready=self.front.ready()).SerializeToString()

    async def server_metadata(self, raw: bytes, context: Context) -> bytes:
        self._authorize(_headers(context), None)
        _parse(pb.ServerMetadataRequest, raw)
        metadata = self.front.server_metadata()
        return pb.ServerMetadataResponse(
            name=metadata.name, version=metadata.version, extensions=metadata.extensions
        ).SerializeToString()

    async def model_ready(self, raw: bytes, context: Context) -> bytes:
        self._check_key(_headers(context))
        request = _parse(pb.ModelReadyRequest, raw)
        self._authorize(_headers(context), request.name)
        return pb.ModelReadyResponse(ready=self.front.model_ready(request.name, request.version)).SerializeToString()

    async def model_metadata(self, raw: bytes, context: Context) -> bytes:
        self._check_key(_headers(context))
        request = _parse(pb.ModelMetadataRequest, raw)
        self._authorize(_headers(context), request.name)
        metadata = self.front.model_metadata(request.name, request.version)
        response = pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions, platform=metadata.platform)
        for tensor in metadata.inputs:
            response.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for tensor in metadata.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        return response.SerializeToString()

    async def model_config(self, raw: bytes, context: Context) -> bytes:
        self._check_key(_headers(context))
        request = _parse(pb.ModelConfigRequest, raw)
        self._authorize(_headers(context), request.name)
        view = self.front.model_config(request.name, request.version)
        config = json_format.ParseDict(view.triton_json(), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config).SerializeToString()

    async def repository_index(self, raw: bytes, context: Context) -> bytes:
        headers = _headers(context)
        self._authorize(headers, None)
        request = _parse(pb.RepositoryIndexRequest, raw)
        response = pb.RepositoryIndexResponse()
        for entry in self.front.repository_index(self.gate.scope(_header(headers, AUTH_HEADER)), ready_only=request.ready):
            response.models.add(name=entry.name, version=entry.version, state=entry.state, reason=entry.reason)
        return response.SerializeToString()

    async def repository_model_load(self, raw: bytes, context: Context) -> bytes:
        headers = _headers(context)
        self._check_key(headers)
        request = _parse(pb.RepositoryModelLoadRequest, raw)
        self._authorize(headers, request.model_name)
        await self.front.load(request.model_name, dict(request.parameters), context.time_remaining)
        return pb.RepositoryModelLoadResponse().SerializeToString()

    async def model_statistics(self, raw: bytes, context: Context) -> bytes:
        headers = _headers(context)
        self._check_key(headers)
        request = _parse(pb.ModelStatisticsRequest, raw)
        self._authorize(headers, request.name or None)
        views = await self.front.statistics(
            request.name, request.version, self.gate.scope(_header(headers, AUTH_HEADER)), context.time_remaining
        )
        response = pb.ModelStatisticsResponse()
        for view in views:
            stats = response.model_stats.add(
                name=view.name, version=view.version, last_inference=view.last_inference_ms,
                inference_count=view.inference_count, execution_count=view.execution_count,
            )
            for field in DURATIONS:
                duration: Duration = getattr(view, field)
                getattr(stats.inference_stats, field).MergeFrom(pb.StatisticDuration(count=duration.count, ns=duration.ns))
            for batch in view.batch_stats:
                entry = stats.batch_stats.add(batch_size=batch.batch_size)
                for field in BATCH_DURATIONS:
                    duration = getattr(batch, field)
                    getattr(entry, field).MergeFrom(pb.StatisticDuration(count=duration.count, ns=duration.ns))
        return response.SerializeToString()

    def _unserved(self, method: str) -> Callable[[bytes, Context], Awaitable[bytes]]:
        """The handler of a Triton method the mesh does not serve: UNIMPLEMENTED saying what to use instead
        (after the key, so that it tells nothing to a caller without one)."""

        async def refuse(raw: bytes, context: Context) -> bytes:
            self._check_key(_headers(context))
            raise unserved(method)

        return refuse

    async def model_infer(self, body: InferBody, context: Context) -> bytes:
        headers = _headers(context)
        self._check_key(headers)
        raw = body.raw
        header_model = _header(headers, MODEL_HEADER)
        model = header_model or body.model_name or model_from_wire(raw)  # the scan again: its error, if any
        if not model:
            raise InvalidArgument(f"no model named: set the request's model_name (or the {MODEL_HEADER} header)")
        self._authorize(headers, model)
        self.gate.check_model(model)  # routed (else NOT_FOUND) before the body is parsed
        request = _parse(pb.ModelInferRequest, raw)
        if header_model and request.model_name and request.model_name != header_model:
            raise InvalidArgument(
                f"header {MODEL_HEADER} says {header_model!r} but the request's model_name is {request.model_name!r}"
            )
        result = await self.front.infer(_infer_request(request, model), passed_headers(headers), context.time_remaining)
        return _infer_response(result).SerializeToString()

    # --- the stream ----------------------------------------------------------------------------------

    async def stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """ModelStreamInfer: every request answered as it completes; see the module's docstring."""
        headers = _headers(context)
        try:
            self._check_key(headers)
        except FlotillaError as exc:
            code, message = status_of(exc, TIER)
            await context.abort(code, message)
        stream_model = _header(headers, MODEL_HEADER)
        # A request may name another model than the stream's header: each Classify body names its own.
        passed = [(k, v) for k, v in passed_headers(headers) if k != MODEL_HEADER]

        async def handle(raw: bytes) -> bytes:
            return (await self._stream_request(raw, stream_model, headers, passed, context)).SerializeToString()

        async def send(answer: bytes) -> None:
            await context.write(answer)

        try:
            complete = await answer_as_completed(
                requests, handle, send, window=self.window, on_unexpected=_unexpected, stop=self.stopping
            )
        except Exception as exc:
            if call_is_over(context):
                raise asyncio.CancelledError() from exc
            code, message = status_of(exc, TIER)
            await context.abort(code, message)
        if not complete:
            code, message = status_of(
                Unavailable("the router is shutting down; requests not answered on this stream were not read: "
                            "send them again"), TIER,
            )
            await context.abort(code, message)

    async def _stream_request(
        self, raw: bytes, stream_model: str | None, headers: Headers, passed: list[tuple[str, str]], context: Context
    ) -> pb.ModelStreamInferResponse:
        """One request of a stream, answered: its result, or its error (never raised)."""
        code = grpc.StatusCode.CANCELLED
        model, request_id = "", ""
        call = None
        try:
            # Parsed first, unlike ModelInfer: an error answer names the request's id.
            request = _parse(pb.ModelInferRequest, raw)
            model, request_id = request.model_name or stream_model or "", request.id
            call = self.observer.begin(STREAM_METHOD, model, headers)
            if call.refusal is not None:
                raise call.refusal
            if not model:
                raise InvalidArgument(
                    f"no model named: set the request's model_name (or the stream's {MODEL_HEADER} header)"
                )
            self._authorize(headers, model)
            self.gate.check_model(model)
            infer = self.front.infer(_infer_request(request, model), passed, context.time_remaining)
            if call.span is None:
                result = await infer
            else:
                with tracing.use_span(call.span, end_on_exit=False):
                    result = await infer
            code = grpc.StatusCode.OK
            return pb.ModelStreamInferResponse(infer_response=_infer_response(result))
        except Exception as exc:
            code, message = status_of(exc, TIER)
            if call is None:  # not even a request: counted all the same
                call = self.observer.begin(STREAM_METHOD, model, headers, admit=False, trace=False)
            return _stream_error(message, model, request_id)
        finally:
            if call is not None:
                self.observer.end(call, code)

    def _check_key(self, headers: Headers) -> None:
        """Authentication only: a stream's opening, and a call before its body names the model."""
        self.gate.check_key(_header(headers, AUTH_HEADER))

    def _authorize(self, headers: Headers, model: str | None) -> None:
        """One request to ``model``: the key's scope and quota (``Forwarder.authorize``)."""
        self.gate.authorize(_header(headers, AUTH_HEADER), model)


def _unexpected(raw: bytes, exc: BaseException) -> bytes:
    """The answer of a stream request whose handling failed outside ``_stream_request``'s own handling."""
    _, message = status_of(exc, TIER)
    return _stream_error(message, "", "").SerializeToString()


def _stream_error(message: str, model: str, request_id: str) -> pb.ModelStreamInferResponse:
    shown = f"[request id: {request_id}] {message}" if request_id else message
    return pb.ModelStreamInferResponse(
        error_message=shown, infer_response=pb.ModelInferResponse(model_name=model, id=request_id)
    )


def _headers(context: Context) -> Headers:
    return tuple(context.invocation_metadata() or ())


def _header(headers: Headers, name: str) -> str | None:
    value = None
    for key, v in headers:
        if key == name and isinstance(v, str):
            value = v
    return value


def _parse(message: type[M], raw: bytes) -> M:
    try:
        return message.FromString(raw)
    except DecodeError as exc:
        raise MalformedRequest(
            f"request body ({len(raw)} bytes) is not a valid {message.DESCRIPTOR.full_name}: {exc}"
        ) from exc


def _infer_request(request: pb.ModelInferRequest, model: str) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; they go one for one"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        values: Sequence[bytes] = ()
        if tensor.datatype == BYTES:
            values = decode_bytes_tensor(raw[i], tensor.name) if raw else tensor.contents.bytes_contents
        inputs.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), list(values)))
    outputs = [
        RequestedOutput(o.name, _classification(o.name, o.parameters.get(CLASSIFICATION_PARAMETER)))
        for o in request.outputs
    ]
    return InferRequest(
        model=model, inputs=inputs, version=request.model_version, id=request.id, outputs=outputs,
        parameters=_parameters(request.parameters),
    )


def _parameter(value: pb.InferParameter) -> ParameterValue | None:
    choice = value.WhichOneof("parameter_choice")
    if choice is None:
        return None
    chosen: ParameterValue = getattr(value, choice)
    return chosen


def _parameters(parameters: Any) -> dict[str, ParameterValue]:
    """A protobuf map of InferParameters as plain values (unset ones left out)."""
    plain = {}
    for key, value in parameters.items():
        chosen = _parameter(value)
        if chosen is not None:
            plain[key] = chosen
    return plain


def _classification(output: str, value: pb.InferParameter | None) -> int:
    chosen = None if value is None else _parameter(value)
    if chosen is None:
        return 0
    if isinstance(chosen, bool) or not isinstance(chosen, int):
        raise InvalidArgument(f"output {output}: parameter {CLASSIFICATION_PARAMETER!r} must be an integer")
    return chosen


def _infer_response(result: InferResult) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=result.model, model_version=result.version, id=result.id)
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(_raw(output))
    return response


def _raw(output: OutputTensor) -> bytes:
    """An output's elements as ``raw_output_contents`` carries them (little-endian; BYTES length-prefixed)."""
    if isinstance(output.data, np.ndarray):
        return output.data.astype("<f4", copy=False).tobytes()
    return encode_bytes_tensor(output.data)

