"""gRPC layer of the router: forwards raw request bytes to a model's batcher.

Every method of the ImageClassifier service is served by a generic handler
with identity (de)serialisers: the router reads the ``authorization`` and
``x-model-name`` headers, picks a batcher replica of that model, and passes
the body through unparsed along with the caller's remaining deadline, as a
frame on this router's one ``Relay`` stream to that batcher (calls ready in
the same event-loop turn share a message; ``flotilla.common.relay``). The
answer (or the batcher's status) comes back the same way.

Routes follow the controller: each fleet snapshot's models and their
registered batchers become the route table, so a model deployed at run time
is routed without a restart and an undeployed one answers NOT_FOUND.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from flotilla.api.v1 import controller_pb2
from flotilla.common import tracing
from flotilla.common.fleet import FleetWatcher
from flotilla.common.interceptors import MAX_CACHED_METHODS, UNKNOWN_MODEL, AdmissionLimit
from flotilla.common.peer import GrpcPeer
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.wire import AUTH_HEADER, CLASSIFIER_SERVICE, MODEL_HEADER
from flotilla.config import FlotillaSettings, PoolSettings
from flotilla.errors import DeadlineExceeded
from flotilla.pool.discovery import DnsEndpoints, pool_following, replace_endpoints
from flotilla.pool.pool import ActiveHealthCheck, Endpoint, pool_from_settings
from flotilla.services.router.routing import ApiKeys, RouteTable

log = logging.getLogger(__name__)

# The router does not import the API's protobuf modules: it never parses bodies.
# Headers not passed downstream: credentials stop at the router; the caller's
# user agent and encodings describe its connection, not the call.
_DROPPED_HEADERS = {AUTH_HEADER, "user-agent", "grpc-accept-encoding"}
FIRST_FLEET_TIMEOUT_S = 10.0


class ForwardingHandler(grpc.GenericRpcHandler):
    """Serves every ImageClassifier method by forwarding it."""

    def __init__(self, keys: ApiKeys, routes: RouteTable[GrpcPeer[None]]) -> None:
        self.keys = keys
        self.routes = routes
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        if not method.startswith(f"/{CLASSIFIER_SERVICE}/"):
            return None  # UNIMPLEMENTED

        async def forward(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return await self._forward(method, raw, context)

        handler = grpc.unary_unary_rpc_method_handler(forward)
        if len(self._handlers) < MAX_CACHED_METHODS:  # callers name methods; the cache stays bounded
            self._handlers[method] = handler
        return handler

    async def _forward(self, method: str, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        # Text headers only: a binary one (a -bin key) has no reader below and no place in a relay
        # frame, whose headers are strings.
        headers = [(k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
        by_key = dict(headers)
        self.keys.check(by_key.get(AUTH_HEADER))
        pool = self.routes.pool_for(by_key.get(MODEL_HEADER))
        # Credentials and transport headers stop here; the trace context becomes this router span's.
        passed = [(k, v) for k, v in headers if k not in _DROPPED_HEADERS]
        if tracing.enabled():
            passed = list(tracing.inject(passed))

        async def on(endpoint: Endpoint[GrpcPeer[None]]) -> bytes:
            # Each attempt gets what is left of the caller's deadline, not the whole of it.
            timeout_s = context.time_remaining()
            if timeout_s is not None and timeout_s <= 0:
                raise DeadlineExceeded("deadline passed before a batcher could answer")
            # One frame on this router's stream to that batcher; its status comes back as a FlotillaError
            # of the same code, message and origin. The pool retries the batcher's own UNAVAILABLE (a
            # broken stream, a batcher shutting down) on another batcher; one the batcher relays from
            # below (its worker, S3, Triton: an origin) reaches the caller as it came.
            return await endpoint.client.relay.call(method, raw, passed, timeout_s)

        return await pool.call(on)


class BatcherRoutes:
    """Keeps the route table equal to the fleet: one pool per model over its batchers."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.table: RouteTable[GrpcPeer[None]] = RouteTable()
        self._checks: dict[str, ActiveHealthCheck[GrpcPeer[None]]] = {}
        self._discovery: dict[str, DnsEndpoints] = {}

    async def apply(self, fleet: controller_pb2.Fleet) -> None:
        wanted = {m.name: list(m.batchers) for m in fleet.models if m.batchers}
        for model in [m for m in self.table.models if m not in wanted]:
            await self._drop(model)
            log.info("router: route for %s removed", model)
        for model, addresses in wanted.items():
            pool = self.table.get(model)
            if pool is None:
                pool, check = pool_from_settings(
                    f"batcher of {model}", {}, self.settings,
                    probe=lambda e: e.client.serving(CLASSIFIER_SERVICE),
                )
                self.table.put(model, pool)
                self._checks[model] = check
                check.start()
                log.info("router: route for %s -> %s", model, ", ".join(addresses))
            if self.settings.dns_refresh_interval_s:
                # Batchers behind headless Services: one endpoint per pod, re-resolved.
                following = self._discovery.get(model)
                if following is None or following.targets != addresses:
                    if following is not None:
                        await following.stop()
                    self._discovery[model] = await pool_following(
                        pool, addresses, GrpcPeer, lambda p: p.close(),
                        interval_s=self.settings.dns_refresh_interval_s,
                    )
                continue
            await replace_endpoints(pool, addresses, GrpcPeer, lambda p: p.close())

    async def _drop(self, model: str) -> None:
        pool = self.table.remove(model)
        following = self._discovery.pop(model, None)
        if following is not None:
            await following.stop()
        check = self._checks.pop(model, None)
        if check is not None:
            await check.stop()
        for peer in pool.set_endpoints({}) if pool else []:
            await peer.close()

    async def close(self) -> None:
        for model in self.table.models:
            await self._drop(model)


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run the router until SIGTERM."""
    if not settings.endpoints.controller:
        raise SystemExit("router: endpoints.controller is empty; the router follows the controller's routes")
    keys = ApiKeys(k.get_secret_value() for k in settings.router.api_keys)
    if not settings.router.api_keys:
        log.warning("router: no API keys configured; every request will be rejected")
    routes = BatcherRoutes(settings.pools)
    watcher = FleetWatcher(settings.endpoints.controller, routes.apply, name="router")
    watcher.start()
    if not await watcher.wait_first(FIRST_FLEET_TIMEOUT_S):
        log.warning("router: no answer from the controller at %s yet; starting with no routes",
                    settings.endpoints.controller)
    server = ServiceServer(
        "router", [CLASSIFIER_SERVICE], grace_s=settings.shutdown_grace_s, tier="router",
        admission=AdmissionLimit("router", settings.router.max_concurrent_calls, "router.max_concurrent_calls"),
        # Callers name any model they like: only routed ones become label values.
        model_label=lambda name: name if routes.table.get(name) is not None else UNKNOWN_MODEL,
        reuse_port=settings.router.processes > 1,
    )
    server.server.add_generic_rpc_handlers([ForwardingHandler(keys, routes.table)])

    async def cleanup() -> None:
        await watcher.stop()
        await routes.close()

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
