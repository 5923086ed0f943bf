"""Loads on the router's front doors for the ceiling part (``flotilla.bench.ceiling``).

Each is a closed-loop call (``() -> awaitable``) spread over ``connections``
client connections, every request prebuilt or nearly, so the load generator
spends as little as it can per request:

- ``unary``: one ``ImageClassifier/Classify`` call per request.
- ``stream``: requests on ``ClassifyStream``, one stream per connection; each
  call puts one request on its caller's stream and waits for the answer with its id.
- ``kserve-grpc`` (N uuids): one KServe v2 ``ModelInfer`` of N image uuids per call.
- ``triton-stream``: Triton's ``ModelStreamInfer``, one stream per connection, N=1.
- ``kserve-http``: ``POST /v2/models/{model}/infer`` with a JSON body, N=1, over
  aiohttp keep-alive connections.

A stream answer that is an error fails its call, as a unary call's status does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol

import grpc

from flotilla.api.kserve import grpc_service_pb2 as kserve_pb2
from flotilla.api.v1 import inference_pb2, relay_pb2
from flotilla.clients.stream import MAX_PACK
from flotilla.common.wire import (
    AUTH_HEADER,
    BEARER_PREFIX,
    CLASSIFY_METHOD,
    CLASSIFY_STREAM_METHOD,
    KSERVE_SERVICE,
    MODEL_HEADER,
    varint,
)
from flotilla.errors import FlotillaError, error_from_code

Call = Callable[[], Awaitable[object]]
MODEL_INFER = f"/{KSERVE_SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{KSERVE_SERVICE}/ModelStreamInfer"
UUID_INPUT = "IMAGE_UUID"


def random_uuids(n: int = 256) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def model_infer_body(model: str, uuids: list[str], request_id: str = "") -> bytes:
    """A KServe v2 ModelInferRequest of ``uuids`` as one BYTES input (raw contents, as tritonclient sends)."""
    raw = b"".join(len(u).to_bytes(4, "little") + u.encode() for u in uuids)
    return kserve_pb2.ModelInferRequest(
        model_name=model, id=request_id,
        inputs=[kserve_pb2.ModelInferRequest.InferInputTensor(name=UUID_INPUT, datatype="BYTES", shape=[len(uuids)])],
        raw_input_contents=[raw],
    ).SerializeToString()


class _Channels:
    def __init__(self, address: str, connections: int) -> None:
        self.channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class KServeLoad(_Channels):
    """One ModelInfer of ``images`` uuids per call."""

    def __init__(
        self, address: str, connections: int, model: str, api_key: str, images: int, uuids: list[str] | None = None
    ) -> None:
        super().__init__(address, connections)
        self._sends: Iterator[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = itertools.cycle(
            [c.unary_unary(MODEL_INFER) for c in self.channels]
        )
        uuids = uuids or random_uuids()
        if len(uuids) < images:
            uuids = uuids * images
        self._bodies = itertools.cycle(
            [model_infer_body(model, uuids[i:i + images]) for i in range(0, len(uuids) - images + 1, images)]
        )
        self._metadata = ((AUTH_HEADER, f"{BEARER_PREFIX}{api_key}"),)

    def __call__(self) -> Awaitable[object]:
        return next(self._sends)(next(self._bodies), metadata=self._metadata, timeout=30.0)


class _Stream:
    """One bidirectional stream: requests go out in order through one queue (gRPC takes one write at
    a time), each answer is found by its id."""

    def __init__(
        self, open_call: Callable[[AsyncIterator[bytes]], grpc.aio.StreamStreamCall[bytes, bytes]],
        answer: Callable[[bytes], list[tuple[str, FlotillaError | None]]],
        pack: Callable[[list[bytes]], bytes] | None = None,
    ) -> None:
        self.outbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.pack = pack
        self.call = open_call(self._requests())
        self.answer = answer
        self.pending: dict[str, asyncio.Future[None]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            body = await self.outbox.get()
            if self.pack is None or self.outbox.empty():
                yield body
                continue
            # What queued while the last write was under way goes packed, as Flotilla's client sends it.
            bodies = [body] + [self.outbox.get_nowait() for _ in range(min(self.outbox.qsize(), MAX_PACK - 1))]
            yield self.pack(bodies)

    async def request(self, request_id: str, body: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        self.outbox.put_nowait(body)
        await future

    async def _read(self) -> None:
        try:
            async for raw in self.call:
                for request_id, error in self.answer(raw):
                    future = self.pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_exception(error) if error is not None else future.set_result(None)
        except grpc.aio.AioRpcError as exc:
            failure: BaseException = exc
        else:
            failure = ConnectionError("stream ended")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(failure)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class StreamLoad(_Channels):
    """Each call one request on one of ``connections`` streams (one per connection): the stream of its
    caller. A closed loop's callers (tasks) are dealt out over the streams in turn and each keeps to
    its stream, so every stream is one client with its share of the requests in flight, as with
    Flotilla's client: a request that an answer frees goes out on the stream that answer came on,
    packed with the others it freed. (Dealt out per request instead, the two answers a stream got
    from a batch of 8 over 4 streams sent their two next requests out on two other streams, each
    alone: 0.78 messages an image from the load generator and 0.72 from the router at the CPU
    point, against 0.14 and 0.28 with one stream; 2026-12-07.)"""

    def __init__(
        self, address: str, connections: int, method: str, metadata: tuple[tuple[str, str], ...],
        body: Callable[[str], bytes], answer: Callable[[bytes], list[tuple[str, FlotillaError | None]]],
        pack: Callable[[list[bytes]], bytes] | None = None,
    ) -> None:
        super().__init__(address, connections)
        self._method, self._metadata, self._body, self._answer = method, metadata, body, answer
        self._pack = pack
        self._streams: list[_Stream] = []
        self._next = itertools.count()
        self._ids = (str(i) for i in itertools.count())
        self._stream_of: weakref.WeakKeyDictionary[asyncio.Task[Any], _Stream] = weakref.WeakKeyDictionary()

    def _open(self) -> None:
        for channel in self.channels:
            method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(self._method)

            def open_call(
                requests: AsyncIterator[bytes], method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = method
            ) -> grpc.aio.StreamStreamCall[bytes, bytes]:
                return method(requests, metadata=self._metadata)

            self._streams.append(_Stream(open_call, self._answer, self._pack))

    def __call__(self) -> Awaitable[object]:
        if not self._streams:
            self._open()
        request_id = next(self._ids)
        caller = asyncio.current_task()
        stream = self._stream_of.get(caller) if caller is not None else None
        if stream is None:
            stream = self._streams[next(self._next) % len(self._streams)]
            if caller is not None:
                self._stream_of[caller] = stream
        return stream.request(request_id, self._body(request_id))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._streams))
        await super().close()


def classify_stream_load(address: str, connections: int, model: str, api_key: str, bodies: list[bytes]) -> StreamLoad:
    """``ClassifyStream``: the ClassifyRequest bodies as they are, wrapped with an id."""
    ring = itertools.cycle(bodies)

    def body(request_id: str) -> bytes:
        return relay_pb2.OpaqueStreamRequest(id=request_id, request=next(ring)).SerializeToString()

    def one(reply: relay_pb2.OpaqueStreamResponse) -> tuple[str, FlotillaError | None]:
        if reply.HasField("error"):
            return reply.id, error_from_code(reply.error.code, reply.error.message, reply.error.origin)
        return reply.id, None

    def answer(raw: bytes) -> list[tuple[str, FlotillaError | None]]:
        message = relay_pb2.OpaqueStreamResponse.FromString(raw)
        return [one(reply) for reply in message.responses or (message,)]

    metadata = ((MODEL_HEADER, model), (AUTH_HEADER, f"{BEARER_PREFIX}{api_key}"))
    return StreamLoad(address, connections, CLASSIFY_STREAM_METHOD, metadata, body, answer, packed_requests)


def packed_requests(bodies: list[bytes]) -> bytes:
    """One ClassifyStreamRequest packing serialised ones (field ``requests``), without parsing them again."""
    return b"".join(_PACKED_TAG + varint(len(body)) + body for body in bodies)


_PACKED_TAG = bytes([5 << 3 | 2])  # ClassifyStreamRequest.requests: field 5, length-delimited



def triton_stream_load(
    address: str, connections: int, model: str, api_key: str, uuids: list[str] | None = None
) -> StreamLoad:
    """Triton's ``ModelStreamInfer``, one uuid per request."""
    ring = itertools.cycle(uuids or random_uuids())

    def body(request_id: str) -> bytes:
        return model_infer_body(model, [next(ring)], request_id)

    def answer(raw: bytes) -> list[tuple[str, FlotillaError | None]]:
        reply = kserve_pb2.ModelStreamInferResponse.FromString(raw)
        if reply.error_message:
            return [(reply.infer_response.id, FlotillaError(reply.error_message))]
        return [(reply.infer_response.id, None)]

    metadata = ((AUTH_HEADER, f"{BEARER_PREFIX}{api_key}"),)
    return StreamLoad(address, connections, MODEL_STREAM_INFER, metadata, body, answer)


class HttpLoad:
    """``POST /v2/models/{model}/infer``, N=1, JSON, over keep-alive connections: one per request in
    flight (HTTP/1.1 carries one request at a time on a connection, so ``connections`` does not cap them)."""

    def __init__(
        self, address: str, connections: int, model: str, api_key: str, uuids: list[str] | None = None
    ) -> None:
        self._url = f"http://{address}/v2/models/{model}/infer"
        self._headers = {"authorization": f"{BEARER_PREFIX}{api_key}", "content-type": "application/json"}
        self._bodies = itertools.cycle([
            json.dumps({"inputs": [{"name": UUID_INPUT, "datatype": "BYTES", "shape": [1], "data": [u]}]}).encode()
            for u in uuids or random_uuids()
        ])
        self._session: Any = None

    def __call__(self) -> Awaitable[object]:
        return self._post()

    async def _post(self) -> object:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        async with self._session.post(self._url, data=next(self._bodies), headers=self._headers) as response:
            body = await response.read()
            if response.status != 200:
                raise FlotillaError(f"HTTP {response.status}: {body[:200]!r}")
            return body

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


FRONT_DOORS: tuple[tuple[str, int], ...] = (
    ("unary", 1), ("stream", 1), ("kserve-grpc", 1), ("kserve-grpc", 8), ("triton-stream", 1), ("kserve-http", 1),
)
"""The router's front doors the bench drives, each with the images per request."""


class Load(Protocol):
    def __call__(self) -> Awaitable[object]: ...

    async def close(self) -> None: ...


class UnaryLoad(_Channels):
    """One ``ImageClassifier/Classify`` call per request, cycling through prebuilt bodies."""

    def __init__(self, address: str, connections: int, model: str, api_key: str, bodies: list[bytes]) -> None:
        super().__init__(address, connections)
        self._sends: Iterator[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = itertools.cycle(
            [c.unary_unary(CLASSIFY_METHOD) for c in self.channels]
        )
        self._bodies = itertools.cycle(bodies)
        self._metadata = ((MODEL_HEADER, model), (AUTH_HEADER, f"{BEARER_PREFIX}{api_key}"))

    def __call__(self) -> Awaitable[object]:
        return next(self._sends)(next(self._bodies), metadata=self._metadata, timeout=30.0)


def classify_bodies(model: str, uuids: list[str], top_k: int = 1) -> list[bytes]:
    """One serialised ClassifyRequest per uuid (``top_k`` 0: the model's default)."""
    return [
        inference_pb2.ClassifyRequest(image_uuid=u, model_name=model, top_k=top_k).SerializeToString()
        for u in uuids
    ]


def front_door_load(
    api: str, images: int, *, router: str, router_http: str, connections: int, model: str, api_key: str,
    uuids: list[str] | None = None,
) -> Load:
    """The load of one front door on a router (``router_http``: its KServe HTTP address)."""
    uuids = uuids or random_uuids()
    if api == "unary":
        return UnaryLoad(router, connections, model, api_key, classify_bodies(model, uuids))
    if api == "stream":
        return classify_stream_load(router, connections, model, api_key, classify_bodies(model, uuids))
    if api == "kserve-grpc":
        return KServeLoad(router, connections, model, api_key, images, uuids)
    if api == "triton-stream":
        return triton_stream_load(router, connections, model, api_key, uuids)
    if api == "kserve-http":
        return HttpLoad(router_http, connections, model, api_key, uuids)
    raise ValueError(f"unknown front door {api!r}")
