"""gRPC layer of the preprocess role: protobuf in, BatchProcessor, protobuf out.

The worker follows the controller's fleet watch: it gives the models' specs
(preprocessing, labels, output kind) and the replicas holding a ready copy
of each, which become that model's Triton pool; each change touches only the
models it names. A model with no copy
is loaded on demand through the controller's EnsureLoaded (cold start).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from flotilla.api.v1 import (
    controller_pb2,
    controller_pb2_grpc,
    inference_pb2,
    pools_pb2,
    preprocess_pb2,
    preprocess_pb2_grpc,
    relay_pb2,
)
from flotilla.common import metrics
from flotilla.common.fleet import FleetChange, FleetState, FleetWatcher, controller_call, ready_replicas, spec_of
from flotilla.common.interceptors import UNKNOWN_MODEL
from flotilla.common.relay import RelayServicer
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.tls import PLAINTEXT, Dialer, RenewingChannel
from flotilla.common.wire import PREPROCESSOR_SERVICE, PROCESS_BATCH_METHOD, RELAY_SERVICE
from flotilla.config import FlotillaSettings, PreprocessSettings
from flotilla.errors import MalformedRequest, Unimplemented
from flotilla.pool.status import pools_to_pb
from flotilla.services.preprocess.object_reader import AsyncObjectReader
from flotilla.services.preprocess.processor import (
    BatchOutcome,
    BatchProcessor,
    ItemRequest,
    ServedModel,
)
from flotilla.services.preprocess.triton.backend import TritonBackend
from flotilla.services.preprocess.triton.shm import SHM_DIR, SharedMemoryRegions, remove_stale

log = logging.getLogger(__name__)

SHM_PREFIX = "flotilla-worker-"
"""Batch regions are /dev/shm/flotilla-worker-<pid>-<n>."""


def to_pb(request: preprocess_pb2.ProcessBatchRequest, outcome: BatchOutcome) -> preprocess_pb2.ProcessBatchResponse:
    reply = preprocess_pb2.ProcessBatchResponse(backend=outcome.backend)
    for item, result in zip(request.items, outcome.items, strict=True):
        if result.error is not None:
            error = preprocess_pb2.ItemError(
                code=int(result.error.code), message=result.error.message, origin=result.error.origin
            )
            reply.results.append(preprocess_pb2.ItemResult(error=error))
            continue
        response = inference_pb2.ClassifyResponse(
            image_uuid=item.image_uuid,
            model_name=request.model_name,
            request_id=item.request_id,
            classes=[
                inference_pb2.ClassScore(index=c.index, label=c.label, score=c.score)
                for c in result.classes or []
            ],
        )
        if result.scores is not None:
            response.scores.extend(result.scores.tolist())
        reply.results.append(preprocess_pb2.ItemResult(response=response))
    return reply


class BatchServicer(preprocess_pb2_grpc.PreprocessorServicer, abc.ABC):
    """Answers batches both ways a batcher sends them (``serve_batches``): unary ProcessBatch calls and
    relayed frames (``start``)."""

    @abc.abstractmethod
    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[preprocess_pb2.ProcessBatchResponse]:
        """A ProcessBatch call relayed as ``frame``; cancelling the future withdraws it."""


class PreprocessorServicer(BatchServicer):
    def __init__(self, processor: BatchProcessor, backend: TritonBackend) -> None:
        self.processor = processor
        self.backend = backend

    async def GetPools(
        self, request: pools_pb2.GetPoolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pools_pb2.Pools:
        return pools_to_pb(self.backend.pools.values())

    async def ProcessBatch(
        self, request: preprocess_pb2.ProcessBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> preprocess_pb2.ProcessBatchResponse:
        return await self.process(request, context.time_remaining())

    async def process(
        self, request: preprocess_pb2.ProcessBatchRequest, timeout_s: float | None
    ) -> preprocess_pb2.ProcessBatchResponse:
        items = [ItemRequest(i.image_uuid, i.top_k, i.request_id, i.all_scores) for i in request.items]
        outcome = await self.processor.process(
            request.model_name, items, version=request.model_version, timeout_s=timeout_s
        )
        return to_pb(request, outcome)

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[preprocess_pb2.ProcessBatchResponse]:
        """A ProcessBatch call relayed by a batcher (``relay.RelayServicer``): a frame on the batcher's
        one stream to this worker instead of a unary call a batch; cancelling the future withdraws it."""
        if frame.method != PROCESS_BATCH_METHOD:
            raise Unimplemented(f"method {frame.method!r} is not served by the preprocess worker")
        try:
            request = preprocess_pb2.ProcessBatchRequest.FromString(frame.request)
        except DecodeError as exc:
            raise MalformedRequest(f"relay frame {frame.id} is not a ProcessBatchRequest: {exc}") from exc
        return asyncio.ensure_future(self.process(request, frame.timeout_s or None))


class FleetFollower:
    """Applies fleet changes to the processor's models and the backend's pools.

    Only the models a message changed or removed are touched (a whole fleet:
    every model, and those it lacks are removed); ``backend_to_model`` (the
    cold start's map from a backend model to its Flotilla name) is kept with them.
    """

    def __init__(self, processor: BatchProcessor, backend: TritonBackend, backend_to_model: dict[str, str]) -> None:
        self.processor = processor
        self.backend = backend
        self.backend_to_model = backend_to_model
        self._http: dict[str, str] = {}

    async def apply(self, state: FleetState, change: FleetChange) -> None:
        # Replicas are few (one per Triton server) and a message does not say which changed.
        http = {r.address: r.http_address for r in state.replicas.values() if r.http_address}
        if http != self._http:
            self._http = http
            self.backend.set_http_endpoints(http)
        models = self.processor.models
        before = set(models) if change.full else None
        gone = list(change.removed)
        if change.full:
            gone += [name for name in models if name not in state.models]
        forgotten = sum(self._forget(name) for name in gone)
        for name in change.changed:
            status = state.models.get(name)
            if status is None:
                continue
            spec = spec_of(status)
            known = models.get(name)
            if known is None or known.settings != spec:
                if known is not None and known.backend_model != (spec.backend_model or name):
                    self._forget(name)  # renamed in the backend: the old name's copies are not its copies
                models[name] = known = ServedModel.from_spec(name, spec)
                self.backend_to_model[known.backend_model] = name
            self.backend.set_copies(known.backend_model, ready_replicas(status), spec.backend)
        # The served set's metric series follow it, at the change's cost.
        if before is not None:
            metrics.models_served("preprocess", models)
        elif forgotten or change.changed:
            metrics.models_changed("preprocess", added=[n for n in change.changed if n in models], removed=gone)

    def _forget(self, name: str) -> bool:
        """The model is gone: its backend pool (its copies) and its names with it. False: not known."""
        known = self.processor.models.pop(name, None)
        if known is None:
            return False
        self.backend.remove(known.backend_model)
        if self.backend_to_model.get(known.backend_model) == name:
            del self.backend_to_model[known.backend_model]
        return True


class ControllerColdStart:
    """EnsureLoaded on the controller; returns the replicas with a ready copy."""

    def __init__(self, channel: RenewingChannel, backend_to_model: dict[str, str]) -> None:
        self.channel = channel
        self.stub = controller_pb2_grpc.ControllerStub(channel.channel)
        self.backend_to_model = backend_to_model

    async def __call__(self, backend_model: str) -> list[str]:
        name = self.backend_to_model.get(backend_model, backend_model)
        if self.channel.renew():  # certificate files renewed (TLS)
            self.stub = controller_pb2_grpc.ControllerStub(self.channel.channel)
        # The controller's failure, or one it relays from a replica: either way not this worker's.
        status = await controller_call(self.stub.EnsureLoaded, controller_pb2.EnsureLoadedRequest(name=name))
        return ready_replicas(status)


def serve_batches(
    server: ServiceServer, servicer: BatchServicer, model_label: Callable[[str], str] | None = None
) -> RelayServicer[preprocess_pb2.ProcessBatchResponse]:
    """Serve ``servicer``'s batches on ``server`` both ways a batcher sends them: as frames on its
    Relay stream (``servicer.start``) and, for batchers from before the relay, as unary ProcessBatch
    calls. Returns the relay's servicer (it stops taking frames when the server drains)."""
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(servicer, server.server)
    relay = RelayServicer(servicer.start, tier="preprocess", model_label=model_label)
    server.server.add_generic_rpc_handlers([relay.generic_handler()])
    server.on_drain.append(relay.drain)
    return relay


def batch_regions(settings: PreprocessSettings) -> SharedMemoryRegions | None:
    """This worker's shared-memory regions for batches to Triton on its host (None when off)."""
    if settings.triton_shared_memory == "off" or settings.shared_memory_max_bytes == 0 or not SHM_DIR.is_dir():
        return None
    remove_stale(SHM_PREFIX)
    regions = SharedMemoryRegions(SHM_PREFIX, max_bytes=settings.shared_memory_max_bytes)
    log.info("batches to Triton replicas on this host go through shared memory (%s*, at most %d MiB)",
             SHM_DIR / regions.prefix, settings.shared_memory_max_bytes >> 20)
    return regions


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run one preprocess worker until SIGTERM."""
    if not settings.endpoints.controller:
        raise SystemExit("preprocess: endpoints.controller is empty; workers take their models from the controller")
    decode_threads = settings.preprocess.decode_threads or len(os.sched_getaffinity(0))
    executor = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
    metrics.PREPROCESS_DECODE_THREADS.set(decode_threads)
    store = AsyncObjectReader(settings.s3, max_connections=settings.preprocess.max_fetches)
    dialer = Dialer(settings.tls)  # mutual TLS to the controller when tls.enabled
    channel = RenewingChannel(dialer, settings.endpoints.controller)
    backend_to_model: dict[str, str] = {}
    backend = TritonBackend(
        settings.pools,
        cold_start=ControllerColdStart(channel, backend_to_model),
        shm=batch_regions(settings.preprocess),
        protocol=settings.preprocess.triton_protocol,
        # Triton's gRPC with this worker's certificate when it serves TLS (tls.triton; batches then go over gRPC).
        dialer=dialer if settings.tls.triton else PLAINTEXT,
    )
    processor = BatchProcessor(
        {},
        store,
        backend,
        executor,
        max_object_bytes=settings.preprocess.max_object_bytes,
        max_image_pixels=settings.preprocess.max_image_pixels,
        decode_jobs=decode_threads,
    )
    follower = FleetFollower(processor, backend, backend_to_model)
    watcher = FleetWatcher(settings.endpoints.controller, follower.apply, name="preprocess", dialer=dialer)
    watcher.start()
    await watcher.wait_first(10.0)
    def model_label(name: str) -> str:  # label values stay bounded: only served models
        return name if name in processor.models else UNKNOWN_MODEL

    server = ServiceServer(
        "preprocess", [PREPROCESSOR_SERVICE, RELAY_SERVICE], grace_s=settings.shutdown_grace_s, tier="preprocess",
        model_label=model_label, tls=settings.tls,
    )
    serve_batches(server, PreprocessorServicer(processor, backend), model_label)

    async def cleanup() -> None:
        await watcher.stop()
        await backend.close()
        await store.close()
        await channel.close()
        executor.shutdown(wait=False, cancel_futures=True)

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
