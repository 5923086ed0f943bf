"""The server interceptor every Flotilla gRPC server runs (``Observe``), and the one path every
call takes through a tier however it came in (``CallObserver``: a unary call, or a frame on a
relay stream, ``flotilla.common.relay``).

For each call, in order: admission (router, batchers: an ``AdmissionLimit``),
the trace span (only when tracing is on, and for polling only inside a
caller's trace: ``tracing.traces_call``), the handler, then the status and
the request metrics. ``Observe`` is the one place where an exception
escaping a handler becomes a gRPC status: a ``FlotillaError`` with its code
and message, an upstream tier's status passed through as it came, anything
else INTERNAL with a generic message (the traceback goes to this service's
log, never to the caller). It also counts every call and its latency by
tier, method, model and status code. Handlers raise; they do not catch.

One interceptor, not a chain of them, and its wrapped handler is built once
per method: on the router and batchers this runs for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias, cast

import grpc
from opentelemetry.trace import Span, Status, StatusCode

from flotilla.common import metrics, tracing
from flotilla.common.status import origin_in
from flotilla.common.wire import HEALTH_SERVICE_PREFIX, MODEL_HEADER, ORIGIN_HEADER, RETRY_AFTER_HEADER, method_name
from flotilla.errors import FlotillaError, ResourceExhausted

log = logging.getLogger(__name__)

UNKNOWN_MODEL = "(unknown)"

# model name as the caller gave it -> the label to record (bounded), or None for "no model"
ModelLabel = Callable[[str], str]

# A method handler of an aio server, as the server calls it. Requests and replies are the protobuf
# messages of whichever method it serves. The stubs type RpcMethodHandler's behaviours for the
# sync server (plain functions taking grpc.ServicerContext); on an aio server they are these.
# (grpc's classes are generic only in the stubs: hence the strings.)
AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
AioUnary: TypeAlias = Callable[[Any, AioContext], Awaitable[Any]]
AioUnaryStream: TypeAlias = Callable[[Any, AioContext], AsyncIterator[Any]]
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def call_is_over(context: AioContext) -> bool:
    """True when the caller or the deadline has ended the call (nobody to send a status to).

    At the instant the deadline passes, done() can still be False while gRPC
    already refuses a status, so the remaining time is checked as well.
    """
    remaining_s = context.time_remaining()
    return context.done() or (remaining_s is not None and remaining_s <= 0)


def status_of(exc: BaseException, tier: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a caller gets for an exception escaping a handler."""
    if isinstance(exc, FlotillaError):
        return grpc.StatusCode[exc.code.name], exc.message
    if isinstance(exc, grpc.aio.AioRpcError):  # an upstream tier's status, passed through
        return exc.code(), exc.details() or exc.code().name
    log.error("%s: unhandled error", tier, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in the {tier}; see its log"


def origin_of(exc: BaseException) -> str:
    """Where a failure arose when it is below the answering service ("" for its own): the caller's
    endpoint pool then neither counts it against this service nor retries it elsewhere."""
    if isinstance(exc, FlotillaError):
        return exc.origin
    if isinstance(exc, grpc.aio.AioRpcError):
        return origin_in(exc)
    return ""


RETRY_HINT = "retry after a short backoff (e.g. 100 ms, doubling)"
MAX_CACHED_METHODS = 256  # wrapped handlers kept per server (its methods; callers cannot grow it past this)


class AdmissionLimit:
    """At most ``max_calls`` calls at once; beyond it RESOURCE_EXHAUSTED at once.

    Applied by ``Observe`` to unary calls (health checks are exempt: an
    overloaded service is still alive) and by the relay to relayed calls. The
    message names the limit and the setting that raises it.
    """

    def __init__(self, service: str, max_calls: int, setting: str, *, tier: str = "") -> None:
        self.service = service
        self.tier = tier or service
        self.max_calls = max_calls
        self.setting = setting
        self.active = 0
        self.rejected = 0

    def enter(self) -> bool:
        """Admit one call (True), or count a rejection (False: answer it with ``rejection()``)."""
        if self.active >= self.max_calls:
            self.rejected += 1
            metrics.ADMISSION_REJECTED.labels(self.tier).inc()
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        """An admitted call is over."""
        self.active -= 1

    def rejection(self) -> str:
        return (
            f"{self.service} is at its limit of {self.max_calls} concurrent calls ({self.setting}); {RETRY_HINT}"
        )


@dataclass(slots=True)
class ObservedCall:
    """One call on its way through a tier: what ``CallObserver.end`` needs."""

    method: str
    model: str
    """The model's metric label ("" for none)."""
    started_s: float
    span: Span | None
    admitted: bool
    """It holds a place in the tier's admission limit until it ends."""
    refusal: FlotillaError | None = None
    """Why it was refused at once (the admission limit); the caller answers with it."""
    limit: AdmissionLimit | None = None
    """The limit it was admitted to (None once it has ended)."""


_CURRENT: ContextVar[ObservedCall | None] = ContextVar("flotilla_observed_call", default=None)
"""The call most recently begun in this context (each request's own task, on every front door)."""


@contextlib.contextmanager
def place_given_back() -> Iterator[None]:
    """While the call in this context waits for something outside its tier (the router: its model to
    move off a dead shard), its place in the admission limit is free for other calls; it takes the
    place back when the wait ends, over the limit if need be (an admitted call is never refused
    later). Whoever waits bounds how many wait at once (``Forwarder.max_held_calls``). A call that
    holds no place (ended, or never admitted) waits as it is."""
    call = _CURRENT.get()
    limit = call.limit if call is not None and call.admitted else None
    if call is None or limit is None:
        yield
        return
    limit.active -= 1
    call.admitted = False
    try:
        yield
    finally:
        if call.limit is not None:  # not ended meanwhile
            limit.active += 1
            call.admitted = True


class CallObserver:
    """Admission, the trace span and the request metrics of each call a tier serves, for unary calls
    (``Observe``) and relayed frames (``relay.RelayServicer``) alike: ``begin``, run the call inside
    its span (``span``, when there is one), answer a failure with ``status_of``/``origin_of``, then
    ``end`` with the status. On the router and batchers this runs for every request: it stays lean
    (no context manager, no span work with tracing off)."""

    def __init__(
        self, tier: str, admission: AdmissionLimit | None = None, model_label: ModelLabel | None = None
    ) -> None:
        self.tier = tier
        self.admission = admission
        self.model_label = model_label or (lambda name: name)

    def begin(
        self, method: str, named_model: str, metadata: Iterable[tuple[str, str | bytes]], *, admit: bool = True,
        trace: bool = True,
    ) -> ObservedCall:
        """Admit the call (or refuse it: ``refusal``) and open its span when tracing takes it."""
        started_s = time.perf_counter()
        model = self.model_label(named_model) if named_model else ""
        admission = self.admission if admit else None
        if admission is not None and not admission.enter():
            return ObservedCall(method, model, started_s, None, False, ResourceExhausted(admission.rejection()))
        span = None
        if trace and tracing.enabled() and tracing.traces_call(method, metadata):
            span = tracing.start_server_span(
                f"{self.tier} {method}", metadata,
                {"rpc.system": "grpc", "rpc.method": method, "flotilla.tier": self.tier, "flotilla.model": model},
            )
        call = ObservedCall(method, model, started_s, span, admission is not None, limit=admission)
        _CURRENT.set(call)
        return call

    def end(self, call: ObservedCall, code: grpc.StatusCode) -> None:
        """The call is over with ``code``: free its place, count it, end its span."""
        if call.admitted and self.admission is not None:
            self.admission.leave()
        call.admitted, call.limit = False, None  # a wait still giving its place back does not take it again
        record_call(self.tier, call.method, call.model, code, call.started_s, call.span)


class Observe(grpc.aio.ServerInterceptor):
    """Errors to statuses, and request metrics, for every method of a server."""

    def __init__(
        self, tier: str, model_label: ModelLabel | None = None, admission: AdmissionLimit | None = None
    ) -> None:
        self.tier = tier
        self.observer = CallObserver(tier, admission, model_label)
        self._wrapped: dict[str, tuple[MethodHandler, MethodHandler]] = {}
        """method -> (the handler as served, its wrapped handler): built once per method."""

    @staticmethod
    def _named_model(request: object, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The model the call names: its header, else the request's model_name or name field."""
        named = ""
        for key, value in metadata:
            if key == MODEL_HEADER:
                named = str(value)
        return named or str(getattr(request, "model_name", "") or getattr(request, "name", "") or "")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method
            return None
        return self.wrapped(handler, handler_call_details.method)

    def wrapped(self, handler: MethodHandler, full_method: str) -> MethodHandler:
        """``handler`` (serving ``full_method``) observed: built once per method."""
        cached = self._wrapped.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, full_method)
        if len(self._wrapped) < MAX_CACHED_METHODS:
            self._wrapped[full_method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: MethodHandler, full_method: str) -> MethodHandler:
        if full_method.startswith(HEALTH_SERVICE_PREFIX):
            return handler
        method = method_name(full_method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(cast(AioUnary, handler.unary_unary), method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(cast(AioUnaryStream, handler.unary_stream), method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _fail(self, exc: BaseException, context: AioContext) -> NoReturn:
        """End the call with ``exc``'s status (``context.code`` then says which); always raises."""
        if _is_abort(exc):
            raise exc  # the handler set its own status
        code, details = status_of(exc, self.tier)
        trailing = []
        origin = origin_of(exc)
        if origin:
            trailing.append((ORIGIN_HEADER, origin))
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            trailing.append((RETRY_AFTER_HEADER, str(max(1, round(retry_after_s * 1000)))))
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        if call_is_over(context):
            context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED)
            raise asyncio.CancelledError() from exc
        await context.abort(code, details)

    def _unary(self, inner: AioUnary, method: str) -> AioUnary:
        observer = self.observer

        async def observed(request: Any, context: AioContext) -> Any:
            metadata = context.invocation_metadata() or ()
            call = observer.begin(method, self._named_model(request, metadata), metadata)
            try:
                if call.refusal is not None:
                    raise call.refusal
                if call.span is None:
                    return await inner(request, context)
                with tracing.use_span(call.span, end_on_exit=False):
                    return await inner(request, context)
            except Exception as exc:
                await self._fail(exc, context)
            finally:
                observer.end(call, _final_code(context))

        return observed

    def _stream(self, inner: AioUnaryStream, method: str) -> AioUnaryStream:
        observer = self.observer

        async def observed(request: Any, context: AioContext) -> AsyncIterator[Any]:
            metadata = context.invocation_metadata() or ()
            # Streams (the fleet watch) are long-lived and internal: counted, not admitted or traced.
            call = observer.begin(method, self._named_model(request, metadata), metadata, admit=False, trace=False)
            try:
                async for reply in inner(request, context):
                    yield reply
            except Exception as exc:
                await self._fail(exc, context)
            finally:
                observer.end(call, _final_code(context))

        return observed


class Observed(grpc.GenericRpcHandler):
    """The methods of ``inner`` observed by ``observe`` as its interceptor would, without one.

    A server with an interceptor runs grpc.aio's interceptor chain (two more coroutines and a
    continuation) on every call, whatever the method; a server whose every handler comes wrapped
    like this runs none (the router's: ``ServiceServer(intercept=False)``). Measured: ~15 CPU-us
    per call of a bare grpc.aio server, about 5% of the router's unary call.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, observe: Observe) -> None:
        self.inner = inner
        self.observe = observe

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> MethodHandler | None:
        handler = self.inner.service(handler_call_details)
        if handler is None:
            return None
        return self.observe.wrapped(handler, handler_call_details.method)


_CALL_METRICS: dict[tuple[str, str, str, grpc.StatusCode], tuple[Any, Any]] = {}
"""(tier, method, model, code) -> its request counter and latency histogram: ``labels()`` hashes and
looks its labels up on every call (3.9 against 1.4 us a call, measured). Label values are bounded
(``ModelLabel``) and never removed; the cache is emptied should it ever hold MAX_CACHED_CALL_LABELS."""
MAX_CACHED_CALL_LABELS = 4096


def record_call(
    tier: str, method: str, model: str, code: grpc.StatusCode, started_s: float, span: Span | None = None
) -> None:
    """Count one call (any transport: a unary call or a relayed frame) and end its span, if it has one."""
    key = (tier, method, model, code)
    children = _CALL_METRICS.get(key)
    if children is None:
        if len(_CALL_METRICS) >= MAX_CACHED_CALL_LABELS:
            _CALL_METRICS.clear()
        children = _CALL_METRICS[key] = (
            metrics.REQUESTS.labels(tier, method, model, code.name), metrics.REQUEST_SECONDS.labels(tier, method, model)
        )
    children[0].inc()
    children[1].observe(time.perf_counter() - started_s)
    if span is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()


def _final_code(context: AioContext) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if code is None:
        if _deadline_passed(context):
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED if context.cancelled() else grpc.StatusCode.OK
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def _deadline_passed(context: AioContext) -> bool:
    remaining_s = context.time_remaining()
    return remaining_s is not None and remaining_s <= 0


def _is_abort(exc: BaseException) -> bool:
    """``context.abort`` raises this (a handler that set its own status)."""
    return type(exc).__name__ == "AbortError"
