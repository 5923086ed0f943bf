"""gRPC layer of the batcher role: one service per model.

Takes Classify calls two ways, through the same parsing and queue: as
frames on the router's ``Relay`` streams (``ClassifierHandler.start``) and
as unary ``flotilla.api.v1.ImageClassifier/Classify`` calls from callers
that reach the batcher directly. Bodies arrive as raw bytes so that a
malformed one is answered here with INVALID_ARGUMENT (the router forwards
bodies it never parses). Requests join the model's
BatchQueue; each formed batch goes to a preprocess worker chosen by an
EndpointPool (one call per model version in the batch), and every request
gets its own item's answer.

At start the batcher registers with the controller, which answers with the
model's spec (its batching policy); it re-registers every
``REGISTER_INTERVAL_S`` so a restarted controller routes to it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from flotilla.api.v1 import (
    batcher_pb2_grpc,
    controller_pb2,
    controller_pb2_grpc,
    inference_pb2,
    preprocess_pb2,
    preprocess_pb2_grpc,
    relay_pb2,
)
from flotilla.common import metrics, tracing
from flotilla.common.clock import Clock, MonotonicClock
from flotilla.common.ids import check_image_uuid
from flotilla.common.interceptors import AdmissionLimit
from flotilla.common.relay import RelayServicer
from flotilla.common.server import GrpcPeer, ServiceServer, serve_until_signal
from flotilla.common.status import error_from_rpc
from flotilla.common.wire import (
    BATCHER_ADMIN_SERVICE,
    CLASSIFIER_SERVICE,
    CLASSIFY_METHOD,
    MODEL_HEADER,
    PREPROCESSOR_SERVICE,
    RELAY_SERVICE,
)
from flotilla.config import FlotillaSettings, ModelSettings
from flotilla.errors import FlotillaError, InvalidArgument, MalformedRequest, Unimplemented, error_from_code
from flotilla.services.backend_pool.discovery import pool_following
from flotilla.services.backend_pool.pool import Endpoint, EndpointPool, pool_from_settings
from flotilla.services.batcher.admin import BatcherAdminServicer
from flotilla.services.batcher.queue import BatchQueue, Ticket

log = logging.getLogger(__name__)

REGISTER_INTERVAL_S = 1.0
REGISTER_TIMEOUT_S = 60.0
WAIT_FOR_MODEL_POLL_S = 2.0


class PreprocessDispatcher:
    """Sends one batch to a preprocess worker and splits the answer per item."""

    def __init__(
        self,
        model: str,
        pool: EndpointPool[GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]],
        *,
        batch_timeout_s: float,
        clock: Clock,
        default_version: int = 0,
    ) -> None:
        self.model = model
        self.pool = pool
        self.batch_timeout_s = batch_timeout_s
        self.clock = clock
        self.default_version = default_version
        """The version items that name none (0) run: the batch span says which version ran."""

    async def __call__(
        self, items: list[preprocess_pb2.BatchItem], deadline_s: float | None
    ) -> Sequence[inference_pb2.ClassifyResponse | FlotillaError]:
        """One worker call per model version in the batch (usually one), answers in item order."""
        by_version: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_version.setdefault(item.model_version, []).append(i)
        if len(by_version) == 1:
            return await self._send(items, next(iter(by_version)), deadline_s)
        results: list[inference_pb2.ClassifyResponse | FlotillaError | None] = [None] * len(items)
        parts = await asyncio.gather(
            *(self._send([items[i] for i in idx], version, deadline_s) for version, idx in by_version.items()),
            return_exceptions=True,
        )
        for idx, part in zip(by_version.values(), parts, strict=True):
            for row, i in enumerate(idx):
                if isinstance(part, FlotillaError):
                    results[i] = part
                elif isinstance(part, BaseException):
                    raise part
                else:
                    results[i] = part[row]
        return results  # type: ignore[return-value]

    async def _send(
        self, items: list[preprocess_pb2.BatchItem], version: int, deadline_s: float | None
    ) -> Sequence[inference_pb2.ClassifyResponse | FlotillaError]:
        request = preprocess_pb2.ProcessBatchRequest(model_name=self.model, items=items, model_version=version)
        answered_by = ""

        async def on(
            endpoint: Endpoint[GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]],
        ) -> preprocess_pb2.ProcessBatchResponse:
            timeout_s = self.batch_timeout_s if deadline_s is None else max(deadline_s - self.clock.now(), 0.001)
            nonlocal answered_by
            assert endpoint.client.stub is not None
            answered_by = endpoint.address
            batch_span.set_attribute("flotilla.worker", endpoint.address)
            try:
                return await endpoint.client.stub.ProcessBatch(request, timeout=timeout_s, metadata=tracing.inject())
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, f"preprocess worker {endpoint.address}") from exc

        # One span per batch, linked to the span of every request that rides in it.
        with tracing.span(
            f"batch {self.model}",
            links=tracing.links_from(item.traceparent for item in items),
            attributes={"flotilla.model": self.model, "flotilla.batch_size": len(items),
                        "flotilla.model_version": version or self.default_version},
        ) as batch_span:
            reply = await self.pool.call(on, deadline_s=deadline_s)
            batch_span.set_attribute("flotilla.replica", reply.backend)
        results: list[inference_pb2.ClassifyResponse | FlotillaError] = []
        worker = f"preprocess worker {answered_by}"
        for result in reply.results:
            if result.HasField("response"):
                results.append(result.response)
            else:  # an image's failure, found by the worker or below it: never this batcher's own
                error = result.error
                results.append(error_from_code(error.code, error.message, error.origin or worker))
        return results


class ClassifierHandler:
    """Parses Classify requests and waits for their place in a batch."""

    def __init__(
        self,
        model: str,
        queue: BatchQueue[preprocess_pb2.BatchItem, inference_pb2.ClassifyResponse],
        clock: Clock,
        versions: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.queue = queue
        self.clock = clock
        self.versions = list(versions)
        """Live versions; empty accepts any (the worker checks)."""

    def _parse(self, raw: bytes, header_model: str | None) -> inference_pb2.ClassifyRequest:
        try:
            request = inference_pb2.ClassifyRequest.FromString(raw)
        except DecodeError as exc:
            raise MalformedRequest(
                f"request body ({len(raw)} bytes) is not a valid {inference_pb2.ClassifyRequest.DESCRIPTOR.full_name}: {exc}"
            ) from exc
        for source, named in (("header " + MODEL_HEADER, header_model), ("model_name", request.model_name)):
            if named and named != self.model:
                raise InvalidArgument(f"{source} says {named!r} but this is the batcher of {self.model!r}")
        check_image_uuid(request.image_uuid)
        if request.model_version and self.versions and request.model_version not in self.versions:
            raise InvalidArgument(
                f"model {self.model!r} has no version {request.model_version}; live versions: {self.versions} "
                "(0 or unset runs the default)"
            )
        return request

    def _enqueue(
        self, raw: bytes, header_model: str | None, timeout_s: float | None
    ) -> Ticket:
        """Parse and queue one Classify call (its span, if any, is the current one)."""
        request = self._parse(raw, header_model)
        item = preprocess_pb2.BatchItem(
            image_uuid=request.image_uuid, top_k=request.top_k, request_id=request.request_id,
            model_version=request.model_version, traceparent=tracing.current_traceparent(),
        )
        return self.queue.enqueue(
            item,
            deadline_s=None if timeout_s is None else self.clock.now() + timeout_s,
            priority=request.priority,
            timeout_us=request.timeout_us,
        )

    async def classify(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """A unary Classify call (clients that call the batcher directly)."""
        header_model = dict(context.invocation_metadata() or ()).get(MODEL_HEADER)
        ticket = self._enqueue(raw, header_model, context.time_remaining())  # type: ignore[arg-type]
        try:
            response = await ticket.future
        except asyncio.CancelledError:
            self.queue.withdraw(ticket)  # the caller went away: free its place now
            raise
        return response.SerializeToString()

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        """A Classify call relayed by the router; cancelling the future withdraws it."""
        if frame.method != CLASSIFY_METHOD:
            raise Unimplemented(f"method {frame.method!r} is not served by the batcher of {self.model!r}")
        header_model = next((h.value for h in frame.headers if h.key == MODEL_HEADER), None)
        ticket = self._enqueue(frame.request, header_model, frame.timeout_s or None)
        future = ticket.future
        future.add_done_callback(lambda f: self.queue.withdraw(ticket) if f.cancelled() else None)
        return future

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            CLASSIFIER_SERVICE,
            {"Classify": grpc.unary_unary_rpc_method_handler(self.classify)},
        )


class Registration:
    """Registers this batcher with the controller and keeps it registered."""

    def __init__(self, controller: str, model: str, address: str) -> None:
        self.model = model
        self.address = address
        self.channel = grpc.aio.insecure_channel(controller)
        self.stub = controller_pb2_grpc.ControllerStub(self.channel)
        self._task: asyncio.Task[None] | None = None

    async def register(self, *, announce: bool = True) -> ModelSettings:
        """The model's spec; with ``announce`` also this batcher's address (once it serves)."""
        address = self.address if announce else ""
        reply = await self.stub.RegisterBatcher(
            controller_pb2.RegisterBatcherRequest(model_name=self.model, address=address), timeout=5.0
        )
        return ModelSettings.model_validate_json(reply.spec_json)

    async def first(self, timeout_s: float, on_waiting: Callable[[str], Awaitable[None]]) -> ModelSettings:
        """The model's spec. Retries while the controller starts (SystemExit after ``timeout_s`` of no
        answer). While the controller answers that the model is not registered, waits for it to be
        deployed, asking every WAIT_FOR_MODEL_POLL_S: ``on_waiting`` runs once, with the controller's
        words, when that wait begins (a batcher deployed before its model waits instead of restarting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        waiting_since: float | None = None
        while True:
            try:
                spec = await self.register(announce=False)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    deadline = loop.time() + timeout_s  # the controller answers: only its silence has a deadline
                    if waiting_since is None:
                        waiting_since = loop.time()
                        await on_waiting(exc.details() or f"model {self.model!r} is not registered")
                    await asyncio.sleep(WAIT_FOR_MODEL_POLL_S)
                elif loop.time() > deadline:
                    raise SystemExit(f"batcher: no controller answered within {timeout_s:.0f} s: {exc.details()}") from exc
                else:
                    await asyncio.sleep(0.2)
                continue
            if waiting_since is not None:
                log.info("model %r was deployed after %.0f s of waiting", self.model, loop.time() - waiting_since)
            return spec

    def start(self, server: ServiceServer) -> None:
        """Announce this batcher once ``server`` listens, then every REGISTER_INTERVAL_S."""
        self._task = asyncio.create_task(self._keep(server), name="register")

    async def _keep(self, server: ServiceServer) -> None:
        while not server.port:
            await asyncio.sleep(0.01)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.register()
            await asyncio.sleep(REGISTER_INTERVAL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()


async def serve(settings: FlotillaSettings, model: str, port: int) -> None:
    """Run the batcher of ``model`` until SIGTERM."""
    if not settings.endpoints.controller:
        raise SystemExit("batcher: endpoints.controller is empty; the batcher takes its model from the controller")
    if not settings.endpoints.preprocess:
        raise SystemExit("batcher: endpoints.preprocess is empty; configure at least one worker")
    # The address peers reach this batcher at: a configured one (a Kubernetes Service) or host:port.
    advertised = (settings.endpoints.batchers.get(model) or [f"{settings.host}:{port}"])[0]
    registration = Registration(settings.endpoints.controller, model, advertised)
    waiting: ServiceServer | None = None

    async def wait_serving_health_only(details: str) -> None:
        # Alive (health "" SERVING, so a liveness probe passes) but not ready: the classifier
        # service is unknown to health until the real server replaces this one on the same port.
        nonlocal waiting
        log.warning("batcher of %r: %s; waiting until it is deployed (`flotilla models deploy %s`); "
                    "until then only health answers on port %d", model, details, model, port)
        waiting = ServiceServer(f"batcher[{model}] (waiting for its model)", [], grace_s=0, tier="batcher")
        await waiting.start(settings.host, port)

    spec = await registration.first(REGISTER_TIMEOUT_S, wait_serving_health_only)
    if waiting is not None:
        await waiting.stop()
    policy = spec.batching
    clock = MonotonicClock()
    def peer(address: str) -> GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]:
        return GrpcPeer(address, preprocess_pb2_grpc.PreprocessorStub)

    dns_interval_s = settings.pools.dns_refresh_interval_s
    pool, health_check = pool_from_settings(
        "preprocess worker", {} if dns_interval_s else {a: peer(a) for a in settings.endpoints.preprocess},
        settings.pools, probe=lambda e: e.client.serving(PREPROCESSOR_SERVICE),
    )
    # Workers behind a headless Service: one endpoint per pod, re-resolved as pods come and go.
    discovery = await pool_following(
        pool, settings.endpoints.preprocess, peer, lambda p: p.close(), interval_s=dns_interval_s,
    ) if dns_interval_s else None
    dispatcher = PreprocessDispatcher(
        model, pool, batch_timeout_s=policy.batch_timeout_s, clock=clock, default_version=spec.served_version
    )
    queue: BatchQueue[preprocess_pb2.BatchItem, inference_pb2.ClassifyResponse] = BatchQueue(
        model, policy, dispatcher, clock=clock
    )
    handler = ClassifierHandler(model, queue, clock, spec.versions)
    metrics.models_served("batcher", [model])
    # One limit for both ways in: unary calls and calls relayed on the router's streams.
    admission = AdmissionLimit(
        f"the batcher of {model}", settings.batcher.max_concurrent_calls, "batcher.max_concurrent_calls",
        tier="batcher",
    )
    server = ServiceServer(
        f"batcher[{model}]", [CLASSIFIER_SERVICE, BATCHER_ADMIN_SERVICE, RELAY_SERVICE], grace_s=settings.shutdown_grace_s,
        tier="batcher", admission=admission,
        model_label=lambda _: model,  # every call here is for this batcher's model
    )
    relay = RelayServicer(handler.start, tier="batcher", admission=admission, model_label=lambda _: model)
    server.server.add_generic_rpc_handlers([handler.generic_handler(), relay.generic_handler()])
    server.on_drain.append(relay.drain)
    batcher_pb2_grpc.add_BatcherAdminServicer_to_server(BatcherAdminServicer(model, queue, [pool]), server.server)
    queue.start()
    health_check.start()
    registration.start(server)

    async def cleanup() -> None:
        await registration.stop()
        await health_check.stop()
        await queue.stop()
        if discovery is not None:
            await discovery.stop()
        for endpoint in pool.endpoints:
            await endpoint.client.close()
        log.info("batcher[%s] formed %d batches for %d requests", model, queue.stats.batches, queue.stats.items)

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
