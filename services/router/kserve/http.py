"""KServe v2 over HTTP/REST: the router's ASGI app (raw ASGI; no framework, no server library).

Routes (the Open Inference Protocol's REST API, with Triton's ``config`` and versioned paths, which
tritonclient.http calls)::

    GET  /v2/health/live | /v2/health/ready               no key; 200 true, 400 false, empty body
    GET  /v2                                              server metadata
    GET  /v2/models/{name}[/versions/{v}]                 model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready           no body; 200 ready, 400 not
    GET  /v2/models/{name}[/versions/{v}]/config          Triton's model configuration (JSON)
    POST /v2/models/{name}[/versions/{v}]/infer           inference (``http_json``: JSON, binary tensor data)
    POST /v2/repository/index                             the registered models the key may call, by version,
                                                          READY or UNAVAILABLE (body ``{"ready": true}``: ready only)
    POST /v2/repository/models/{name}/load                a copy loaded; 200 once one is ready (no parameters)

    GET  /v2/models[/{name}[/versions/{v}]]/stats          Triton's statistics (``core.KServeFront.statistics``)

Triton's other routes (``/v2/repository/models/{name}/unload``,
``/v2/systemsharedmemory/...``, ``/v2/cudasharedmemory/...``, ``/v2/trace/setting``, ``/v2/logging``) are
501 with what to use instead (``core.UNSERVED``), after the key.

Every call but the health checks needs ``authorization: Bearer <api key>`` allowed the model it names
(``Forwarder.authorize``; an API key over its rate is 429 with ``Retry-After``)
and takes a place in the router's admission limit, shared with its gRPC calls (``CallObserver``: the
same limit, request metrics and spans as a gRPC call; methods ``HTTP <KServe method>``). A caller may
bound an infer call with ``x-flotilla-timeout-ms`` (the deadline gRPC callers set; the protocol's
``timeout`` parameter is the queue timeout, which the core passes to the batcher).

**Errors** are the protocol's: ``{"error": "<message>"}`` with the HTTP status of the error's code,
mapped in one place (``http_status``) as google.rpc.Code maps codes to HTTP (INVALID_ARGUMENT 400,
UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503,
DEADLINE_EXCEEDED 504, ...). Anything not a ``FlotillaError`` is 500 with a generic message, the
traceback in the router's log. Malformed JSON is 400; a body over ``max_body_bytes`` 413.

Why raw ASGI, not Starlette: a few fixed routes matched by regular expressions, bodies read whole
and parsed by ``http_json``; a framework would add a dependency and a request and response object per
call for nothing the app uses. The app knows no server: ``services.router.http_server`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc

from flotilla.common import tracing
from flotilla.common.ids import shorten
from flotilla.common.interceptors import CallObserver, ObservedCall
from flotilla.common.wire import AUTH_HEADER
from flotilla.errors import Code, DeadlineExceeded, FlotillaError, MalformedRequest
from flotilla.services.router.forward import TimeRemaining, no_deadline, passed_headers
from flotilla.services.router.kserve import http_json
from flotilla.services.router.kserve.core import UNSERVED, unserved
from flotilla.services.router.kserve.protocol import (
    BATCH_DURATIONS,
    DURATIONS,
    InferRequest,
    InferResult,
    ModelConfigView,
    ModelIndexEntry,
    ModelMetadata,
    ModelStatisticsView,
    ServerMetadata,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
J = TypeVar("J", bool, dict[str, Any])

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 4 * 1024 * 1024
"""A request body's limit by default (the gRPC servers' message limit): an infer body names uuids."""
TIMEOUT_HEADER = "x-flotilla-timeout-ms"
"""Milliseconds the caller waits for an infer answer; past it, 504. Absent: no deadline."""
HEADER_LENGTH_HEADER = b"inference-header-content-length"
JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/octet-stream"
TIER = "router"

HTTP_STATUS = {
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}
"""A status code's HTTP status, as google.rpc.Code documents it."""

_MODEL_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>[^/]+))?/?")
_ACTIONS = {"": ("GET", "ModelMetadata"), "ready": ("GET", "ModelReady"), "config": ("GET", "ModelConfig"),
            "infer": ("POST", "ModelInfer"), "stats": ("GET", "ModelStatistics")}
"""The last path segment of a model's routes: its HTTP method and KServe method."""
_FIXED_ROUTES = {
    "/v2": ("GET", "ServerMetadata"),
    "/v2/repository/index": ("POST", "RepositoryIndex"),
    "/v2/models/stats": ("GET", "ModelStatistics"),  # before a model named "stats", as in Triton
    "/v2/trace/setting": ("", "TraceSetting"),
    "/v2/logging": ("", "LogSettings"),
}
"""Routes of no model: their HTTP method ("": any; the method is not served) and KServe method."""
_REPOSITORY_MODEL_PATH = re.compile(r"/v2/repository/models/(?P<name>[^/]+)/(?P<action>load|unload)/?")
_SHARED_MEMORY_PATH = re.compile(r"/v2/(?P<kind>system|cuda)sharedmemory(?:/region/[^/]+)?/(?P<action>status|register|unregister)/?")


class Front(Protocol):
    """What the app needs of ``core.KServeFront``."""

    def live(self) -> bool: ...

    def ready(self) -> bool: ...

    def server_metadata(self) -> ServerMetadata: ...

    def model_ready(self, name: str, version: str = "") -> bool: ...

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata: ...

    def model_config(self, name: str, version: str = "") -> ModelConfigView: ...

    def infer(
        self, request: InferRequest, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> Awaitable[InferResult]: ...

    def repository_index(self, may_call: Callable[[str], bool], *, ready_only: bool = False) -> list[ModelIndexEntry]: ...

    def load(self, name: str, parameters: Mapping[str, object], time_remaining: TimeRemaining) -> Awaitable[None]: ...

    def statistics(
        self, name: str, version: str, may_call: Callable[[str], bool], time_remaining: TimeRemaining
    ) -> Awaitable[list[ModelStatisticsView]]: ...


KeyScope = Callable[[str | None], Callable[[str], bool]]
"""Which models the key of an ``authorization`` header may call (``Forwarder.scope``)."""


def every_model(authorization: str | None) -> Callable[[str], bool]:
    """The scope of an app given none: every model (the key was checked by ``authorize``)."""
    return lambda model: True


class HttpError(FlotillaError):
    """A refusal only HTTP has (no such route, wrong method, body too large): its own status."""

    def __init__(self, status: int, code: Code, message: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = list(headers)


def http_status(exc: BaseException) -> tuple[int, str, Code]:
    """The HTTP status, ``error`` message and status code (for the request metrics) a caller gets for
    ``exc``: the one place errors become HTTP answers."""
    if isinstance(exc, HttpError):
        return exc.status, exc.message, exc.code
    if isinstance(exc, FlotillaError):
        return HTTP_STATUS.get(exc.code, 500), exc.message, exc.code
    log.error("%s: unhandled error in an HTTP call", TIER, exc_info=exc)
    return 500, f"internal error in the {TIER}; see its log", Code.INTERNAL


class KServeHttp:
    """The ASGI app: one instance per router process, over its ``KServeFront`` and ``Forwarder``."""

    def __init__(
        self,
        front: Front,
        authorize: Callable[[str | None, str | None], object],
        *,
        scope: KeyScope = every_model,
        observer: CallObserver | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        """``authorize``: ``Forwarder.authorize``; ``scope``: ``Forwarder.scope`` (the repository index
        lists the models a key may call)."""
        self.front = front
        self.authorize = authorize
        self.scope = scope
        self.observer = observer or CallObserver(TIER)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: no such thing here (the server closes the connection)
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path in ("/v2/health/live", "/v2/health/ready"):
            # Health needs no key and no place in the admission limit: an overloaded router is alive.
            if method != "GET":
                await _error(send, _not_allowed("GET"))
                return
            healthy = self.front.live() if path.endswith("live") else self.front.ready()
            await _respond(send, 200 if healthy else 400)
            return
        try:
            kserve_method, model, version = _route(method, path)
        except HttpError as exc:
            await _error(send, exc)
            return
        call = self.observer.begin(f"HTTP {kserve_method}", model, headers.items())
        code = Code.OK
        try:
            if call.refusal is not None:
                raise call.refusal
            self.authorize(headers.get(AUTH_HEADER), model or None)
            if kserve_method in UNSERVED:
                raise unserved(kserve_method)
            if call.span is None:
                await self._answer(send, receive, headers, kserve_method, model, version)
            else:
                with tracing.use_span(call.span, end_on_exit=False):
                    await self._answer(send, receive, headers, kserve_method, model, version)
        except _ClientGone:
            code = Code.CANCELLED
        except asyncio.CancelledError:
            code = Code.CANCELLED
            raise
        except Exception as exc:  # the one place an HTTP call's failure becomes its answer
            status, message, code = http_status(exc)
            await _error(send, exc, status, message)
        finally:
            self._end(call, code)

    async def _answer(
        self, send: Send, receive: Receive, headers: dict[str, str], kserve_method: str, model: str, version: str
    ) -> None:
        if kserve_method == "ServerMetadata":
            await _respond_json(send, _server_json(self.front.server_metadata()))
        elif kserve_method == "ModelMetadata":
            await _respond_json(send, _model_json(self.front.model_metadata(model, version)))
        elif kserve_method == "ModelReady":
            await _respond(send, 200 if self.front.model_ready(model, version) else 400)
        elif kserve_method == "ModelConfig":
            await _respond_json(send, self.front.model_config(model, version).triton_json())
        elif kserve_method == "RepositoryIndex":
            ready_only = _json_field(await self._body(receive, headers), "ready", bool, False)
            entries = self.front.repository_index(self.scope(headers.get(AUTH_HEADER)), ready_only=ready_only)
            await _respond(send, 200, json.dumps([_index_json(e) for e in entries], separators=(",", ":")).encode())
        elif kserve_method == "ModelStatistics":
            time_remaining, deadline = _deadline(headers)
            views = await _until_answered(
                self.front.statistics(model, version, self.scope(headers.get(AUTH_HEADER)), time_remaining),
                receive, deadline,
            )
            await _respond_json(send, {"model_stats": [_statistics_json(v) for v in views]})
        elif kserve_method == "RepositoryModelLoad":
            parameters = _json_field(await self._body(receive, headers), "parameters", dict, {})
            time_remaining, deadline = _deadline(headers)
            await _until_answered(self.front.load(model, parameters, time_remaining), receive, deadline)
            await _respond(send, 200)
        else:
            await self._infer(send, receive, headers, model, version)

    async def _infer(self, send: Send, receive: Receive, headers: dict[str, str], model: str, version: str) -> None:
        length = http_json.header_length(headers)
        time_remaining, deadline = _deadline(headers)
        body = await self._body(receive, headers)
        decoded = http_json.decode_infer(model, version, body, length)
        result = await _until_answered(
            self.front.infer(decoded.request, passed_headers(()), time_remaining), receive, deadline
        )
        answer, header_length = http_json.encode_result(result, decoded)
        if header_length is None:
            await _respond(send, 200, answer)
        else:
            await _respond(send, 200, answer, BINARY_TYPE, [(HEADER_LENGTH_HEADER, str(header_length).encode())])

    async def _body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        declared = headers.get("content-length")
        # A longer number than the limit's is over it; isascii: "²" passes isdigit() and fails int() (fuzzing).
        if (declared is not None and declared.isascii() and declared.isdigit()
                and (len(declared) > len(str(self.max_body_bytes)) or int(declared) > self.max_body_bytes)):
            raise _too_large(self.max_body_bytes)
        encoding = headers.get("content-encoding", "identity")
        if encoding != "identity":
            raise HttpError(415, Code.INVALID_ARGUMENT,
                            f"content-encoding {shorten(encoding)!r} is not supported; send the body as is")
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _end(self, call: ObservedCall, code: Code) -> None:
        self.observer.end(call, grpc.StatusCode[code.name])


class _ClientGone(Exception):
    """The client closed the connection before it was answered."""


async def _until_answered(work: Awaitable[T], receive: Receive, deadline: float | None) -> T:
    """What ``work`` returns (or raises); ``_ClientGone`` when the client goes first, ``DeadlineExceeded`` at
    ``deadline`` (the loop's time; None: none). Either way the work is cancelled (its calls below withdrawn)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        timeout_s = None if deadline is None else deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait((task, gone), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # a no-op once it is done
        gone.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task in done:
        return task.result()  # or its error
    if gone in done:
        raise _ClientGone
    raise DeadlineExceeded(f"{TIMEOUT_HEADER} passed before the mesh answered")


def _json_field(body: bytes, name: str, kind: type[J], default: J) -> J:
    """Field ``name`` of a JSON object body (an empty body: ``default``); ``MalformedRequest`` when the body
    is not a JSON object or the field is not a ``kind``."""
    if not body.strip():
        return default
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRequest(f"the request body is not JSON: {shorten(str(exc))}") from None
    if not isinstance(document, dict):
        raise MalformedRequest("the request body must be a JSON object")
    value = document.get(name, default)
    if not isinstance(value, kind):
        raise MalformedRequest(f"{name!r} must be a JSON {'boolean' if kind is bool else 'object'}")
    return value


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (once the body is read, the server's next message is that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _route(method: str, path: str) -> tuple[str, str, str]:
    """(KServe method, model, version) of a call; HttpError when there is no such route."""
    fixed = _FIXED_ROUTES.get(path.rstrip("/") if len(path) > 1 else path)
    if fixed is not None:
        allowed, kserve_method = fixed
        _check_method(method, allowed)
        return kserve_method, "", ""
    if match := _REPOSITORY_MODEL_PATH.fullmatch(path):
        _check_method(method, "POST")
        return f"RepositoryModel{match.group('action').capitalize()}", match.group("name"), ""
    if match := _SHARED_MEMORY_PATH.fullmatch(path):
        return f"{match.group('kind').capitalize()}SharedMemory{match.group('action').capitalize()}", "", ""
    match = _MODEL_PATH.fullmatch(path)
    action = (match.group("action") or "") if match else None
    if match is None or action not in _ACTIONS:
        raise HttpError(404, Code.NOT_FOUND, f"no such KServe v2 route: {shorten(path)!r}")
    allowed, kserve_method = _ACTIONS[action]
    _check_method(method, allowed)
    return kserve_method, match.group("name"), match.group("version") or ""


def _check_method(method: str, allowed: str) -> None:
    """405 unless the call's HTTP method is ``allowed`` ("": any)."""
    if allowed and method != allowed:
        raise _not_allowed(allowed)


def _deadline(headers: dict[str, str]) -> tuple[TimeRemaining, float | None]:
    """The call's time left and its deadline on the loop's clock, from ``TIMEOUT_HEADER`` (none: no deadline)."""
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return no_deadline, None
    try:
        timeout_ms = float(value)
    except ValueError:
        timeout_ms = -1.0
    if not 0 < timeout_ms < float("inf"):
        raise MalformedRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {shorten(value)!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_ms / 1000

    def time_remaining() -> float:
        return deadline - loop.time()

    return time_remaining, deadline


def _not_allowed(allowed: str) -> HttpError:
    return HttpError(405, Code.UNIMPLEMENTED, f"method not allowed; use {allowed}", [(b"allow", allowed.encode())])


def _too_large(limit: int) -> HttpError:
    return HttpError(413, Code.RESOURCE_EXHAUSTED, f"request body is over {limit} bytes")


def _server_json(metadata: ServerMetadata) -> dict[str, Any]:
    return {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)}


def _model_json(metadata: ModelMetadata) -> dict[str, Any]:
    def tensors(items: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {"name": metadata.name, "versions": list(metadata.versions), "platform": metadata.platform,
            "inputs": tensors(metadata.inputs), "outputs": tensors(metadata.outputs)}


def _statistics_json(view: ModelStatisticsView) -> dict[str, Any]:
    """Triton's JSON of a model's statistics (its field names, counts and nanoseconds as numbers)."""
    return {
        "name": view.name, "version": view.version, "last_inference": view.last_inference_ms,
        "inference_count": view.inference_count, "execution_count": view.execution_count,
        "inference_stats": {
            field: {"count": getattr(view, field).count, "ns": getattr(view, field).ns} for field in DURATIONS
        },
        "batch_stats": [
            {"batch_size": batch.batch_size, **{
                field: {"count": getattr(batch, field).count, "ns": getattr(batch, field).ns} for field in BATCH_DURATIONS
            }}
            for batch in view.batch_stats
        ],
    }


def _index_json(entry: ModelIndexEntry) -> dict[str, str]:
    document = {"name": entry.name, "version": entry.version, "state": entry.state}
    if entry.reason:
        document["reason"] = entry.reason
    return document


async def _respond_json(send: Send, document: dict[str, Any]) -> None:
    await _respond(send, 200, json.dumps(document, separators=(",", ":")).encode())


async def _error(send: Send, exc: BaseException, status: int = 0, message: str = "") -> None:
    if not status:
        status, message, _ = http_status(exc)
    headers = list(exc.headers) if isinstance(exc, HttpError) else []
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:  # whole seconds (RFC 9110), at least 1
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()))
    await _respond(send, status, json.dumps({"error": message}).encode(), JSON_TYPE, headers)


async def _respond(
    send: Send, status: int, body: bytes = b"", content_type: bytes = JSON_TYPE,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop (the router owns what the app uses); a server that asks is told so."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
