"""One Classify request through each of the router's front doors, as the load generator calls it.

``flotilla loadtest --api`` picks the door:

- ``unary``: ``ImageClassifier/Classify``, one gRPC call per request;
- ``stream``: requests on ``ImageClassifier/ClassifyStream``: a closed loop
  of N concurrent calls is N requests in flight on one stream (one stream per
  ``STREAM_WINDOW`` of them: past the router's window a stream holds the
  sender, and the load would measure that instead of the mesh);
- ``kserve-grpc``: KServe v2 ``ModelInfer`` (tritonclient's aio client) with
  one ``IMAGE_UUID`` (BYTES, shape [1]);
- ``kserve-http``: KServe v2 over HTTP/REST, ``POST /v2/models/{model}/infer``
  with the same input as JSON, at the router's HTTP address (aiohttp, one
  connection per concurrent call: HTTP/1.1 has one request per connection at
  a time, so a capped pool would be the bottleneck).

Every failure is raised as a ``FlotillaError`` of the door's status, so the
load generator counts them by the same names.
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from flotilla.clients.client import FlotillaClient
from flotilla.clients.stream import ClassifyStream
from flotilla.common.wire import AUTH_HEADER, BEARER_PREFIX
from flotilla.errors import Code, FlotillaError, error_from_code

if TYPE_CHECKING:
    import aiohttp

Api = Literal["unary", "stream", "kserve-grpc", "kserve-http"]
APIS: tuple[Api, ...] = ("unary", "stream", "kserve-grpc", "kserve-http")
Call = Callable[[], Awaitable[object]]

STREAM_WINDOW = 256
"""Requests the load generator puts in flight on one stream at most (``router.stream_window``'s default)."""
UUID_INPUT = "IMAGE_UUID"
TIMEOUT_S = 60.0

HTTP_CODES = {
    400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
    409: Code.ABORTED, 429: Code.RESOURCE_EXHAUSTED, 499: Code.CANCELLED, 501: Code.UNIMPLEMENTED,
    503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED,
}
"""HTTP status -> code, as google.rpc.Code maps them (anything else: INTERNAL)."""


class ApiCalls:
    """Makes the ``call()`` of each front door and owns what they hold open (streams, clients, sessions)."""

    def __init__(
        self, client: FlotillaClient, router: str, router_http: str, api_key: str, *, tls_ca: str = ""
    ) -> None:
        """``tls_ca``: the router serves TLS, its certificate signed by this CA (PEM file); "": plaintext."""
        self.client = client
        self.tls_ca = tls_ca
        self.router = router
        self.router_http = router_http
        self.api_key = api_key
        self._streams: list[ClassifyStream] = []
        self._triton: triton_aio.InferenceServerClient | None = None
        self._http: aiohttp.ClientSession | None = None

    def call(self, api: Api, model: str, uuids: Sequence[str], *, concurrency: int = 1) -> Call:
        """``call()``: one request for ``model`` through ``api``, cycling through ``uuids``."""
        if api == "unary":
            cycle = itertools.cycle(uuids)
            return lambda: self.client.classify(next(cycle), model)
        if api == "stream":
            return self.stream_call(model, uuids, streams=math.ceil(max(1, concurrency) / STREAM_WINDOW))
        if api == "kserve-grpc":
            return self.kserve_grpc_call(model, uuids)
        return self.kserve_http_call(model, uuids)

    def stream_call(self, model: str, uuids: Sequence[str], *, streams: int = 1) -> Call:
        """Requests on ``streams`` open ClassifyStreams, in turn (``close_streams`` ends them)."""
        opened = [self.client.stream(model) for _ in range(streams)]
        self._streams += opened
        cycle, turn = itertools.cycle(uuids), itertools.cycle(opened)
        return lambda: next(turn).classify(next(cycle))

    async def close_streams(self) -> None:
        """End the streams opened so far, once what they have in flight is answered."""
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.close()

    def kserve_grpc_call(self, model: str, uuids: Sequence[str]) -> Call:
        if self._triton is None:
            self._triton = (
                triton_aio.InferenceServerClient(self.router, ssl=True, root_certificates=self.tls_ca)
                if self.tls_ca else triton_aio.InferenceServerClient(self.router)
            )
        triton = self._triton
        headers = {AUTH_HEADER: f"{BEARER_PREFIX}{self.api_key}"}
        cycle = itertools.cycle(uuids)

        async def call() -> object:
            image = triton_aio.InferInput(UUID_INPUT, [1], "BYTES")
            image.set_data_from_numpy(np.array([next(cycle).encode()], dtype=np.object_))
            try:
                return await triton.infer(model, [image], headers=headers, client_timeout=TIMEOUT_S)
            except InferenceServerException as exc:
                raise kserve_grpc_error(exc) from exc

        return call

    def kserve_http_call(self, model: str, uuids: Sequence[str]) -> Call:
        if not self.router_http:
            raise SystemExit("the stack lists no router HTTP address (stack.json's router_http): restart it")
        url = f"{'https' if self.tls_ca else 'http'}://{self.router_http}/v2/models/{model}/infer"
        headers = {AUTH_HEADER: f"{BEARER_PREFIX}{self.api_key}"}
        cycle = itertools.cycle(uuids)

        async def call() -> object:
            body = {"inputs": [{"name": UUID_INPUT, "datatype": "BYTES", "shape": [1], "data": [next(cycle)]}]}
            async with self._session().post(url, json=body, headers=headers) as response:
                payload = await response.read()
            if response.status != 200:
                code = HTTP_CODES.get(response.status, Code.INTERNAL)
                raise error_from_code(code, f"HTTP {response.status}: {payload[:200].decode(errors='replace')}")
            return payload

        return call

    def _session(self) -> aiohttp.ClientSession:
        import aiohttp  # the loadtest extra

        if self._http is None:
            context = ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else None
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=context if context is not None else True),
                timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
            )
        return self._http

    async def close(self) -> None:
        await self.close_streams()
        if self._triton is not None:
            await self._triton.close()
        if self._http is not None:
            await self._http.close()


def kserve_grpc_error(exc: InferenceServerException) -> FlotillaError:
    """tritonclient's exception (its status a string such as ``StatusCode.NOT_FOUND``) as a FlotillaError."""
    name = str(exc.status() or "").rsplit(".", 1)[-1]
    code = Code[name] if name in Code.__members__ else Code.UNKNOWN
    return error_from_code(code, exc.message() or name)
