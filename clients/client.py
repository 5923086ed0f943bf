"""Async client: upload JPEG bytes to the object store, classify by uuid.

    async with FlotillaClient(router="127.0.0.1:50051", api_key=key, s3=s3) as client:
        image_uuid = await client.upload(jpeg_bytes)
        result = await client.classify(image_uuid, "efficientnet-lite0")

Requests carry metadata only; the model name and the API key travel as
headers (``x-model-name``, ``authorization``) so the router can route
without parsing the body. A failed call raises a ``FlotillaError`` whose
``code`` is the gRPC status the mesh answered with.

Many images: ``classify_many`` uploads (JPEG bytes) and classifies them on
one ``ClassifyStream``, a bounded number at a time, and yields each image's
``StreamResult`` as it completes:

    async for result in client.classify_many(jpegs, "efficientnet-lite0"):
        print(result.index, result.classification or result.error)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import grpc

from flotilla.api.v1 import inference_pb2, inference_pb2_grpc
from flotilla.clients.results import Classification as Classification
from flotilla.clients.results import ClassScore as ClassScore
from flotilla.clients.results import StreamResult, classification_of
from flotilla.clients.stream import ClassifyStream, ReopeningStream
from flotilla.common.ids import check_image_uuid, new_image_uuid, object_key
from flotilla.common.object_store import ObjectStore
from flotilla.common.status import error_from_rpc
from flotilla.common.tls import PLAINTEXT, Dialer
from flotilla.common.wire import AUTH_HEADER, BEARER_PREFIX, MODEL_HEADER
from flotilla.config import S3Settings
from flotilla.errors import FlotillaError, InvalidArgument

# Transparent retries of UNAVAILABLE (nothing was processed) with backoff.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "flotilla.api.v1.ImageClassifier"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


DEFAULT_WINDOW = 64
"""Images ``classify_many`` has in flight at once (uploading or being classified)."""
DEFAULT_UPLOADS = 8
"""JPEG uploads ``classify_many`` runs at once."""


class FlotillaClient:
    """Talks to the router (gRPC) and the object store (S3)."""

    def __init__(
        self,
        router: str,
        api_key: str,
        s3: S3Settings,
        *,
        default_timeout_s: float = 30.0,
        transparent_retries: bool = True,
        own_connection: bool = False,
        dialer: Dialer = PLAINTEXT,
    ) -> None:
        """``dialer``: TLS to the router (its certificate checked against the dialer's CA) when the mesh
        runs with it.

        ``transparent_retries``: let the channel retry UNAVAILABLE, and ``classify_many`` send again on
        a new stream what a stream ending UNAVAILABLE failed (off to see every failure).

        ``own_connection``: this client's channel opens its own TCP connection
        instead of sharing one with the process's other channels to the same
        router (what spreads one process's load over several router processes).
        """
        self.router = router
        self.api_key = api_key
        self.default_timeout_s = default_timeout_s
        self.transparent_retries = transparent_retries
        self._store = ObjectStore(s3)
        options = (
            [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
            if transparent_retries
            else [("grpc.enable_retries", 0)]
        )
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._channel = dialer.aio_channel(router, options)
        self._stub = inference_pb2_grpc.ImageClassifierStub(self._channel)

    async def __aenter__(self) -> FlotillaClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def upload(self, jpeg: bytes, image_uuid: str | None = None) -> str:
        """Store ``jpeg`` as ``<uuid>.jpg`` and return the uuid (canonical: lower case)."""
        image_uuid = check_image_uuid(image_uuid) if image_uuid else new_image_uuid()
        await asyncio.to_thread(self._store.put, object_key(image_uuid), jpeg)
        return image_uuid

    async def classify(
        self,
        image_uuid: str,
        model: str,
        *,
        top_k: int = 5,
        timeout_s: float | None = None,
        request_id: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        version: int = 0,
    ) -> Classification:
        """Classify an uploaded image; raises FlotillaError with the mesh's status.

        ``timeout_s`` is the gRPC deadline for the whole call; ``priority``
        (1 = highest, 0 = the model's default) and ``queue_timeout_us`` (0 =
        the model's default, can only lower it) shape its place in the
        model's batching queue. ``version`` picks one of the model's live
        versions (0 = its default version).
        """
        request = inference_pb2.ClassifyRequest(
            image_uuid=image_uuid, model_name=model, top_k=top_k, request_id=request_id,
            priority=priority, timeout_us=queue_timeout_us, model_version=version,
        )
        try:
            reply = await self._stub.Classify(
                request,
                metadata=self._metadata(model),
                timeout=self.default_timeout_s if timeout_s is None else timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"router {self.router}") from exc
        return classification_of(reply)

    async def classify_jpeg(self, jpeg: bytes, model: str, *, top_k: int = 5) -> Classification:
        """Upload then classify."""
        return await self.classify(await self.upload(jpeg), model, top_k=top_k)

    def stream(self, model: str, *, wait_for_ready: bool = False) -> ClassifyStream:
        """Open a ``ClassifyStream`` for ``model`` (each request may name another); use it as
        ``async with client.stream(model) as stream: await stream.classify(uuid)``.

        ``wait_for_ready``: while the router cannot be reached, the stream waits for it (each
        request until its own deadline) instead of ending UNAVAILABLE at once."""
        return ClassifyStream(
            self._stub.ClassifyStream(metadata=self._metadata(model), wait_for_ready=wait_for_ready), model,
            self.router, default_timeout_s=self.default_timeout_s,
        )

    async def classify_many(
        self,
        items: Iterable[str | bytes],
        model: str,
        *,
        top_k: int = 5,
        window: int = DEFAULT_WINDOW,
        timeout_s: float | None = None,
        uploads: int = DEFAULT_UPLOADS,
    ) -> AsyncIterator[StreamResult]:
        """Classify many images on one stream; yields each one's ``StreamResult`` as it completes.

        ``items``: image uuids (``str``, already uploaded) or JPEG bytes
        (uploaded here, ``uploads`` at a time, while earlier images are being
        classified). At most ``window`` images are in flight at once; the next
        item is taken only when one has completed. A failed image (its upload
        or its classification) is a result with ``error`` set, not an
        exception: the iteration goes on. ``timeout_s`` (default: the client's
        ``default_timeout_s``) is each image's deadline on the stream.
        ``StreamResult.index`` is the image's position in ``items``.

        A stream that ends UNAVAILABLE (the router killed, restarted, rolled)
        or INTERNAL (grpc.aio's status for a write that raced the connection's
        end) is opened again, and the images it failed go again on the new
        one, each until its deadline (``ReopeningStream``); with
        ``transparent_retries`` off they are results with that error.
        """
        if window < 1 or uploads < 1:
            raise ValueError("window and uploads must be at least 1")
        upload_slots = asyncio.Semaphore(uploads)

        async def one(streams: ReopeningStream, index: int, item: str | bytes) -> StreamResult:
            image_uuid = ""
            try:
                if isinstance(item, str):
                    image_uuid = item
                else:
                    async with upload_slots:
                        image_uuid = await self.upload(item)
                classification = await streams.classify(image_uuid, top_k=top_k, timeout_s=timeout_s)
            except FlotillaError as exc:
                return StreamResult(index, image_uuid, None, exc)
            return StreamResult(index, image_uuid, classification, None)

        pending = iter(enumerate(items))
        running: set[asyncio.Task[StreamResult]] = set()
        streams = ReopeningStream(
            lambda reopened: self.stream(model, wait_for_ready=reopened),
            default_timeout_s=self.default_timeout_s, reopen=self.transparent_retries,
        )
        finished = False
        try:
            while True:
                for index, item in pending:
                    running.add(asyncio.create_task(one(streams, index, item)))
                    if len(running) >= window:
                        break
                if not running:
                    finished = True
                    return
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await (streams.close() if finished else streams.cancel())

    def _metadata(self, model: str) -> tuple[tuple[str, str], ...]:
        if not model or not (model.isascii() and model.isprintable()):
            raise InvalidArgument(f"model name {model[:40]!r} must be non-empty printable ASCII (it travels as a header)")
        return (MODEL_HEADER, model), (AUTH_HEADER, f"{BEARER_PREFIX}{self.api_key}")
