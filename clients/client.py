"""Async client: upload JPEG bytes to the object store, classify by uuid.

    async with FlotillaClient(router="127.0.0.1:50051", api_key=key, s3=s3) as client:
        image_uuid = await client.upload(jpeg_bytes)
        result = await client.classify(image_uuid, "efficientnet-lite0")

Requests carry metadata only; the model name and the API key travel as
headers (``x-model-name``, ``authorization``) so the router can route
without parsing the body. A failed call raises a ``FlotillaError`` whose
``code`` is the gRPC status the mesh answered with.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from types import TracebackType

import grpc

from flotilla.api.v1 import inference_pb2, inference_pb2_grpc
from flotilla.common.ids import check_image_uuid, new_image_uuid, object_key
from flotilla.common.object_store import ObjectStore
from flotilla.common.status import error_from_rpc
from flotilla.common.wire import AUTH_HEADER, BEARER_PREFIX, MODEL_HEADER
from flotilla.config import S3Settings
from flotilla.errors import InvalidArgument

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


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    image_uuid: str
    model: str
    classes: list[ClassScore]
    """Best first."""
    request_id: str = ""


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
    ) -> None:
        """``transparent_retries``: let the channel retry UNAVAILABLE (off to see every failure).

        ``own_connection``: this client's channel opens its own TCP connection
        instead of sharing one with the process's other channels to the same
        router (what spreads one process's load over several router processes).
        """
        self.router = router
        self.api_key = api_key
        self.default_timeout_s = default_timeout_s
        self._store = ObjectStore(s3)
        options = (
            [("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1)]
            if transparent_retries
            else [("grpc.enable_retries", 0)]
        )
        if own_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._channel = grpc.aio.insecure_channel(router, options=options)
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
        if not model or not (model.isascii() and model.isprintable()):
            raise InvalidArgument(f"model name {model[:40]!r} must be non-empty printable ASCII (it travels as a header)")
        metadata = ((MODEL_HEADER, model), (AUTH_HEADER, f"{BEARER_PREFIX}{self.api_key}"))
        try:
            reply = await self._stub.Classify(
                request,
                metadata=metadata,
                timeout=self.default_timeout_s if timeout_s is None else timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"router {self.router}") from exc
        return Classification(
            image_uuid=reply.image_uuid,
            model=reply.model_name,
            classes=[ClassScore(c.index, c.label, c.score) for c in reply.classes],
            request_id=reply.request_id,
        )

    async def classify_jpeg(self, jpeg: bytes, model: str, *, top_k: int = 5) -> Classification:
        """Upload then classify."""
        return await self.classify(await self.upload(jpeg), model, top_k=top_k)
