"""Triton Inference Server replicas behind an EndpointPool.

Talks KServe v2 gRPC through tritonclient's asyncio client and keeps the
real status codes: tritonclient reports them as strings ("StatusCode.X"),
which are turned back into Flotilla errors here, at the boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from flotilla.errors import (
    BackendError,
    BackendUnavailable,
    Code,
    DeadlineExceeded,
    FlotillaError,
    ModelNotFound,
)
from flotilla.services.backend_pool.pool import Endpoint, EndpointPool, Strategy

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
    """Runs batches on Triton replicas chosen by a pool strategy (round-robin by default)."""

    def __init__(self, addresses: Sequence[str], *, strategy: Strategy | None = None) -> None:
        clients = {a: triton_aio.InferenceServerClient(url=a) for a in addresses}
        self.pool: EndpointPool[triton_aio.InferenceServerClient] = EndpointPool(
            "Triton", clients, strategy=strategy
        )

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

        async def on(endpoint: Endpoint[triton_aio.InferenceServerClient]) -> InferResult:
            tensor = InferInput(input_name, list(batch.shape), np_to_triton_dtype(batch.dtype))
            tensor.set_data_from_numpy(batch)
            try:
                reply = await endpoint.client.infer(
                    model,
                    [tensor],
                    outputs=[InferRequestedOutput(output_name)],
                    client_timeout=timeout_s,
                )
            except InferenceServerException as exc:
                raise translate_triton_error(exc, endpoint.address, model) from exc
            outputs = reply.as_numpy(output_name)
            if outputs is None:
                raise BackendError(f"Triton at {endpoint.address} returned no {output_name!r} output")
            return InferResult(outputs, endpoint.address)

        return await self.pool.call(on)

    async def close(self) -> None:
        for endpoint in self.pool.endpoints:
            await endpoint.client.close()
