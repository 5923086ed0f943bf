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
        return RequestTotals(*(getattr(self, name) + getattr(other, name) for name in _NAMES))

    def went_back(self, before: RequestTotals) -> bool:
        """Whether a counter is below its value in ``before``: a process that started again."""
        return any(getattr(self, name) < getattr(before, name) for name in _NAMES)

    def pb_fields(self) -> dict[str, Any]:
        """The counters as the fields of a ``QueueCounters`` or ``ModelRequestStatistics`` message (keyword
        arguments of either's constructor)."""
        return {pb_name: getattr(self, name) for name, pb_name in zip(_NAMES, _PB_NAMES, strict=True)}

    @classmethod
    def from_pb(cls, message: Any) -> RequestTotals:
        """The counters of a ``QueueCounters`` or ``ModelRequestStatistics`` message."""
        return cls(*(getattr(message, pb_name) for pb_name in _PB_NAMES))


_NAMES = tuple(f.name for f in fields(RequestTotals))
_PB_NAMES = tuple(f"{name}_total" for name in _NAMES)
"""The counters' names, and theirs in the messages: read once (every heartbeat converts each queue's)."""
