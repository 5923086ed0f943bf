"""Triton Inference Server replicas behind an EndpointPool.

Talks KServe v2 gRPC through tritonclient's asyncio client and keeps the
real status codes: tritonclient reports them as strings ("StatusCode.X"),
which are turned back into Flotilla errors here, at the boundary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from flotilla.config import BackendSettings, PoolSettings
from flotilla.errors import (
    BackendError,
    BackendUnavailable,
    Code,
    DeadlineExceeded,
    FlotillaError,
    ModelNotFound,
)
from flotilla.services.backend_pool.pool import ActiveHealthCheck, Endpoint, EndpointPool, pool_from_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferResult:
    outputs: np.ndarray
    backend: str
    """host:port of the replica that ran the batch."""


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
        return ModelNotFound(f"model {model!r} is not loaded on Triton at {address}: {message}")
    return BackendError(f"Triton at {address} failed the batch for {model!r}: {message}")


class TritonBackend:
    """Runs batches on Triton replicas: one pool per model, each with its own
    strategy, capacity (instance_groups x predict_concurrency per replica) and
    active readiness probe (server ready and that model ready)."""

    def __init__(
        self,
        addresses: Sequence[str],
        models: dict[str, BackendSettings],
        settings: PoolSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``models`` maps each backend model name to how it runs."""
        self._clients = {a: triton_aio.InferenceServerClient(url=a) for a in addresses}
        self._clock = clock
        self.pools: dict[str, EndpointPool[triton_aio.InferenceServerClient]] = {}
        self._checks: list[ActiveHealthCheck[triton_aio.InferenceServerClient]] = []
        for model, backend in models.items():
            pool, check = pool_from_settings(
                f"Triton[{model}]",
                self._clients,
                settings,
                probe=lambda endpoint, m=model: _ready(endpoint, m),  # type: ignore[misc]
                strategy=backend.strategy,
                max_outstanding=backend.instance_groups * backend.predict_concurrency,
            )
            self.pools[model] = pool
            self._checks.append(check)

    def start(self) -> None:
        """Start the active health checks (needs a running event loop)."""
        for check in self._checks:
            check.start()

    async def infer(
        self,
        model: str,
        input_name: str,
        batch: np.ndarray,
        output_name: str,
        *,
        timeout_s: float | None = None,
    ) -> InferResult:
        """Run ``batch`` on one replica and return its ``output_name`` tensor."""
        pool = self.pools.get(model)
        if pool is None:
            raise ModelNotFound(f"no Triton pool serves model {model!r}")
        deadline_s = None if timeout_s is None else self._clock() + timeout_s

        async def on(endpoint: Endpoint[triton_aio.InferenceServerClient]) -> InferResult:
            tensor = InferInput(input_name, list(batch.shape), np_to_triton_dtype(batch.dtype))
            tensor.set_data_from_numpy(batch)
            remaining_s = None if deadline_s is None else max(deadline_s - self._clock(), 0.001)
            try:
                reply = await endpoint.client.infer(
                    model,
                    [tensor],
                    outputs=[InferRequestedOutput(output_name)],
                    client_timeout=remaining_s,
                )
            except InferenceServerException as exc:
                raise translate_triton_error(exc, endpoint.address, model) from exc
            outputs = reply.as_numpy(output_name)
            if outputs is None:
                raise BackendError(f"Triton at {endpoint.address} returned no {output_name!r} output")
            return InferResult(outputs, endpoint.address)

        return await pool.call(on, deadline_s=deadline_s)

    async def close(self) -> None:
        for check in self._checks:
            await check.stop()
        for client in self._clients.values():
            await client.close()


async def _ready(endpoint: Endpoint[triton_aio.InferenceServerClient], model: str) -> bool:
    return bool(await endpoint.client.is_server_ready() and await endpoint.client.is_model_ready(model))
