"""gRPC layer of the batcher role: one service per model.

Takes Classify calls two ways and hands both to the same ``ClassifyRequests``
(``requests``: parsing, the model's BatchQueue): as frames on the router's
``Relay`` streams (``ClassifierHandler.start``) and as unary
``flotilla.api.v1.ImageClassifier/Classify`` calls from callers that reach
the batcher directly (``ClassifierHandler.classify``). Each formed batch goes
to a preprocess worker (``dispatch``); the controller gives the model's spec
and learns this batcher's address (``registration``). ``serve`` puts them
together.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from flotilla.api.v1 import batcher_pb2_grpc, inference_pb2, preprocess_pb2, preprocess_pb2_grpc, relay_pb2
from flotilla.common import metrics
from flotilla.common.clock import MonotonicClock
from flotilla.common.interceptors import AdmissionLimit
from flotilla.common.peer import GrpcPeer
from flotilla.common.relay import RelayServicer
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.wire import (
    BATCHER_ADMIN_SERVICE,
    CLASSIFIER_SERVICE,
    CLASSIFY_METHOD,
    MODEL_HEADER,
    PREPROCESSOR_SERVICE,
    RELAY_SERVICE,
)
from flotilla.config import FlotillaSettings
from flotilla.errors import Unimplemented
from flotilla.pool.discovery import pool_following
from flotilla.pool.pool import pool_from_settings
from flotilla.services.batcher.admin import BatcherAdminServicer
from flotilla.services.batcher.dispatch import PreprocessDispatcher
from flotilla.services.batcher.queue import BatchQueue
from flotilla.services.batcher.registration import REGISTER_TIMEOUT_S, Registration
from flotilla.services.batcher.requests import ClassifyRequests

log = logging.getLogger(__name__)


class ClassifierHandler:
    """Classify calls, unary or relayed, to ``ClassifyRequests``: the call's body, the model its
    header names and its time left in; the answer's bytes out."""

    def __init__(self, requests: ClassifyRequests) -> None:
        self.requests = requests

    async def classify(self, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """A unary Classify call (clients that call the batcher directly)."""
        text_headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}  # not -bin ones
        response = await self.requests.classify(raw, text_headers.get(MODEL_HEADER), context.time_remaining())
        return response.SerializeToString()

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[inference_pb2.ClassifyResponse]:
        """A Classify call relayed by the router; cancelling the future withdraws it."""
        if frame.method != CLASSIFY_METHOD:
            raise Unimplemented(f"method {frame.method!r} is not served by the batcher of {self.requests.model!r}")
        header_model = next((h.value for h in frame.headers if h.key == MODEL_HEADER), None)
        return self.requests.start(frame.request, header_model, frame.timeout_s or None)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            CLASSIFIER_SERVICE,
            {"Classify": grpc.unary_unary_rpc_method_handler(self.classify)},
        )


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
    handler = ClassifierHandler(ClassifyRequests(model, queue, clock, spec.versions))
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
