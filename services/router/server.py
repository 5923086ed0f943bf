"""gRPC layer of the router: forwards raw request bytes to a model's batcher.

Every method of the ImageClassifier service is served by a generic handler
with identity (de)serialisers: the router reads the ``authorization`` and
``x-model-name`` headers, picks a batcher replica of that model, and passes
the body through unparsed along with the caller's remaining deadline. The
answer (or the upstream's status) comes back the same way.
"""

from __future__ import annotations

import logging

import grpc

from flotilla.common.server import GrpcPeer, ServiceServer, serve_until_signal
from flotilla.common.status import rpc_errors
from flotilla.config import FlotillaSettings
from flotilla.errors import Unavailable
from flotilla.services.backend_pool.pool import Endpoint, EndpointPool, pool_from_settings
from flotilla.services.router.routing import ApiKeys, RouteTable

log = logging.getLogger(__name__)

# The router does not import the API's protobuf modules: it never parses bodies.
CLASSIFIER_SERVICE = "flotilla.api.v1.ImageClassifier"
MODEL_HEADER = "x-model-name"
AUTH_HEADER = "authorization"
# Headers not passed downstream: credentials stop at the router.
_DROPPED_HEADERS = {AUTH_HEADER}


class ForwardingHandler(grpc.GenericRpcHandler):
    """Serves every ImageClassifier method by forwarding it."""

    def __init__(self, keys: ApiKeys, routes: RouteTable[GrpcPeer[None]]) -> None:
        self.keys = keys
        self.routes = routes

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(f"/{CLASSIFIER_SERVICE}/"):
            return None  # UNIMPLEMENTED

        async def forward(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self._forward(method, raw, context)

        return grpc.unary_unary_rpc_method_handler(forward)

    async def _forward(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with rpc_errors(context, "router"):
            headers = tuple(context.invocation_metadata() or ())
            by_key = {k: v for k, v in headers}
            self.keys.check(by_key.get(AUTH_HEADER))  # type: ignore[arg-type]
            pool = self.routes.pool_for(by_key.get(MODEL_HEADER))  # type: ignore[arg-type]
            passed = tuple((k, v) for k, v in headers if k not in _DROPPED_HEADERS)
            timeout_s = context.time_remaining()

            async def on(endpoint: Endpoint[GrpcPeer[None]]) -> bytes:
                try:
                    return await endpoint.client.raw(method)(raw, metadata=passed, timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        raise Unavailable(exc.details() or f"batcher {endpoint.address} is unavailable") from exc
                    raise  # the batcher's own status, passed through as-is

            return await pool.call(on)
        raise AssertionError("unreachable: rpc_errors aborts the call")


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run the router until SIGTERM."""
    pools: dict[str, EndpointPool[GrpcPeer[None]]] = {}
    checks = []
    for model, addresses in settings.endpoints.batchers.items():
        if addresses:
            pools[model], check = pool_from_settings(
                f"batcher of {model}", {a: GrpcPeer(a) for a in addresses}, settings.pools,
                probe=lambda e: e.client.serving(CLASSIFIER_SERVICE),
            )
            checks.append(check)
    keys = ApiKeys(k.get_secret_value() for k in settings.router.api_keys)
    if not settings.router.api_keys:
        log.warning("router: no API keys configured; every request will be rejected")
    server = ServiceServer("router", [CLASSIFIER_SERVICE], grace_s=settings.shutdown_grace_s)
    server.server.add_generic_rpc_handlers([ForwardingHandler(keys, RouteTable(pools))])
    for check in checks:
        check.start()

    async def cleanup() -> None:
        for check in checks:
            await check.stop()
        for pool in pools.values():
            for endpoint in pool.endpoints:
                await endpoint.client.close()

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
