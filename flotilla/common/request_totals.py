"""A model queue's cumulative request counters, as the batching tier reports them (no grpc).

One record for every place they travel: a batcher's heartbeat (``QueueCounters``), the controller's
sums over the fleet (``services.controller.statistics``) and its GetModelStatistics answer
(``ModelRequestStatistics``); both messages name the counters alike (``<name>_total``, and the
answered batches by size as ``BatchSizeCounters``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from flotilla.api.v1 import controller_pb2


@dataclass(frozen=True)
class BatchSizeTotals:
    """The answered batches of one size: how many, and the sum of their dispatch-to-answer times."""

    batches: int = 0
    compute_s: float = 0.0

    def __add__(self, other: BatchSizeTotals) -> BatchSizeTotals:
        return BatchSizeTotals(self.batches + other.batches, self.compute_s + other.compute_s)


def add_batch_size(sizes: dict[int, BatchSizeTotals], size: int, totals: BatchSizeTotals) -> None:
    """Count ``totals`` into ``sizes``' entry for ``size`` (a new one when that size is not there yet)."""
    before = sizes.get(size)
    sizes[size] = totals if before is None else before + totals


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
    batch_sizes: Mapping[int, BatchSizeTotals] = field(default_factory=dict)
    """Batch size -> the batches of that size that got results (one request of it succeeded at least),
    each batch's time once: Triton's batch_stats. Only sizes seen."""

    def __add__(self, other: RequestTotals) -> RequestTotals:
        sizes = dict(self.batch_sizes)
        for size, totals in other.batch_sizes.items():
            add_batch_size(sizes, size, totals)
        summed: dict[str, Any] = {name: getattr(self, name) + getattr(other, name) for name in _NAMES}
        return RequestTotals(**summed, batch_sizes=sizes)

    def went_back(self, before: RequestTotals) -> bool:
        """Whether a counter is below its value in ``before``: a process that started again."""
        return any(getattr(self, name) < getattr(before, name) for name in _NAMES) or any(
            self.batch_sizes.get(size, _NONE).batches < totals.batches for size, totals in before.batch_sizes.items()
        )

    def pb_fields(self) -> dict[str, Any]:
        """The counters as the fields of a ``QueueCounters`` or ``ModelRequestStatistics`` message (keyword
        arguments of either's constructor)."""
        counters = {pb_name: getattr(self, name) for name, pb_name in zip(_NAMES, _PB_NAMES, strict=True)}
        counters["batch_sizes"] = [
            controller_pb2.BatchSizeCounters(size=size, batches_total=totals.batches, compute_s_total=totals.compute_s)
            for size, totals in sorted(self.batch_sizes.items())
        ]
        return counters

    @classmethod
    def from_pb(cls, message: Any) -> RequestTotals:
        """The counters of a ``QueueCounters`` or ``ModelRequestStatistics`` message."""
        sizes = {c.size: BatchSizeTotals(c.batches_total, c.compute_s_total) for c in message.batch_sizes}
        counters: dict[str, Any] = {name: getattr(message, pb_name) for name, pb_name in zip(_NAMES, _PB_NAMES, strict=True)}
        return cls(**counters, batch_sizes=sizes)


_NONE = BatchSizeTotals()
_NAMES = tuple(f.name for f in fields(RequestTotals) if f.name != "batch_sizes")
_PB_NAMES = tuple(f"{name}_total" for name in _NAMES)
"""The scalar counters' names, and theirs in the messages: read once (every heartbeat converts each queue's)."""
