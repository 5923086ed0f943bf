"""gRPC layer of the preprocess role: protobuf in, BatchProcessor, protobuf out."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from flotilla.api.v1 import inference_pb2, pools_pb2, preprocess_pb2, preprocess_pb2_grpc
from flotilla.common.object_store import ObjectStore
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.status import rpc_errors
from flotilla.config import FlotillaSettings
from flotilla.services.backend_pool.status import pools_to_pb
from flotilla.services.backend_pool.triton import TritonBackend
from flotilla.services.preprocess.processor import (
    BatchOutcome,
    BatchProcessor,
    ItemRequest,
    ServedModel,
)

log = logging.getLogger(__name__)

SERVICE_NAME = preprocess_pb2.DESCRIPTOR.services_by_name["Preprocessor"].full_name


def to_pb(request: preprocess_pb2.ProcessBatchRequest, outcome: BatchOutcome) -> preprocess_pb2.ProcessBatchResponse:
    reply = preprocess_pb2.ProcessBatchResponse(backend=outcome.backend)
    for item, result in zip(request.items, outcome.items, strict=True):
        if result.error is not None:
            error = preprocess_pb2.ItemError(code=int(result.error.code), message=result.error.message)
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
        reply.results.append(preprocess_pb2.ItemResult(response=response))
    return reply


class PreprocessorServicer(preprocess_pb2_grpc.PreprocessorServicer):
    def __init__(self, processor: BatchProcessor, backend: TritonBackend) -> None:
        self.processor = processor
        self.backend = backend

    async def GetPools(self, request: pools_pb2.GetPoolsRequest, context: grpc.aio.ServicerContext) -> pools_pb2.Pools:
        return pools_to_pb(self.backend.pools.values())

    async def ProcessBatch(
        self, request: preprocess_pb2.ProcessBatchRequest, context: grpc.aio.ServicerContext
    ) -> preprocess_pb2.ProcessBatchResponse:
        async with rpc_errors(context, "preprocess worker"):
            items = [ItemRequest(i.image_uuid, i.top_k, i.request_id) for i in request.items]
            outcome = await self.processor.process(
                request.model_name, items, timeout_s=context.time_remaining()
            )
            return to_pb(request, outcome)
        raise AssertionError("unreachable: rpc_errors aborts the call")


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run one preprocess worker until SIGTERM."""
    models = {
        name: ServedModel.load(name, model, settings.triton.model_repository)
        for name, model in settings.models.items()
    }
    executor = ThreadPoolExecutor(settings.preprocess.fetch_threads, thread_name_prefix="fetch")
    backend = TritonBackend(
        settings.endpoints.triton,
        {model.backend_model: model.settings.backend for model in models.values()},
        settings.pools,
    )
    processor = BatchProcessor(
        models,
        ObjectStore(settings.s3, pool_size=settings.preprocess.fetch_threads),
        backend,
        executor,
        max_object_bytes=settings.preprocess.max_object_bytes,
        max_image_pixels=settings.preprocess.max_image_pixels,
    )
    server = ServiceServer("preprocess", [SERVICE_NAME], grace_s=settings.shutdown_grace_s)
    preprocess_pb2_grpc.add_PreprocessorServicer_to_server(
        PreprocessorServicer(processor, backend), server.server
    )
    backend.start()

    async def cleanup() -> None:
        await backend.close()
        executor.shutdown(wait=False, cancel_futures=True)

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
