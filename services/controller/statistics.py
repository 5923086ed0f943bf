"""Each model's request statistics over the whole fleet, since the controller started (no grpc, no I/O).

Every batching shard reports its queues' cumulative counters in its heartbeats (``RequestTotals``: since
its process started). A model's totals are the sum over the shard processes that ever held its queue:
the latest counters of each live one, plus the last of each that is gone (restarted, or dropped as
dead), so they only grow while a model is registered, whatever its shards do. A shard that loses a
model keeps its counters here until it goes: a shard that still answers a moved model's calls (its
grace) reports them on, and they are not counted twice. What this feeds: the router's KServe
ModelStatistics (Triton's ``get_inference_statistics``) through the controller's GetModelStatistics.
"""

from __future__ import annotations

from collections.abc import Mapping

from flotilla.common.request_totals import RequestTotals


class FleetStatistics:
    """Every registered model's ``RequestTotals`` over the shard processes that held its queue."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, RequestTotals]] = {}
        """model -> shard address -> the latest counters of the shard's current process."""
        self._models_of: dict[str, set[str]] = {}
        """shard address -> the models it has counters of here."""
        self._gone: dict[str, RequestTotals] = {}
        """model -> the sum of the last counters of shard processes that are gone."""
        self._last_arrival: dict[str, float] = {}
        """model -> its latest request's arrival at any shard (the controller's clock)."""

    def report(
        self, address: str, counters: Mapping[str, RequestTotals], last_arrivals: Mapping[str, float | None] | None = None
    ) -> None:
        """A shard's heartbeat: its counters of the queues that changed, and when each one's latest
        request arrived (on the controller's clock; None: none yet)."""
        for model, arrived_s in (last_arrivals or {}).items():
            if arrived_s is not None and arrived_s > self._last_arrival.get(model, float("-inf")):
                self._last_arrival[model] = arrived_s
        for model, totals in counters.items():
            shards = self._latest.setdefault(model, {})
            before = shards.get(address)
            if before is not None and totals.went_back(before):  # restarted without saying so
                self._retire(address, model)
            self._latest.setdefault(model, {})[address] = totals
            self._models_of.setdefault(address, set()).add(model)

    def restarted(self, address: str) -> None:
        """The shard's process started again: its counters start again from zero."""
        self.gone(address)

    def gone(self, address: str) -> None:
        """The shard is dropped (dead): what its process counted stays in its models' totals."""
        for model in self._models_of.pop(address, set()):
            self._retire(address, model)

    def forget(self, model: str) -> None:
        """The model is removed from the registry: its statistics with it."""
        self._gone.pop(model, None)
        self._last_arrival.pop(model, None)
        for address in self._latest.pop(model, {}):
            self._models_of.get(address, set()).discard(model)

    def totals(self, model: str) -> RequestTotals:
        """``model``'s totals over the fleet (zero before any shard reported it)."""
        total = self._gone.get(model, RequestTotals())
        for totals in self._latest.get(model, {}).values():
            total = total + totals
        return total

    def last_arrival_s(self, model: str) -> float | None:
        """When ``model``'s latest request arrived at a shard (the controller's clock); None: none seen."""
        return self._last_arrival.get(model)

    def _retire(self, address: str, model: str) -> None:
        shards = self._latest.get(model, {})
        totals = shards.pop(address, None)
        if not shards:
            self._latest.pop(model, None)
        if totals is not None:
            self._gone[model] = self._gone.get(model, RequestTotals()) + totals
