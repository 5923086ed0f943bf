"""Simulated batching shards: how the fleet simulation's traffic reaches the controller.

Each shard heartbeats once per tick through the controller's own
``shard_heartbeat`` (what the gRPC layer calls for a ``ShardHeartbeat``),
as the batcher does (``services/batcher/reports.py``): the cumulative
counters of the queues that changed since its last heartbeat, and the
assignment it holds; it applies the answer's change to its models when the
assignment changed (the models given, those taken away; the whole list when
the answer is full). A model queued on several shards has its traffic split
evenly between them (the routers spread its requests). A shard's CPU counter
grows by the batcher's measured CPU per request (``BATCHER_CPU_S_PER_REQUEST``,
the ceiling part: 89.8 CPU-us per request at batch 8), which the shard book's
busy-shard rule reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from flotilla.services.controller.controller import Controller
from flotilla.services.controller.shards import QueueCounts

from .sim_fleet import Traffic

BATCHER_CPU_S_PER_REQUEST = 89.8e-6
"""The batcher alone at its ceiling, batch 8 (docs/benchmarks.md, ceiling part)."""


@dataclass
class _Queue:
    arrivals_total: int = 0
    dispatched_total: int = 0
    queue_wait_s_total: float = 0.0
    queue_depth: int = 0
    inflight_batches: int = 0

    def counts(self) -> QueueCounts:
        return QueueCounts(self.arrivals_total, self.dispatched_total, self.queue_wait_s_total,
                           self.queue_depth, self.inflight_batches)


@dataclass
class SimShard:
    address: str
    models: set[str] = field(default_factory=set)
    assignment: int = 0
    queues: dict[str, _Queue] = field(default_factory=dict)
    cpu_s_total: float = 0.0
    changed: set[str] = field(default_factory=set)
    """Queues changed since the last heartbeat."""


class SimShards:
    """The shards of a simulated fleet, fed from the traffic each tick (see the module docstring)."""

    def __init__(self, count: int) -> None:
        self.shards = [SimShard(f"shard-{i:03d}:9100") for i in range(count)]
        self._by_address = {s.address: s for s in self.shards}
        self.heartbeat_cpu_s = 0.0
        """Controller CPU spent in ``shard_heartbeat`` since the last ``take_cpu``."""

    def heartbeat(self, ctl: Controller) -> None:
        """Every shard reports its changed queues; the controller's answers give them their models."""
        for shard in self.shards:
            counters = {m: shard.queues[m].counts() for m in shard.changed if m in shard.queues}
            started = time.process_time()
            reply = ctl.shard_heartbeat(shard.address, counters=counters, cpu_seconds_total=shard.cpu_s_total,
                                        assignment=shard.assignment)
            self.heartbeat_cpu_s += time.process_time() - started
            shard.changed.clear()
            if reply.changed:
                # The whole list (full) or its change: the models given, those taken away.
                shard.assignment = reply.assignment
                if reply.full:
                    shard.models = set()
                shard.models |= {name for name, _ in reply.models}
                shard.models -= set(reply.removed)
                for name in list(shard.queues):
                    if name not in shard.models:
                        del shard.queues[name]
                for name in shard.models:
                    shard.queues.setdefault(name, _Queue())

    def take_cpu(self) -> float:
        spent, self.heartbeat_cpu_s = self.heartbeat_cpu_s, 0.0
        return spent

    def count(self, ctl: Controller, traffic: Traffic) -> None:
        """Add the traffic's last step to the queues of the shards holding each model."""
        active = np.flatnonzero(traffic.last_arrivals | traffic.last_served | (traffic.backlog > 0))
        for i in active:
            name = traffic.names[i]
            holders = [self._by_address[a] for a in ctl.shards.holders.get(name, ()) if a in self._by_address]
            holders = [s for s in holders if name in s.queues]
            if not holders:
                continue  # no shard holds its queue yet: the requests are counted nowhere (rejected upstream)
            share = 1.0 / len(holders)
            arrivals, served = int(traffic.last_arrivals[i]), int(traffic.last_served[i])
            for k, shard in enumerate(holders):
                queue = shard.queues[name]
                # Whole requests: the first holder takes the remainder.
                a = arrivals // len(holders) + (arrivals % len(holders) if k == 0 else 0)
                d = served // len(holders) + (served % len(holders) if k == 0 else 0)
                queue.arrivals_total += a
                queue.dispatched_total += d
                queue.queue_wait_s_total += float(traffic.last_wait_s[i]) * share
                depth = int(traffic.backlog[i] * share)
                inflight = int(a > 0 or d > 0)
                if a or d or depth != queue.queue_depth or inflight != queue.inflight_batches:
                    shard.changed.add(name)
                queue.queue_depth, queue.inflight_batches = depth, inflight
                shard.cpu_s_total += a * BATCHER_CPU_S_PER_REQUEST
