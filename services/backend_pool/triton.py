"""Triton Inference Server replicas behind EndpointPools, one pool per model.

Talks KServe v2 gRPC through tritonclient's asyncio client and keeps the
real status codes: tritonclient reports them as strings ("StatusCode.X"),
which are turned back into Flotilla errors here, at the boundary.

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
from collections.abc import Awaitable, Callable

import numpy as np
import tritonclient.grpc.aio as triton_aio
from opentelemetry.trace import SpanKind
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from flotilla.common import metrics, tracing
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
from flotilla.services.backend_pool.pool import Endpoint, EndpointPool, make_strategy
from flotilla.services.preprocess.backend import InferResult

log = logging.getLogger(__name__)

# model -> replica addresses holding a ready copy once it is loaded
ColdStart = Callable[[str], Awaitable[list[str]]]


def _status_code(exc: InferenceServerException) -> Code:
    status = exc.status() or ""
    name = status.rsplit(".", 1)[-1]
    return Code[name] if name in Code.__members__ else Code.UNKNOWN


def translate_triton_error(exc: InferenceServerException, address: str, model: str) -> FlotillaError:
    """Map a tritonclient failure to the Flotilla error a caller can act on."""
    code = _status_code(exc)
    message = exc.message() or str(exc)
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
    ) -> None:
        self.settings = settings
        self.cold_start = cold_start
        self._clock = clock
        self._clients: dict[str, triton_aio.InferenceServerClient] = {}
        self.pools: dict[str, EndpointPool[triton_aio.InferenceServerClient]] = {}
        self._cold: dict[str, asyncio.Task[list[str]]] = {}

    def _client(self, address: str) -> triton_aio.InferenceServerClient:
        if address not in self._clients:
            self._clients[address] = triton_aio.InferenceServerClient(url=address)
        return self._clients[address]

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
            pool.set_endpoints({a: self._client(a) for a in addresses})

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
            pool.set_endpoints({a: self._client(a) for a in addresses})

    async def infer(
        self,
        model: str,
        input_name: str,
        batch: np.ndarray,
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

        async def on(endpoint: Endpoint[triton_aio.InferenceServerClient]) -> InferResult:
            tensor = InferInput(input_name, list(batch.shape), np_to_triton_dtype(batch.dtype))
            tensor.set_data_from_numpy(batch)
            remaining_s = None if deadline_s is None else max(deadline_s - self._clock(), 0.001)
            started_s = time.perf_counter()
            attributes = {"flotilla.model": model, "flotilla.replica": endpoint.address,
                          "flotilla.model_version": version, "flotilla.batch_size": int(batch.shape[0])}
            with tracing.tracer.start_as_current_span(f"triton {model}", kind=SpanKind.CLIENT, attributes=attributes):
                try:
                    reply = await endpoint.client.infer(
                        model,
                        [tensor],
                        model_version=str(version) if version else "",
                        outputs=[InferRequestedOutput(output_name)],
                        client_timeout=remaining_s,
                        headers=dict(tracing.inject()),
                    )
                except InferenceServerException as exc:
                    raise translate_triton_error(exc, endpoint.address, model) from exc
                finally:
                    metrics.BACKEND_SECONDS.labels(model, endpoint.address).observe(time.perf_counter() - started_s)
            outputs = reply.as_numpy(output_name)
            if outputs is None:
                raise BackendError(f"Triton at {endpoint.address} returned no {output_name!r} output")
            return InferResult(outputs, endpoint.address)

        try:
            return await pool.call(on, deadline_s=deadline_s)
        except NoHealthyEndpoint:
            if self.cold_start is None or pool.endpoints:
                raise
            # Every copy went away while the call waited (unloaded, scaled to zero): load one.
            await self._within(self._ensure_copy(model), deadline_s, model)
            return await pool.call(on, deadline_s=deadline_s)

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
        for client in self._clients.values():
            await client.close()
