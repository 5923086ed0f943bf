"""What the preprocess core needs from an inference backend (no tritonclient here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from numpy.typing import NDArray


@dataclass(frozen=True)
class InferResult:
    outputs: NDArray[Any]
    backend: str
    """host:port of the replica that ran the batch."""


class InferenceBackend(Protocol):
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
        """Run ``batch`` on a replica holding ``model`` (``version`` 0: the backend's default)."""
        ...
