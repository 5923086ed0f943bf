"""gRPC layer of the batcher role: a shard hosting the queues of many models.

One batcher process serves the models the controller assigns it (a
dedicated batcher, ``dedicated_model``: its one model), each in its own lane
(``lanes``: the model's BatchQueue, dispatcher and ClassifyRequests) over one
preprocess-worker pool and one admission limit. Classify calls come two ways
and each picks its lane by the model its ``x-model-name`` header names: as
frames on the router's ``Relay`` streams (``ClassifierHandler.start``) and as
unary ``flotilla.api.v1.ImageClassifier/Classify`` calls from callers that
reach the batcher directly (``ClassifierHandler.classify``). Each formed batch
goes to a preprocess worker (``dispatch``); the heartbeat (``heartbeat``)
reports the queues' counters to the controller and brings the assignment.
The process serves at once with no lanes; they come with the first answered
heartbeat. ``serve`` puts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from flotilla.api.v1 import batcher_pb2_grpc, inference_pb2, preprocess_pb2_grpc, relay_pb2
from flotilla.common.admin import admin_gate
from flotilla.common.clock import Clock, MonotonicClock
from flotilla.common.interceptors import UNKNOWN_MODEL, AdmissionLimit
from flotilla.common.peer import GrpcPeer
from flotilla.common.relay import RelayServicer
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.tls import Dialer
from flotilla.common.wire import (
    BATCHER_ADMIN_SERVICE,
    CLASSIFIER_SERVICE,
    CLASSIFY_METHOD,
    MODEL_HEADER,
    PREPROCESSOR_SERVICE,
    RELAY_SERVICE,
)
from flotilla.config import FlotillaSettings, ModelSettings
from flotilla.errors import ModelNotFound, Unimplemented
from flotilla.pool.discovery import pool_following
from flotilla.pool.pool import EndpointPool, pool_from_settings
from flotilla.services.batcher.admin import BatcherAdminServicer
from flotilla.services.batcher.dispatch import PreprocessDispatcher
from flotilla.services.batcher.heartbeat import ANSWER_MARGIN_S, Heartbeat
from flotilla.services.batcher.lanes import Lane, Lanes, Queue
from flotilla.services.batcher.queue import BatchQueue
from flotilla.services.batcher.reports import HeartbeatBook
from flotilla.services.batcher.requests import ClassifyRequests

log = logging.getLogger(__name__)

WorkerPool = EndpointPool[GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]]
REFRESH_TIMEOUT_S = ANSWER_MARGIN_S
"""Longest a call for a model not hosted here waits for a heartbeat answer before it is NOT_FOUND."""


def _body_model(raw: bytes) -> str:
    """The model_name in a Classify body, for a call without the model header ("" if unreadable:
    the lane's own parse answers a malformed body)."""
    try:
        return inference_pb2.ClassifyRequest.FromString(raw).model_name
    except DecodeError:
        return ""


class ClassifierHandler:
    """Classify calls, unary or relayed, to the lane of the model they name: the call's body, the
    model and its time left in; the answer's bytes out.

    A call for a model not hosted here waits for a heartbeat answer (``refresh``) before it is
    NOT_FOUND: a batcher restarted on its address is named by routes before its first answer has
    given it back its models.
    """

    def __init__(self, lanes: Lanes, refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.lanes = lanes
        self.refresh = refresh

    async def classify(self, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """A unary Classify call (clients that call the batcher directly)."""
        text_headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}  # not -bin ones
        header_model = text_headers.get(MODEL_HEADER)
        model = header_model or _body_model(raw)
        try:
            lane = self.lanes.for_call(model)
        except ModelNotFound:
            lane = await self._after_refresh(model)
        response = await lane.requests.classify(raw, header_model, context.time_remaining())
        return response.SerializeToString()

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        """A Classify call relayed by the router; cancelling the future withdraws it."""
        if frame.method != CLASSIFY_METHOD:
            raise Unimplemented(f"method {frame.method!r} is not served by the batcher")
        header_model = next((h.value for h in frame.headers if h.key == MODEL_HEADER), None)
        model = header_model or _body_model(frame.request)
        try:
            lane = self.lanes.for_call(model)
        except ModelNotFound:
            if self.refresh is None:
                raise
            return asyncio.ensure_future(self._start_after_refresh(frame, header_model, model))
        return lane.requests.start(frame.request, header_model, frame.timeout_s or None)

    async def _after_refresh(self, model: str) -> Lane:
        """The lane of ``model`` once a fresh heartbeat has been answered; NOT_FOUND if it is still not here."""
        if self.refresh is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.refresh(), REFRESH_TIMEOUT_S)
        return self.lanes.for_call(model)

    async def _start_after_refresh(
        self, frame: relay_pb2.CallFrame, header_model: str | None, model: str
    ) -> inference_pb2.ClassifyResponse:
        began_s = time.monotonic()
        lane = await self._after_refresh(model)
        timeout_s = max(frame.timeout_s - (time.monotonic() - began_s), 0.001) if frame.timeout_s else None
        return await lane.requests.start(frame.request, header_model, timeout_s)  # cancelled: withdrawn

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            CLASSIFIER_SERVICE,
            {"Classify": grpc.unary_unary_rpc_method_handler(self.classify)},
        )


def lane_factory(pool: WorkerPool, clock: Clock) -> Callable[[str, ModelSettings], Lane]:
    """Lanes whose batches go to ``pool``: (model, spec) -> a new lane."""

    def make_lane(model: str, spec: ModelSettings) -> Lane:
        dispatcher = PreprocessDispatcher(
            model, pool, batch_timeout_s=spec.batching.batch_timeout_s, clock=clock,
            default_version=spec.served_version,
        )
        queue: Queue = BatchQueue(
            model, spec.batching, dispatcher, clock=clock
        )
        return Lane(model, spec, queue, ClassifyRequests(model, queue, clock, spec.versions), dispatcher)

    return make_lane


async def serve(settings: FlotillaSettings, port: int, *, dedicated_model: str = "") -> None:
    """Run a batcher until SIGTERM: a shard, or with ``dedicated_model`` the dedicated batcher of that model."""
    if not settings.endpoints.controller:
        raise SystemExit("batcher: endpoints.controller is empty; the batcher takes its models from the controller")
    if not settings.endpoints.preprocess:
        raise SystemExit("batcher: endpoints.preprocess is empty; configure at least one worker")
    name = f"batcher[{dedicated_model}]" if dedicated_model else "batcher"
    clock = MonotonicClock()

    dialer = Dialer(settings.tls)  # mutual TLS to the workers and the controller when tls.enabled

    def peer(address: str) -> GrpcPeer[preprocess_pb2_grpc.PreprocessorStub]:
        return GrpcPeer(address, preprocess_pb2_grpc.PreprocessorStub, dialer=dialer, tier="preprocess worker")

    dns_interval_s = settings.pools.dns_refresh_interval_s
    pool, health_check = pool_from_settings(
        "preprocess worker", {} if dns_interval_s else {a: peer(a) for a in settings.endpoints.preprocess},
        settings.pools, probe=lambda e: e.client.serving(PREPROCESSOR_SERVICE),
    )
    # Workers behind a headless Service: one endpoint per pod, re-resolved as pods come and go.
    discovery = await pool_following(
        pool, settings.endpoints.preprocess, peer, lambda p: p.close(), interval_s=dns_interval_s,
    ) if dns_interval_s else None
    shards = settings.controller.shards
    lanes = Lanes(lane_factory(pool, clock), clock=clock, move_grace_s=shards.move_grace_s,
                  dedicated_model=dedicated_model)

    # The address routers and the controller reach this batcher at: a configured one (the pod's IP) or host:port.
    advertised = settings.batcher.advertise_address or f"{settings.host}:{port}"
    heartbeat = Heartbeat(
        settings.endpoints.controller, HeartbeatBook(advertised, lanes, dedicated_model=dedicated_model), lanes,
        interval_s=shards.heartbeat_interval_s, dialer=dialer,
    )
    handler = ClassifierHandler(lanes, heartbeat.fresh)

    def model_label(named: str) -> str:  # label values stay bounded: only hosted models
        return named if lanes.get(named) is not None else UNKNOWN_MODEL

    # One limit for every model and both ways in: unary calls and calls relayed on the router's streams.
    admission = AdmissionLimit(
        f"the {name}", settings.batcher.max_concurrent_calls, "batcher.max_concurrent_calls", tier="batcher",
    )
    server = ServiceServer(
        name, [CLASSIFIER_SERVICE, BATCHER_ADMIN_SERVICE, RELAY_SERVICE], grace_s=settings.shutdown_grace_s,
        tier="batcher", admission=admission, model_label=model_label, tls=settings.tls,
    )
    relay = RelayServicer(handler.start, tier="batcher", admission=admission, model_label=model_label)
    server.server.add_generic_rpc_handlers([handler.generic_handler(), relay.generic_handler()])
    server.on_drain.append(relay.drain)
    batcher_pb2_grpc.add_BatcherAdminServicer_to_server(BatcherAdminServicer(
        lanes, [pool], admin_gate(settings),
    ), server.server)
    health_check.start()
    heartbeat.start()

    async def cleanup() -> None:
        await heartbeat.stop()
        await lanes.close()
        await health_check.stop()
        if discovery is not None:
            await discovery.stop()
        for endpoint in pool.endpoints:
            await endpoint.client.close()
        log.info("%s stopped", name)

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
