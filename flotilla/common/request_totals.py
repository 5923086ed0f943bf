"""A model queue's cumulative request counters, as the batching tier reports them (no grpc).

One record for every place they travel: a batcher's heartbeat (``QueueCounters``), the controller's
sums over the fleet (``services.controller.statistics``) and its GetModelStatistics answer
(``ModelRequestStatistics``); both messages name the counters alike (``<name>_total``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RequestTotals:
    """Cumulative counters of one model's queue: on one shard process, or summed over several."""

    arrivals: int = 0
    """Requests accepted into the queue."""
    dispatched: int = 0
    """Requests that left it in a batch."""
    queue_wait_s: float = 0.0
    """Sum of the dispatched requests' arrival-to-dispatch times."""
    batches: int = 0
    """Batches dispatched."""
    succeeded: int = 0
    """Requests answered with a result."""
    success_s: float = 0.0
    """Sum of the succeeded requests' arrival-to-answer times."""
    compute_s: float = 0.0
    """Sum of the succeeded requests' dispatch-to-answer times (their batch at a worker and Triton)."""
    failed: int = 0
    """Requests answered with an error: their batch's, their own, or their deadline or queue timeout."""
    fail_s: float = 0.0
    """Sum of the failed requests' arrival-to-answer times."""

    def __add__(self, other: RequestTotals) -> RequestTotals:
        return RequestTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def went_back(self, before: RequestTotals) -> bool:
        """Whether a counter is below its value in ``before``: a process that started again."""
        return any(getattr(self, f.name) < getattr(before, f.name) for f in fields(self))

    def pb_fields(self) -> dict[str, Any]:
        """The counters as the fields of a ``QueueCounters`` or ``ModelRequestStatistics`` message (keyword
        arguments of either's constructor)."""
        return {f"{f.name}_total": getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_pb(cls, message: Any) -> RequestTotals:
        """The counters of a ``QueueCounters`` or ``ModelRequestStatistics`` message."""
        return cls(*(getattr(message, f"{f.name}_total") for f in fields(cls)))
