"""gRPC layer of the router's ``ClassifyStream``: many Classify calls on one bidirectional stream.

The stream's messages are read as the router's opaque mirror of them
(``relay.proto``: ``OpaqueStreamRequest``, ``OpaqueStreamResponse``), so each
request's ClassifyRequest is forwarded unparsed and the batcher's
ClassifyResponse bytes go back as they came, as for a unary call. Each
request goes the way of a unary ``Classify`` (``Forwarder.call``: route,
relay to a batching shard) and is answered on its own, as it completes
(``streaming.answer_as_completed``):

- the API key is checked once, when the stream opens: a bad one ends the
  whole stream with UNAUTHENTICATED;
- a request's model is its ``model_name``, else the stream's
  ``x-model-name`` header;
- a request's deadline is its ``timeout_ms`` from when the router reads it,
  and never past the stream's own deadline (which, passing, ends the stream);
- a request's failure is its own answer (``StreamError``: the status, message
  and origin a unary call would get, from ``interceptors.status_of`` and
  ``origin_of``); the stream goes on;
- at most ``router.stream_window`` requests of a stream are in flight; past
  it the router stops reading and HTTP/2 flow control holds the sender;
- a message may pack several requests (``requests``), each taken as if it
  came alone (a message's own request, if it sets one, first); once a sender
  has packed, the answers ready together go back packed (``responses``). A
  message costs the router a gRPC read or write and its completion whatever
  it carries: packed, a request costs a fraction of one. A packed message is
  held whole while its requests wait for places in the window, so a stream
  holds at most its window plus one message (4 MiB at most);
- once the sender packs, an answer ready while others of its stream are in
  flight may wait for them up to ``router.stream_linger_ms`` (until all are
  answered or ``ENOUGH_COMPANY`` are ready), so they share one message;
- each request is one call in the router's metrics, admission limit and
  traces (``CallObserver``), under the method ``Classify``: it is one to
  every tier below, and the rules and dashboards that watch Classify at the
  router see stream traffic too. The stream itself is not counted.

Shutting down (``drain``), a stream reads no more requests, answers those it
took, then ends with UNAVAILABLE unless its sender had already closed: every
request without an answer was never taken, and can be sent again elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from flotilla.api.v1 import relay_pb2
from flotilla.common import tracing
from flotilla.common.interceptors import CallObserver, call_is_over, origin_of, status_of
from flotilla.common.peer import GrpcPeer
from flotilla.common.relay import one_message
from flotilla.common.wire import (
    AUTH_HEADER,
    CLASSIFY_METHOD,
    CLASSIFY_STREAM_METHOD,
    MODEL_HEADER,
    STREAM_PACKING_HEADER,
    method_name,
)
from flotilla.errors import FlotillaError, MalformedRequest
from flotilla.services.router.forward import Forwarder, TimeRemaining, passed_headers
from flotilla.services.router.streaming import answer_as_completed

log = logging.getLogger(__name__)

TIER = "router"
OBSERVED_METHOD = method_name(CLASSIFY_METHOD)
"""The method label of each stream request in metrics and spans (see the module docstring)."""
OK = grpc.StatusCode.OK
SHUTTING_DOWN = (
    "the router is shutting down; requests of this stream with no answer were not taken: send them again"
)

ENOUGH_COMPANY = 64
"""Answers ready that end a linger at once: a message's cost over this many is under a µs each."""

Context = grpc.aio.ServicerContext[relay_pb2.OpaqueStreamRequest, relay_pb2.OpaqueStreamResponse]


class ClassifyStreamHandler(grpc.GenericRpcHandler):
    """Serves ``ImageClassifier/ClassifyStream`` (registered before the unary ``ForwardingHandler``)."""

    def __init__(
        self, forwarder: Forwarder[GrpcPeer[None]], observer: CallObserver, *, window: int, linger_s: float = 0.0
    ) -> None:
        """``observer``: the router's (its admission limit and model labels); ``window``: the most
        requests of one stream in flight (``router.stream_window``); ``linger_s``: how long an answer
        may wait for others of its stream in flight (``router.stream_linger_ms``)."""
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        if linger_s < 0:
            raise ValueError(f"linger_s must be at least 0, got {linger_s}")
        self.forwarder = forwarder
        self.observer = observer
        self.window = window
        self.linger_s = linger_s
        self.stopping = asyncio.Event()
        self.open_streams = 0
        """Streams being served now (for observing state)."""
        self._handler = grpc.stream_stream_rpc_method_handler(
            self.classify_stream,
            request_deserializer=relay_pb2.OpaqueStreamRequest.FromString,
            response_serializer=relay_pb2.OpaqueStreamResponse.SerializeToString,
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handler if handler_call_details.method == CLASSIFY_STREAM_METHOD else None

    def drain(self) -> None:
        """Shutting down: streams take no more requests, answer the ones they took, then end."""
        self.stopping.set()

    async def classify_stream(
        self, requests: AsyncIterator[relay_pb2.OpaqueStreamRequest], context: Context
    ) -> None:
        metadata = context.invocation_metadata() or ()
        text = [(k, v) for k, v in metadata if isinstance(v, str)]
        by_key = dict(text)
        try:
            self.forwarder.check_key(by_key.get(AUTH_HEADER))
        except FlotillaError as exc:
            await context.abort(grpc.StatusCode[exc.code.name], exc.message)
        # The client's stream packs its requests once it sees this router takes packed ones.
        await context.send_initial_metadata(((STREAM_PACKING_HEADER, "1"),))
        stream = _OneStream(self, context, by_key.get(MODEL_HEADER, ""), text, by_key.get(AUTH_HEADER))
        self.open_streams += 1
        try:
            ended = await answer_as_completed(
                stream.unpacked(requests), stream.handle, context.write, window=self.window,
                on_unexpected=stream.unexpected, stop=self.stopping, send_many=stream.send_many,
                linger_s=stream.linger_s, most_packed=ENOUGH_COMPANY,
            )
        except Exception as exc:  # the transport failed (the caller went away, or a write failed)
            if not call_is_over(context):
                code, message = status_of(exc, TIER)  # logs anything but a Flotilla or upstream status
                await context.abort(code, message)
        else:
            if not ended:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        finally:
            self.open_streams -= 1


class _OneStream:
    """What each request of one stream shares: the stream's model, headers and deadline."""

    def __init__(
        self,
        handler: ClassifyStreamHandler,
        context: Context,
        model: str,
        metadata: Sequence[tuple[str, str]],
        authorization: str | None,
    ) -> None:
        self.forwarder = handler.forwarder
        self.observer = handler.observer
        self.context = context
        self.model = model
        self.metadata = metadata
        self.authorization = authorization
        """Checked at the stream's opening; each request is authorized for its model and quota."""
        # Each request names its own model (the batcher routes to the model's queue by this header).
        self.headers = [(k, v) for k, v in passed_headers(metadata) if k != MODEL_HEADER]
        self.packed = False
        """The sender has packed requests into one message: the answers ready together go packed too."""
        self.most_linger_s = handler.linger_s

    def linger_s(self) -> float:
        """How long answers may wait for others in flight: only once they go packed (one at a time, waiting buys nothing)."""
        return self.most_linger_s if self.packed else 0.0

    async def unpacked(
        self, messages: AsyncIterator[relay_pb2.OpaqueStreamRequest]
    ) -> AsyncIterator[relay_pb2.OpaqueStreamRequest]:
        """Each request of the stream: a message's own (when it sets any field of one), then those it packs."""
        async for message in messages:
            if not message.requests:
                yield message
                continue
            self.packed = True
            if message.id or message.request or message.model_name or message.timeout_ms:
                yield relay_pb2.OpaqueStreamRequest(
                    id=message.id, request=message.request, model_name=message.model_name, timeout_ms=message.timeout_ms
                )
            for request in message.requests:
                yield request

    async def send_many(self, answers: list[relay_pb2.OpaqueStreamResponse]) -> None:
        """Answers ready together: one message (or as few as fit ``one_message``'s size) once the sender packs."""
        if not self.packed:
            for answer in answers:
                await self.context.write(answer)
            return
        while answers:
            pack, answers = one_message(answers)
            await self.context.write(pack[0] if len(pack) == 1 else relay_pb2.OpaqueStreamResponse(responses=pack))

    async def handle(self, request: relay_pb2.OpaqueStreamRequest) -> relay_pb2.OpaqueStreamResponse:
        """The request's answer: the batcher's response bytes, or the request's error; never raises
        (cancelled, it ends with the stream)."""
        model = request.model_name or self.model
        call = self.observer.begin(OBSERVED_METHOD, model, self.metadata)
        try:
            if call.refusal is not None:
                raise call.refusal
            if call.span is None:
                response = await self._forward(request, model)
            else:
                with tracing.use_span(call.span, end_on_exit=False):
                    response = await self._forward(request, model)
        except asyncio.CancelledError:
            self.observer.end(call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            code, message = status_of(exc, TIER)
            self.observer.end(call, code)
            return error_answer(request.id, code, message, origin_of(exc), retry_after_s=getattr(exc, "retry_after_s", None))
        self.observer.end(call, OK)
        return relay_pb2.OpaqueStreamResponse(id=request.id, response=response)

    async def _forward(self, request: relay_pb2.OpaqueStreamRequest, model: str) -> bytes:
        if request.requests:
            raise MalformedRequest(
                f"request {request.id!r} packs {len(request.requests)} requests but is itself packed in a message: "
                "packed requests do not pack again; those were not taken"
            )
        self.forwarder.authorize(self.authorization, model)
        headers = [(MODEL_HEADER, model), *self.headers] if model else list(self.headers)
        if tracing.enabled():
            headers = list(tracing.inject(headers))  # this request's span, not the stream's
        if not request.timeout_ms:
            return await self.forwarder.call(model, request.request, headers, self.context.time_remaining)
        # No timer a request: its deadline travels in the relay frame and the batcher ends it there (a
        # batcher that never answers is caught by the relay's sweep, ``relay.DEADLINE_SWEEP_S``).
        return await self.forwarder.call(
            model, request.request, headers, _sooner(self.context.time_remaining, request.timeout_ms / 1000)
        )

    def unexpected(self, request: relay_pb2.OpaqueStreamRequest, exc: BaseException) -> relay_pb2.OpaqueStreamResponse:
        code, message = status_of(exc, TIER)
        return error_answer(request.id, code, message, "")


def error_answer(
    request_id: str, code: grpc.StatusCode, message: str, origin: str, *, retry_after_s: float | None = None
) -> relay_pb2.OpaqueStreamResponse:
    """A request's error on the stream; ``retry_after_s`` (a key over its rate): when to retry, as the
    unary call's ``retry-after-ms`` trailer says it."""
    retry_after_ms = max(1, round(retry_after_s * 1000)) if retry_after_s is not None else 0
    return relay_pb2.OpaqueStreamResponse(id=request_id, error=relay_pb2.OpaqueStreamError(
        code=code.value[0], message=message, origin=origin, retry_after_ms=retry_after_ms,
    ))


def _sooner(stream_remaining: TimeRemaining, timeout_s: float) -> TimeRemaining:
    """What is left of the request's own deadline (``timeout_s`` from now) or of the stream's, if sooner."""
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s

    def remaining() -> float:
        own_s = deadline_s - loop.time()
        stream_s = stream_remaining()
        return own_s if stream_s is None else min(own_s, stream_s)

    return remaining
