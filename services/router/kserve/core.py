"""KServe v2 / Open Inference Protocol on the router, without a transport (no grpc, no KServe protobuf).

The gRPC front door (``grpc_api``) and the HTTP/REST one (``http``) decode a call into the value objects
of ``protocol``, call ``KServeFront``, and encode what it returns; errors are ``FlotillaError``s, mapped to
statuses where every error is (``flotilla.common.interceptors``). ``wire`` has the byte-level pieces
(a ModelInferRequest's model name off the wire, the binary form of a BYTES tensor).

**What the mesh takes and gives.** A model takes one input, ``IMAGE_UUID``: BYTES, shape ``[N]`` or
``[N, 1]``, each element the uuid of a JPEG already uploaded to the object store. It gives two outputs:
``PROBABILITIES`` (FP32 ``[N, classes]``, every class's probability by index) and ``LABELS`` (BYTES
``[N, top_k]``, class names best first). A request names none, some or both; none means both, as in
Triton. An output asked with the ``classification`` parameter (tritonclient's
``InferRequestedOutput(name, class_count=k)``) becomes BYTES ``[N, k]`` of ``"score:index:label"``, best
first, as Triton's classification extension gives it. Request parameters read: ``top_k`` (labels per
image, default ``DEFAULT_TOP_K``), ``priority`` and ``timeout`` (queue timeout in microseconds; the names
tritonclient's ``infer(priority=, timeout=)`` send); others are ignored.

**A request of N images** becomes N Classify calls through ``Forwarder.call`` at once (the batcher may
put them in different batches). The first to fail fails the whole request (KServe: one answer per
request) with its message prefixed by the image's place and uuid, and the others are cancelled. An image
the object store does not hold is INVALID_ARGUMENT here (the input names it), not NOT_FOUND, which a
KServe client reads as "no such model". At most ``batching.max_queue_size`` images per request: more
could never be queued at once.

**Readiness.** ``live()`` is always true; ``ready()`` is the router's own readiness (it has the fleet).
A model is ready when the fleet registers it and the router routes it: a model with no copy loaded is
ready too (its first call waits for a cold start, as the Flotilla API's does).

**The model repository extension.** ``repository_index`` lists every registered model the caller's key
may call, one entry per version, ``READY`` or ``UNAVAILABLE`` with the router's reason (the index of the
one repository the mesh has, the controller's registry). ``load`` loads a registered model as its first
call would (the controller's EnsureLoaded: a copy on a replica) and returns once a copy is ready; a
model with one ready returns at once. Only registered models load: a config or files in the request
are refused (``Unimplemented``; ``flotilla models deploy`` registers a spec). ``statistics`` is Triton's
statistics extension from the batchers' counters over the fleet (its docstring says what each figure
counts). Triton's methods the mesh has no meaning for are answered ``Unimplemented`` with what to use
instead (``unserved``): RepositoryModelUnload, shared memory, trace and log settings.

API, for both transports: ``KServeFront(router, fleet, ready, loader, statistics)`` with ``live()``, ``ready()``,
``server_metadata()``, ``model_ready(name, version)``, ``model_metadata(name, version)``,
``model_config(name, version)`` (``ModelConfigView.triton_json()`` is Triton's model configuration as
JSON), ``repository_index(may_call, ready_only)``, ``await load(name, parameters, time_remaining)``,
``await statistics(name, version, may_call, time_remaining)``,
``await infer(request, headers, time_remaining) -> InferResult`` and ``unserved(method)``. Unknown
model: ``ModelNotFound``; unknown version: ``NotFound``; a bad input, output, parameter or uuid:
``InvalidArgument`` naming it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from flotilla.api.v1 import controller_pb2, inference_pb2
from flotilla.common.ids import check_image_uuid, shorten
from flotilla.config import ModelSettings
from flotilla.errors import (
    BackendError,
    FlotillaError,
    InvalidArgument,
    InvalidImageUuid,
    ModelNotFound,
    NotFound,
    Unimplemented,
)
from flotilla.services.router.forward import TimeRemaining
from flotilla.services.router.kserve.protocol import (
    BYTES,
    CLASSIFICATION_PARAMETER,
    DEFAULT_TOP_K,
    EXTENSIONS,
    FP32,
    LABELS_OUTPUT,
    OUTPUTS,
    PLATFORM,
    PRIORITY_PARAMETER,
    PROBABILITIES_OUTPUT,
    READY,
    SERVER_NAME,
    TIMEOUT_PARAMETER,
    TOP_K_PARAMETER,
    UNAVAILABLE,
    UNKNOWN_DIM,
    UUID_INPUT,
    BatchStatisticsView,
    ConfigTensor,
    Duration,
    InferRequest,
    InferResult,
    ModelConfigView,
    ModelIndexEntry,
    ModelMetadata,
    ModelStatisticsView,
    OutputTensor,
    ParameterValue,
    RequestedOutput,
    ServerMetadata,
    TensorMetadata,
)

MAX_COUNT = 2**32 - 1
"""Largest ``top_k``, ``classification`` and ``priority`` (uint32s of the Classify request), and ``timeout``
in microseconds (about 71 minutes)."""

MAX_VERSION_DIGITS = 18
"""A model version is a number of at most this many digits (any more is no version a model has)."""


class Fleet(Protocol):
    """What the front reads of the fleet (``flotilla.common.fleet.FleetState``)."""

    @property
    def models(self) -> Mapping[str, controller_pb2.ModelStatus]: ...


class Router(Protocol):
    """What the front needs of the router's ``Forwarder``."""

    def check_model(self, model: str | None) -> None: ...

    def call(
        self, model: str | None, raw: bytes, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> Awaitable[bytes]: ...


class StatisticsSource(Protocol):
    """The fleet's request counters of a model ("": every registered one): the controller's GetModelStatistics."""

    def __call__(
        self, model: str, timeout_s: float | None
    ) -> Awaitable[Sequence[controller_pb2.ModelRequestStatistics]]: ...


class Loader(Protocol):
    """Loads a registered model and returns once a copy is ready (the controller's EnsureLoaded)."""

    def __call__(self, model: str, timeout_s: float | None) -> Awaitable[object]: ...


_SHARED_MEMORY = (
    "shared memory is not served here: a request carries the uuids of JPEGs in the object store, not tensors, "
    "and the preprocess workers share memory with Triton themselves (preprocess.triton_shared_memory)"
)
UNSERVED: Mapping[str, str] = {
    "RepositoryModelUnload": (
        "a model is not unloaded on a client's call: a model with min_copies 0 unloads by itself after "
        "controller.autoscale.scale_to_zero_idle_s without requests, and an operator removes one with "
        "`flotilla models undeploy NAME`"
    ),
    "SystemSharedMemoryStatus": _SHARED_MEMORY,
    "SystemSharedMemoryRegister": _SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _SHARED_MEMORY,
    "CudaSharedMemoryStatus": _SHARED_MEMORY,
    "CudaSharedMemoryRegister": _SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _SHARED_MEMORY,
    "TraceSetting": (
        "trace settings are not served: the mesh traces with OpenTelemetry, set in its configuration "
        "(observability.tracing; docs/operations.md, Traces)"
    ),
    "LogSettings": (
        "log settings are not served: each service logs to its stderr (kubectl logs), at DEBUG when started "
        "with `flotilla -v serve ...`"
    ),
}
"""Triton's methods the mesh does not serve, and what to use instead (their UNIMPLEMENTED message)."""


def _no_controller(method: str) -> Unimplemented:
    return Unimplemented(f"{method} is not served by this front: it has no controller to ask")


def _statistics_view(counted: controller_pb2.ModelRequestStatistics, version: str) -> ModelStatisticsView:
    def ns(seconds: float) -> int:
        return max(0, round(seconds * 1e9))

    succeeded = counted.succeeded_total
    return ModelStatisticsView(
        name=counted.name,
        version=version,
        last_inference_ms=round(counted.last_used_unix_s * 1000),
        inference_count=succeeded,
        execution_count=counted.batches_total,
        success=Duration(succeeded, ns(counted.success_s_total)),
        fail=Duration(counted.failed_total, ns(counted.fail_s_total)),
        queue=Duration(counted.dispatched_total, ns(counted.queue_wait_s_total)),
        compute_input=Duration(succeeded, 0),
        compute_infer=Duration(succeeded, ns(counted.compute_s_total)),
        compute_output=Duration(succeeded, 0),
        batch_stats=tuple(
            BatchStatisticsView(
                c.size, Duration(c.batches_total, 0), Duration(c.batches_total, ns(c.compute_s_total)),
                Duration(c.batches_total, 0),
            )
            for c in sorted(counted.batch_sizes, key=lambda c: c.size)
        ),
    )


def unserved(method: str) -> Unimplemented:
    """The error a call of Triton's ``method`` (a name in ``UNSERVED``) gets."""
    return Unimplemented(f"{method}: {UNSERVED[method]}")


class KServeFront:
    """The KServe v2 calls of the router, over its forwarder and the fleet it follows.

    ``ready``: whether the router has the fleet (is ready to route); ``live()`` is always true.
    A model is ready when the fleet holds it and the router routes it; a model with no copy loaded
    is ready too (its first call waits for a cold start).
    """

    def __init__(
        self, router: Router, fleet: Fleet, ready: Callable[[], bool], loader: Loader | None = None,
        statistics: StatisticsSource | None = None,
    ) -> None:
        """``loader``: the controller's EnsureLoaded; ``statistics``: its GetModelStatistics (None: that call
        is not served)."""
        self.router = router
        self.fleet = fleet
        self._ready = ready
        self._loader = loader
        self._statistics = statistics
        self._specs: dict[str, tuple[str, ModelSettings]] = {}
        """model -> (the spec JSON last parsed, its settings): parsed once per spec."""
        self._server = ServerMetadata(SERVER_NAME, _package_version(), list(EXTENSIONS))

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready()

    def server_metadata(self) -> ServerMetadata:
        return self._server

    def model_ready(self, name: str, version: str = "") -> bool:
        status = self.fleet.models.get(name)
        if status is None:
            return False
        try:
            self._version_number(name, self._spec(status), version)
            self.router.check_model(name)
        except FlotillaError:
            return False
        return True

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        _, spec = self._model(name)
        self._version_number(name, spec, version)
        classes = len(spec.labels) or UNKNOWN_DIM
        return ModelMetadata(
            name=name,
            versions=[str(v) for v in spec.versions],
            platform=PLATFORM,
            inputs=[TensorMetadata(UUID_INPUT, BYTES, (UNKNOWN_DIM, 1))],
            outputs=[
                TensorMetadata(PROBABILITIES_OUTPUT, FP32, (UNKNOWN_DIM, classes)),
                TensorMetadata(LABELS_OUTPUT, BYTES, (UNKNOWN_DIM, UNKNOWN_DIM)),
            ],
        )

    def model_config(self, name: str, version: str = "") -> ModelConfigView:
        _, spec = self._model(name)
        self._version_number(name, spec, version)
        batching = spec.batching
        return ModelConfigView(
            name=name,
            platform=PLATFORM,
            max_batch_size=batching.max_batch_size,
            inputs=[ConfigTensor(UUID_INPUT, "TYPE_STRING", (1,))],
            outputs=[
                ConfigTensor(PROBABILITIES_OUTPUT, "TYPE_FP32", (len(spec.labels) or UNKNOWN_DIM,)),
                ConfigTensor(LABELS_OUTPUT, "TYPE_STRING", (UNKNOWN_DIM,)),
            ],
            preferred_batch_sizes=list(batching.preferred_batch_sizes),
            max_queue_delay_us=batching.max_queue_delay_us,
            priority_levels=batching.priority_levels,
            default_priority_level=batching.default_priority_level,
            timeout_action=batching.timeout_action,
            default_timeout_us=batching.default_timeout_us,
            max_queue_size=batching.max_queue_size,
        )

    def repository_index(self, may_call: Callable[[str], bool], *, ready_only: bool = False) -> list[ModelIndexEntry]:
        """Every registered model ``may_call`` accepts (the caller's key's scope), by name, one entry per
        version: ``READY`` when the router routes it (a model at zero copies is ready: its first call is a
        held cold start), else ``UNAVAILABLE`` with the router's reason. ``ready_only``: the ready ones."""
        entries: list[ModelIndexEntry] = []
        for name in sorted(self.fleet.models):
            if not may_call(name):
                continue
            spec = self._spec(self.fleet.models[name])
            try:
                self.router.check_model(name)
                state, reason = READY, ""
            except FlotillaError as exc:
                state, reason = UNAVAILABLE, exc.message
            if ready_only and state != READY:
                continue
            entries.extend(ModelIndexEntry(name, str(version), state, reason) for version in spec.versions)
        return entries

    async def load(self, name: str, parameters: Mapping[str, object], time_remaining: TimeRemaining) -> None:
        """Load registered model ``name`` (a copy on a replica) and return once a copy is ready; at once
        when one is. ``parameters``: the request's (Triton's ``config``, ``file:...``); any is refused."""
        self._model(name)
        if parameters:
            raise Unimplemented(
                f"RepositoryModelLoad with parameters ({', '.join(sorted(map(shorten, parameters)))}): the mesh "
                "loads registered models as they are; register a changed spec with `flotilla models deploy`"
            )
        if self._loader is None:
            raise _no_controller("RepositoryModelLoad")
        await self._loader(name, time_remaining())

    async def statistics(
        self, name: str, version: str, may_call: Callable[[str], bool], time_remaining: TimeRemaining
    ) -> list[ModelStatisticsView]:
        """Triton's ModelStatistics of ``name`` ("": every registered model ``may_call`` accepts), from the
        batchers' counters summed over the fleet since the controller started. The counters are the model's,
        over all its versions: an entry carries the version asked (checked), else "". A request is counted
        when its batcher answers it: ``success`` and ``fail`` from its arrival in the queue, ``queue`` to its
        dispatch, ``compute_infer`` from dispatch to answer (the batch at a worker and on Triton: fetch,
        decode, inference; ``compute_input`` and ``compute_output`` are 0 ns, counted in it)."""
        if name:
            _, spec = self._model(name)
            self._version_number(name, spec, version)
        if self._statistics is None:
            raise _no_controller("ModelStatistics")
        counted = await self._statistics(name, time_remaining())
        return [_statistics_view(c, version if name else "") for c in counted if name or may_call(c.name)]

    async def infer(
        self, request: InferRequest, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> InferResult:
        """Classify every image of ``request``; ``headers`` go to the batcher as they are
        (``forward.passed_headers`` makes them from a gRPC caller's)."""
        status, spec = self._model(request.model)  # unknown model: NOT_FOUND before any other check
        self.router.check_model(request.model)
        version = self._version_number(request.model, spec, request.version)
        uuids = _image_uuids(request, spec.batching.max_queue_size)
        outputs = _outputs(request.outputs)
        top_k = _int_parameter(request.parameters, TOP_K_PARAMETER) or DEFAULT_TOP_K
        asked_k = max([top_k, *(o.classification for o in outputs)])
        want_scores = any(o.name == PROBABILITIES_OUTPUT and not o.classification for o in outputs)
        template = inference_pb2.ClassifyRequest(
            model_name=request.model,
            top_k=asked_k,
            model_version=version,
            all_scores=want_scores,
            priority=_int_parameter(request.parameters, PRIORITY_PARAMETER),
            timeout_us=_int_parameter(request.parameters, TIMEOUT_PARAMETER),
        )
        bodies = []
        for i, uuid in enumerate(uuids):
            template.image_uuid = uuid
            template.request_id = request.id if len(uuids) == 1 or not request.id else f"{request.id}[{i}]"
            bodies.append(template.SerializeToString())
        answers = await self._classify_all(request.model, bodies, uuids, headers, time_remaining)
        responses = [inference_pb2.ClassifyResponse.FromString(raw) for raw in answers]
        ran = str(version or status.default_version or spec.served_version)
        return InferResult(
            request.model, ran, request.id, [_output(o, responses, top_k, request.model) for o in outputs]
        )

    async def _classify_all(
        self,
        model: str,
        bodies: list[bytes],
        uuids: list[str],
        headers: Sequence[tuple[str, str]],
        time_remaining: TimeRemaining,
    ) -> list[bytes]:
        """Every image's answer, in order; the first failure (the lowest place among those failing at once)
        fails them all, and the calls still out are cancelled."""
        if len(bodies) == 1:
            try:
                return [await self.router.call(model, bodies[0], headers, time_remaining)]
            except FlotillaError as exc:
                raise _image_error(exc, 0, uuids[0]) from None
        tasks = [asyncio.ensure_future(self.router.call(model, body, headers, time_remaining)) for body in bodies]
        place: dict[asyncio.Future[bytes], int] = {task: i for i, task in enumerate(tasks)}
        try:
            pending: set[asyncio.Future[bytes]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failed = sorted(place[t] for t in done if t.exception() is not None)
                if failed:
                    error = tasks[failed[0]].exception()
                    if isinstance(error, FlotillaError):
                        raise _image_error(error, failed[0], uuids[failed[0]]) from None
                    if error is not None:
                        raise error
            return [t.result() for t in tasks]
        finally:
            for task in tasks:
                task.cancel()  # no-op for those done; the rest (a failure, or the caller gone) are withdrawn
            await asyncio.gather(*tasks, return_exceptions=True)

    def _model(self, name: str) -> tuple[controller_pb2.ModelStatus, ModelSettings]:
        if not name:
            raise InvalidArgument("no model named; set the request's model_name")
        status = self.fleet.models.get(name)
        if status is None:
            self.router.check_model(name)  # its message: missing name, or the models served
            raise ModelNotFound(f"model {shorten(name)!r} is not registered")
        return status, self._spec(status)

    def _spec(self, status: controller_pb2.ModelStatus) -> ModelSettings:
        cached = self._specs.get(status.name)
        if cached is not None and cached[0] == status.spec_json:
            return cached[1]
        spec = ModelSettings.model_validate_json(status.spec_json)
        self._specs[status.name] = (status.spec_json, spec)
        return spec

    @staticmethod
    def _version_number(name: str, spec: ModelSettings, version: str) -> int:
        """The version number a request names (0: the default), checked against the live ones."""
        if not version:
            return 0
        # ASCII digits only, and few: "²" passes isdigit() and fails int() (found by fuzzing), as do
        # numbers past int()'s 4300 digits.
        if not (version.isascii() and version.isdigit() and len(version) <= MAX_VERSION_DIGITS) or int(version) < 1:
            raise InvalidArgument(f"model version {shorten(version)!r} is not a positive number")
        number = int(version)
        if number not in spec.versions:
            raise NotFound(f"model {name!r} has no version {number}; live versions: {spec.versions}")
        return number


def _image_uuids(request: InferRequest, max_images: int) -> list[str]:
    """The request's image uuids (canonical), after checking its one input."""
    inputs = {t.name: t for t in request.inputs}
    unexpected = [name for name in inputs if name != UUID_INPUT]
    if unexpected:
        raise InvalidArgument(
            f"unexpected inference input {shorten(unexpected[0])!r} for model {request.model!r}; "
            f"it takes one input, {UUID_INPUT} ({BYTES}, shape [N] or [N,1]: uploaded images' uuids)"
        )
    tensor = inputs.get(UUID_INPUT)
    if tensor is None or len(request.inputs) != 1:
        raise InvalidArgument(
            f"model {request.model!r} expects one input {UUID_INPUT} ({BYTES}, shape [N] or [N,1]), "
            f"got {len(request.inputs)} inputs"
        )
    if tensor.datatype != BYTES:
        raise InvalidArgument(
            f"inference input {UUID_INPUT} data-type is {shorten(tensor.datatype)!r}, but model "
            f"{request.model!r} expects {BYTES!r}"
        )
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidArgument(
            f"inference input {UUID_INPUT} has shape {shape}; model {request.model!r} expects [N] or [N,1], N >= 1"
        )
    if shape[0] != len(tensor.values):
        raise InvalidArgument(
            f"inference input {UUID_INPUT} has shape {shape} but {len(tensor.values)} elements"
        )
    if shape[0] > max_images:
        raise InvalidArgument(
            f"inference input {UUID_INPUT} has {shape[0]} images; model {request.model!r} queues at most "
            f"{max_images} (batching.max_queue_size): send them in several requests"
        )
    uuids = []
    for i, value in enumerate(tensor.values):
        try:
            uuids.append(check_image_uuid(value.decode("utf-8")))
        except UnicodeDecodeError:
            raise InvalidImageUuid(f"{UUID_INPUT}[{i}] is not UTF-8 text: {shorten(repr(value))}") from None
        except InvalidImageUuid as exc:
            raise InvalidImageUuid(f"{UUID_INPUT}[{i}]: {exc.message}") from None
    return uuids


def _outputs(requested: Sequence[RequestedOutput]) -> list[RequestedOutput]:
    if not requested:
        return [RequestedOutput(name) for name in OUTPUTS]
    for output in requested:
        if output.name not in OUTPUTS:
            raise InvalidArgument(
                f"unexpected inference output {shorten(output.name)!r}; outputs: {', '.join(OUTPUTS)}"
            )
        if not 0 <= output.classification <= MAX_COUNT:
            raise InvalidArgument(f"output {output.name}: {CLASSIFICATION_PARAMETER} must be from 0 to {MAX_COUNT}")
        if output.classification and output.name != PROBABILITIES_OUTPUT:
            raise InvalidArgument(
                f"output {output.name} is {BYTES}: {CLASSIFICATION_PARAMETER} applies to {PROBABILITIES_OUTPUT}"
            )
    return list(requested)


def _int_parameter(parameters: Mapping[str, ParameterValue], name: str) -> int:
    """A non-negative integer parameter (0 when absent)."""
    value = parameters.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise InvalidArgument(f"parameter {name!r} must be an integer from 0 to {MAX_COUNT}, got {shorten(repr(value))}")
    return value


def _image_error(exc: FlotillaError, place: int, uuid: str) -> FlotillaError:
    """``exc`` of one image as the whole request's error: its message names the image. An image the store
    does not hold (NOT_FOUND from below) is a bad input here, not a missing model."""
    message = f"{UUID_INPUT}[{place}] {uuid}: {exc.message}"
    if isinstance(exc, NotFound) and not isinstance(exc, ModelNotFound) and exc.origin:
        return InvalidArgument(message, origin=exc.origin)
    exc.message = message
    exc.args = (message,)
    return exc


def _output(
    output: RequestedOutput, responses: list[inference_pb2.ClassifyResponse], top_k: int, model: str
) -> OutputTensor:
    n = len(responses)
    if output.classification:
        k = min([output.classification, *(len(r.classes) for r in responses)])
        data = [f"{c.score:f}:{c.index}:{c.label}".encode() for r in responses for c in r.classes[:k]]
        return OutputTensor(output.name, BYTES, (n, k), data)
    if output.name == LABELS_OUTPUT:
        k = min([top_k, *(len(r.classes) for r in responses)])
        return OutputTensor(output.name, BYTES, (n, k), [c.label.encode() for r in responses for c in r.classes[:k]])
    classes = len(responses[0].scores)
    if not classes or any(len(r.scores) != classes for r in responses):
        raise BackendError(f"model {model!r} answered without every class's score for {PROBABILITIES_OUTPUT}")
    scores = np.array([list(r.scores) for r in responses], dtype=np.float32)
    return OutputTensor(output.name, FP32, (n, classes), scores)


def _package_version() -> str:
    try:
        return importlib.metadata.version("flotilla")
    except importlib.metadata.PackageNotFoundError:
        return ""
