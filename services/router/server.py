"""gRPC layer of the router: forwards raw request bytes to a model's batcher.

Every method of the ImageClassifier service is served by a generic handler
with identity (de)serialisers: the router reads the ``authorization`` and
``x-model-name`` headers, picks a batcher replica of that model, and passes
the body through unparsed along with the caller's remaining deadline, as a
frame on this router's one ``Relay`` stream to that batcher (calls ready in
the same event-loop turn share a message; ``flotilla.common.relay``). The
answer (or the batcher's status) comes back the same way.

Routes follow the controller's fleet watch: each model is routed to the
batching shards that hold its queue (``ModelStatus.batchers``), so a model
deployed at run time is routed without a restart and an undeployed one
answers NOT_FOUND. Models on the same shards share one pool, and every pool
shares one peer (one relay stream) per shard (``services.router.shards``).
A shard that answers NOT_FOUND for a model it no longer holds (the model
moved) answered: the pool passes that on and does not count it against the
shard.

API keys follow the same watch (``services.router.keys.KeyBook``): registered
keys arrive and leave as fleet deltas, and every few seconds the router tells
the controller which keys it saw used (``keys list``'s last use).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from flotilla.common.fleet import FleetChange, FleetState, FleetWatcher, key_from_pb
from flotilla.common.interceptors import MAX_CACHED_METHODS, UNKNOWN_MODEL, AdmissionLimit, CallObserver, ModelLabel
from flotilla.common.peer import GrpcPeer
from flotilla.common.server import ServiceServer, serve_until_signal
from flotilla.common.tasks import cancel_and_wait
from flotilla.common.tls import Dialer
from flotilla.common.wire import AUTH_HEADER, CLASSIFIER_SERVICE, CLASSIFY_STREAM_METHOD, KSERVE_SERVICE, MODEL_HEADER
from flotilla.config import FlotillaSettings, PoolSettings
from flotilla.pool.pool import Endpoint
from flotilla.services.router.forward import Forwarder, passed_headers
from flotilla.services.router.http_server import HttpServer
from flotilla.services.router.keys import KeyBook
from flotilla.services.router.kserve.core import KServeFront
from flotilla.services.router.kserve.grpc_api import KServeHandler
from flotilla.services.router.kserve.http import KServeHttp
from flotilla.services.router.reflection import enable_reflection
from flotilla.services.router.routing import ApiKeys
from flotilla.services.router.shards import LINGER_S, ShardRoutes
from flotilla.services.router.streams import ClassifyStreamHandler

log = logging.getLogger(__name__)

# The router does not import the API's protobuf modules: it never parses bodies.
FIRST_FLEET_TIMEOUT_S = 10.0
KEY_USE_REPORT_S = 5.0
"""How often a router tells the controller which keys it saw used (``flotilla keys list``'s last use)."""


class ForwardingHandler(grpc.GenericRpcHandler):
    """Serves every unary ImageClassifier method by forwarding it."""

    def __init__(self, forwarder: Forwarder[GrpcPeer[None]]) -> None:
        self.forwarder = forwarder
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        if not method.startswith(f"/{CLASSIFIER_SERVICE}/") or method == CLASSIFY_STREAM_METHOD:
            return None  # UNIMPLEMENTED, or another handler's (the stream)

        async def forward(raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            headers = context.invocation_metadata() or ()
            by_key = {k: v for k, v in headers if isinstance(v, str)}
            self.forwarder.authorize(by_key.get(AUTH_HEADER), by_key.get(MODEL_HEADER))
            return await self.forwarder.call(
                by_key.get(MODEL_HEADER), raw, passed_headers(headers), context.time_remaining, method
            )

        handler = grpc.unary_unary_rpc_method_handler(forward)
        if len(self._handlers) < MAX_CACHED_METHODS:  # callers name methods; the cache stays bounded
            self._handlers[method] = handler
        return handler


class BatcherRoutes(ShardRoutes[GrpcPeer[None]]):
    """Keeps the route table equal to the fleet: each model to the pool of its batching shards.

    Only the models a fleet message changed or removed are touched (a whole
    fleet: all of them); ``services.router.shards`` has the mechanism.
    """

    def __init__(
        self,
        settings: PoolSettings,
        *,
        make_peer: Callable[[str], GrpcPeer[None]] = GrpcPeer,
        linger_s: float = LINGER_S,
    ) -> None:
        super().__init__(settings, make_peer, _close_peer, _probe, linger_s=linger_s)

    async def apply(self, state: FleetState, change: FleetChange) -> None:
        routes = {name: state.models[name].batchers for name in change.changed if name in state.models}
        await self.follow(routes, change.removed, full=change.full)


async def _close_peer(peer: GrpcPeer[None]) -> None:
    await peer.close()


async def _probe(endpoint: Endpoint[GrpcPeer[None]]) -> bool:
    return await endpoint.client.serving(CLASSIFIER_SERVICE)


async def serve(settings: FlotillaSettings, port: int) -> None:
    """Run the router until SIGTERM."""
    if not settings.endpoints.controller:
        raise SystemExit("router: endpoints.controller is empty; the router follows the controller's routes")
    static = ApiKeys(k.get_secret_value() for k in settings.router.api_keys)
    keys = KeyBook(static, processes=settings.router.processes, clock=time.monotonic, unix_clock=time.time)
    dialer = Dialer(settings.tls)  # mutual TLS to the batchers and the controller when tls.enabled
    routes = BatcherRoutes(settings.pools, make_peer=functools.partial(
        GrpcPeer, dialer=dialer, relay_pacing_s=settings.router.pacing_ms / 1000.0, tier="batcher",
    ))

    async def on_fleet(state: FleetState, change: FleetChange) -> None:
        keys.apply([key_from_pb(state.keys[name]) for name in change.keys_changed if name in state.keys],
                   change.keys_removed, full=change.full)
        await routes.apply(state, change)

    watcher = FleetWatcher(settings.endpoints.controller, on_fleet, name="router", dialer=dialer)
    watcher.start()
    if not await watcher.wait_first(FIRST_FLEET_TIMEOUT_S):
        log.warning("router: no answer from the controller at %s yet; starting with no routes",
                    settings.endpoints.controller)
    # Callers name any model they like: only routed ones become label values.
    model_label: ModelLabel = lambda name: name if routes.table.get(name) is not None else UNKNOWN_MODEL  # noqa: E731
    server = ServiceServer(
        "router", [CLASSIFIER_SERVICE, KSERVE_SERVICE], grace_s=settings.shutdown_grace_s, tier="router",
        admission=AdmissionLimit("router", settings.router.max_concurrent_calls, "router.max_concurrent_calls"),
        model_label=model_label, reuse_port=settings.router.processes > 1, tls=settings.tls, public=True,
        intercept=False,  # every handler below is added observed: no interceptor chain on each request
    )
    if not settings.router.api_keys and not len(keys):
        log.warning("router: no static API keys (router.api_keys) and no registered keys yet; requests are "
                    "refused until `flotilla keys create` makes one")
    def move_targets(model: str) -> list[str]:
        return [address for address, shard in watcher.state.shards.items()
                if not shard.dedicated_model or shard.dedicated_model == model]

    # A model whose only shard died moves once the controller has heard nothing from it for the heartbeat
    # timeout (looked at every heartbeat interval, the last heartbeat up to an interval before the death):
    # while another shard could take it, its calls wait that long, and an interval more for the new route
    # to come, rather than fail.
    shard_settings = settings.controller.shards
    forwarder = Forwarder(keys, routes.table, shards=move_targets,
                          move_hold_s=shard_settings.heartbeat_timeout_s + 3 * shard_settings.heartbeat_interval_s,
                          max_held_calls=settings.router.max_concurrent_calls)
    # The stream's handler first: the unary one leaves ClassifyStream to it. Stopping, streams take no more.
    streams = ClassifyStreamHandler(
        forwarder, CallObserver("router", server.admission, model_label), window=settings.router.stream_window,
        linger_s=settings.router.stream_linger_ms / 1000.0,
    )
    server.on_drain.append(streams.drain)
    server.add_observed([streams, ForwardingHandler(forwarder)])
    # KServe v2 (Triton's gRPC service): the same keys and routes; ready once the fleet is known, until stopping.
    kserve_front = KServeFront(
        forwarder, watcher.state, ready=lambda: watcher.has_fleet and not kserve.stopping.is_set(),
        loader=watcher.ensure_loaded, statistics=watcher.model_statistics,
    )
    kserve = KServeHandler(
        kserve_front, forwarder, CallObserver("router", server.admission, model_label),
        window=settings.router.stream_window,
    )
    server.on_drain.append(kserve.drain)
    server.add_observed([kserve])
    enable_reflection(server.server)  # after the forwarding handler: it answers for the client API first
    # KServe v2 over HTTP/REST on router.http_port: the same front, keys and admission, in this loop.
    http = None
    if settings.router.http_port:
        app = KServeHttp(
            kserve_front, forwarder.authorize, scope=forwarder.scope,
            observer=CallObserver("router", server.admission, model_label),
        )
        http = HttpServer(app, grace_s=settings.shutdown_grace_s, name="router http", tls=settings.tls)
        await http.start(settings.host, settings.router.http_port, reuse_port=settings.router.processes > 1)
        server.on_drain.append(http.drain)

    async def report_key_use() -> None:
        while True:
            await asyncio.sleep(KEY_USE_REPORT_S)
            used = keys.take_used()
            if used:
                await watcher.report_key_use(used)

    reporter = asyncio.create_task(report_key_use(), name="router:key-use")

    async def cleanup() -> None:
        await cancel_and_wait(reporter)
        if http is not None:
            await http.stop()  # begun with the gRPC server's drain
        await watcher.stop()
        await routes.close()

    await serve_until_signal(server, settings.host, port, on_stop=cleanup)
