"""Triton replicas behind EndpointPools, one pool per model.

Each replica is reached over KServe v2 HTTP (``http_replica``) when the
controller reports its HTTP endpoint and ``preprocess.triton_protocol`` is
"http" (the default: about a quarter of the client CPU per batch), over
KServe v2 gRPC (``grpc_replica``) otherwise; ``replica`` is what both
offer. A failed call is turned into a Flotilla error here, at the boundary,
from its gRPC status code whichever protocol carried it.

With TLS to Triton (a secure ``dialer``: ``tls.enabled`` and ``tls.triton``) the
protocol is gRPC whatever ``preprocess.triton_protocol`` says, decided here
where the worker picks it: Triton's HTTP endpoint has no TLS, so every replica
is called over gRPC with the worker's certificate (mutual TLS). Shared memory
to a replica on this host works the same over it.

A replica on this host (a loopback address) gets the batch through system
shared memory instead when the worker has regions to give (``shm``): the
batch is copied once into a region registered with that replica, and the
request only names it. A replica that cannot map the region (another host
or container behind a loopback port) gets the bytes inline from then on; one
that lost the registration (it restarted) is registered again and the call
sent again.

Membership is placement: each model's pool holds exactly the replicas the
controller reports a ready copy on (``set_copies``), not whatever a probe
finds. A replica that answers NOT_FOUND is in transition (being unloaded or
restarted): the call is retried on another copy. A model with no copy at
all is a cold start: ``cold_start`` (the controller's EnsureLoaded) is
awaited once per burst, and the batch runs on the copy it loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray
from opentelemetry.trace import SpanKind

from flotilla.common import metrics, tracing
from flotilla.common.tls import PLAINTEXT, Dialer
from flotilla.config import BackendSettings, PoolSettings
from flotilla.errors import (
    BackendError,
    BackendUnavailable,
    Code,
    DeadlineExceeded,
    FlotillaError,
    NoHealthyEndpoint,
    ReplicaInTransition,
)
from flotilla.pool.pool import Endpoint, EndpointPool, make_strategy
from flotilla.services.preprocess.backend import InferResult
from flotilla.services.preprocess.triton.grpc_replica import GrpcReplica
from flotilla.services.preprocess.triton.http_replica import HttpReplica
from flotilla.services.preprocess.triton.replica import InferCall, Replica, ReplicaCallError, lost_region
from flotilla.services.preprocess.triton.shm import Region, SharedMemoryRegions

log = logging.getLogger(__name__)

# model -> replica addresses holding a ready copy once it is loaded
ColdStart = Callable[[str], Awaitable[list[str]]]


def translate_triton_error(code: Code, details: str, address: str, model: str) -> FlotillaError:
    """Map a failed inference call to the Flotilla error a caller can act on."""
    message = details or code.name
    if code == Code.UNAVAILABLE or "Socket closed" in message or "failed to connect" in message:
        return BackendUnavailable(f"Triton at {address} is unavailable: {message}")
    if code == Code.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"Triton at {address} did not answer before the deadline")
    if code == Code.NOT_FOUND:
        return ReplicaInTransition(f"model {model!r} is not loaded on Triton at {address}: {message}")
    return BackendError(f"Triton at {address} failed the batch for {model!r}: {message}")


class TritonBackend:
    """Runs batches on the Triton replicas that hold each model."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        cold_start: ColdStart | None = None,
        clock: Callable[[], float] = time.monotonic,
        shm: SharedMemoryRegions | None = None,
        protocol: str = "http",
        dialer: Dialer = PLAINTEXT,
    ) -> None:
        """``dialer``: how replicas' gRPC endpoints are reached (TLS with the worker's certificate when
        secure; then ``protocol`` is "grpc" whatever is asked: see the module's docstring)."""
        self.settings = settings
        self.cold_start = cold_start
        self._clock = clock
        self.shm = shm
        """Regions for batches to replicas on this host; None sends every batch inline."""
        self.dialer = dialer
        self.protocol = "grpc" if dialer.secure else protocol
        """"http": replicas with a known HTTP endpoint are called over HTTP; "grpc": every one over gRPC
        (always with TLS to Triton)."""
        self._http: dict[str, str] = {}
        self._clients: dict[str, Replica] = {}
        self.pools: dict[str, EndpointPool[Replica]] = {}
        self._cold: dict[str, asyncio.Task[list[str]]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def _http_for(self, address: str) -> str | None:
        """The HTTP endpoint batches for ``address`` go to; None: over gRPC."""
        return self._http.get(address) if self.protocol == "http" else None

    def _new_client(self, address: str) -> Replica:
        prefix = self.shm.prefix_base if self.shm else None
        http = self._http_for(address)
        if http:
            return HttpReplica(address, http, shm_prefix_base=prefix)
        return GrpcReplica(address, shm_prefix_base=prefix, dialer=self.dialer)

    def client_for(self, address: str) -> Replica:
        """The client of the replica at ``address`` (made on first use)."""
        if address not in self._clients:
            self._clients[address] = self._new_client(address)
        return self._clients[address]

    def set_http_endpoints(self, http: Mapping[str, str]) -> None:
        """Each replica's (gRPC address's) HTTP endpoint, from the controller; a replica whose
        endpoint changed gets a new client (the old one closes once this call returns)."""
        self._http = dict(http)
        for address, old in list(self._clients.items()):
            if old.http_address == self._http_for(address):
                continue
            new = self._clients[address] = self._new_client(address)
            for pool in self.pools.values():
                for endpoint in pool.endpoints:
                    if endpoint.address == address:
                        endpoint.client = new
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def set_copies(self, model: str, addresses: list[str], backend: BackendSettings) -> None:
        """The replicas holding a ready copy of ``model`` (its pool becomes exactly these)."""
        pool = self.pools.get(model)
        capacity = backend.instance_groups * backend.predict_concurrency
        if pool is None:
            pool = EndpointPool(
                f"Triton[{model}]", {},
                strategy=make_strategy(backend.strategy or self.settings.strategy),
                max_attempts=max(self.settings.max_attempts, 2),
                eject_after_failures=self.settings.eject_after_failures,
                eject_cooldown_s=self.settings.eject_cooldown_s,
                max_outstanding=capacity,
            )
            self.pools[model] = pool
        pool.max_outstanding = capacity
        if {e.address for e in pool.endpoints} != set(addresses):
            pool.set_endpoints({a: self.client_for(a) for a in addresses})

    def remove(self, model: str) -> None:
        pool = self.pools.pop(model, None)
        if pool is not None:
            pool.set_endpoints({})  # its clients are shared per replica and stay open

    async def _ensure_copy(self, model: str) -> None:
        """Wait for the controller to load a copy (one request per model at a time)."""
        if self.cold_start is None:
            raise NoHealthyEndpoint(f"model {model!r} has no loaded copy")
        task = self._cold.get(model)
        if task is None:
            task = asyncio.ensure_future(self.cold_start(model))
            self._cold[model] = task
            task.add_done_callback(lambda _: self._cold.pop(model, None))
        addresses = await asyncio.shield(task)
        pool = self.pools.get(model)
        if pool is not None and not pool.endpoints:
            pool.set_endpoints({a: self.client_for(a) for a in addresses})

    async def infer(
        self,
        model: str,
        input_name: str,
        batch: NDArray[Any],
        output_name: str,
        *,
        version: int = 0,
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run ``batch`` on one copy and return its ``output_name`` tensor."""
        pool = self.pools.get(model)
        if pool is None:
            self.set_copies(model, [], BackendSettings())
            pool = self.pools[model]
        deadline_s = None if timeout_s is None else self._clock() + timeout_s
        if not pool.endpoints:
            await self._within(self._ensure_copy(model), deadline_s, model)

        batch = np.ascontiguousarray(batch)
        batch_size = int(batch.shape[0])
        region = self._region_for(pool, batch)
        call = InferCall(model, str(version) if version else "", input_name, batch, output_name, region)

        async def on(endpoint: Endpoint[Replica]) -> InferResult:
            replica = endpoint.client
            started_s = time.perf_counter()
            attributes: dict[str, str | int] = {"flotilla.model": model, "flotilla.replica": endpoint.address,
                          "flotilla.model_version": version, "flotilla.batch_size": batch_size,
                          "flotilla.protocol": replica.protocol}
            with tracing.span(f"triton {model}", kind=SpanKind.CLIENT, attributes=attributes):
                try:
                    outputs, transfer = await self._send(replica, call, deadline_s)
                except ReplicaCallError as exc:
                    raise translate_triton_error(exc.code, exc.details, endpoint.address, model) from exc
                finally:
                    metrics.BACKEND_SECONDS.labels(model, endpoint.address).observe(time.perf_counter() - started_s)
            metrics.BACKEND_BATCHES.labels(model, endpoint.address, transfer).inc()
            if outputs is None:
                raise BackendError(f"Triton at {endpoint.address} returned no {output_name!r} output")
            return InferResult(outputs, endpoint.address)

        try:
            try:
                return await pool.call(on, deadline_s=deadline_s)
            except NoHealthyEndpoint:
                if self.cold_start is None or pool.endpoints:
                    raise
                # Every copy went away while the call waited (unloaded, scaled to zero): load one.
                await self._within(self._ensure_copy(model), deadline_s, model)
                return await pool.call(on, deadline_s=deadline_s)
        finally:
            if region is not None and self.shm is not None:
                self.shm.release(region)  # its call has ended: the next batch may overwrite it

    def _region_for(self, pool: EndpointPool[Replica], batch: NDArray[Any]) -> Region | None:
        """A region holding ``batch`` if any of the model's replicas may take it from one."""
        if self.shm is None or not any(e.client.shared_memory for e in pool.endpoints):
            return None
        region = self.shm.acquire(batch.nbytes)
        if region is not None:
            region.write(batch.data)
        return region

    async def _send(
        self, replica: Replica, call: InferCall, deadline_s: float | None
    ) -> tuple[NDArray[Any] | None, str]:
        """One inference on ``replica`` and how the batch went (``shm`` or ``inline``): through
        ``call.region`` where the replica holds it (or can register it now), inline otherwise. A
        replica that lost the region's registration (it restarted) is given it again and the batch
        sent again, once."""

        def remaining_s() -> float | None:
            return None if deadline_s is None else max(deadline_s - self._clock(), 0.001)

        retried = False
        while True:
            in_region = call.region is not None and await replica.holds(call.region, remaining_s())
            try:
                return await replica.infer(call, in_region, remaining_s()), "shm" if in_region else "inline"
            except ReplicaCallError as exc:
                if retried or not in_region or not lost_region(exc.code, exc.details):
                    raise
            assert call.region is not None
            log.info("Triton at %s lost shared-memory region %s: registering it again", replica.address,
                     call.region.name)
            call.region.registered.discard(replica.address)
            retried = True

    async def _within(self, wait: Awaitable[None], deadline_s: float | None, model: str) -> None:
        if deadline_s is None:
            await wait
            return
        try:
            await asyncio.wait_for(wait, max(deadline_s - self._clock(), 0.0))
        except TimeoutError:
            raise DeadlineExceeded(f"deadline passed while model {model!r} was loading (cold start)") from None

    async def close(self) -> None:
        for task in self._cold.values():
            task.cancel()
        if self.shm is not None:
            await asyncio.gather(
                *(client.forget(region) for region in self.shm.regions for client in self._clients.values())
            )
            self.shm.close()
        for client in self._clients.values():
            await client.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
