"""gRPC layer of the batcher's operator API: each hosted model's policy and statistics."""

from __future__ import annotations

from typing import Any

import grpc
from pydantic import ValidationError

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, pools_pb2
from flotilla.common.admin import AdminGate
from flotilla.common.tls import peer_common_names
from flotilla.config import BatchingSettings
from flotilla.errors import InvalidArgument
from flotilla.pool.pool import EndpointPool
from flotilla.pool.status import pools_to_pb
from flotilla.services.batcher.lanes import Lane, Lanes, LaneState


def policy_to_pb(policy: BatchingSettings) -> batcher_pb2.BatchingPolicy:
    return batcher_pb2.BatchingPolicy(
        max_batch_size=policy.max_batch_size,
        preferred_batch_sizes=policy.preferred_batch_sizes,
        max_queue_delay_us=policy.max_queue_delay_us,
        max_queue_size=policy.max_queue_size,
        max_inflight_batches=policy.max_inflight_batches,
        priority_levels=policy.priority_levels,
        default_priority_level=policy.default_priority_level,
        priority_aging_us=policy.priority_aging_us,
        default_timeout_us=policy.default_timeout_us,
        timeout_action=policy.timeout_action,
    )


def policy_from_pb(message: batcher_pb2.BatchingPolicy, current: BatchingSettings) -> BatchingSettings:
    """A validated policy; fields the message leaves at zero keep their current value
    where zero is not a meaningful setting."""
    fields = {
        "max_batch_size": message.max_batch_size or current.max_batch_size,
        "preferred_batch_sizes": list(message.preferred_batch_sizes),
        "max_queue_delay_us": message.max_queue_delay_us,
        "max_queue_size": message.max_queue_size or current.max_queue_size,
        "max_inflight_batches": message.max_inflight_batches or current.max_inflight_batches,
        "priority_levels": message.priority_levels,
        "default_priority_level": message.default_priority_level,
        "priority_aging_us": message.priority_aging_us,
        "default_timeout_us": message.default_timeout_us,
        "timeout_action": message.timeout_action or current.timeout_action,
        "batch_timeout_s": current.batch_timeout_s,
    }
    try:
        return BatchingSettings(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"invalid batching policy: {problems}") from exc


def stats_to_pb(lane: Lane, *, reset: bool = False) -> batcher_pb2.BatcherStats:
    """A lane's statistics (zeroed after reading with ``reset``; the cumulative totals stay)."""
    queue = lane.queue
    stats = queue.stats
    p50, p90, p99 = stats.queue_wait_ms((50, 90, 99))
    reply = batcher_pb2.BatcherStats(
        model_name=lane.model,
        requests=stats.items,
        batches=stats.batches,
        expired=stats.expired,
        rejected_full=stats.rejected_full,
        mean_batch_size=stats.items / stats.batches if stats.batches else 0.0,
        batch_sizes=[
            batcher_pb2.BatchSizeCount(batch_size=size, batches=count)
            for size, count in sorted(stats.batch_sizes.items())
        ],
        queue_wait_p50_ms=p50,
        queue_wait_p90_ms=p90,
        queue_wait_p99_ms=p99,
        queue_depth=queue.depth,
        inflight_batches=queue.inflight,
        total_arrivals=queue.totals.arrivals,
        total_dispatched=queue.totals.dispatched,
        total_queue_wait_s=queue.totals.queue_wait_s,
        leaving=lane.state is not LaneState.SERVING,
    )
    if reset:
        queue.reset_stats()
    return reply


class BatcherAdminServicer(batcher_pb2_grpc.BatcherAdminServicer):
    """Each call about one model finds its lane by ``model_name`` (``Lanes.find``: empty on a batcher
    hosting one model names that one). SetBatching, the one call that changes anything, needs the
    admin key (``flotilla.common.admin``; ``admin`` None: open, for tests of the core)."""

    def __init__(self, lanes: Lanes, pools: list[EndpointPool[Any]], admin: AdminGate | None = None) -> None:
        self.lanes = lanes
        self.pools = pools
        self.admin = admin

    async def GetPools(
        self, request: pools_pb2.GetPoolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pools_pb2.Pools:
        return pools_to_pb(self.pools)

    async def GetBatching(
        self, request: batcher_pb2.GetBatchingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> batcher_pb2.BatchingPolicy:
        return policy_to_pb(self.lanes.find(request.model_name).queue.policy)

    async def SetBatching(
        self, request: batcher_pb2.SetBatchingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> batcher_pb2.BatchingPolicy:
        if self.admin is not None:
            self.admin.check(context.invocation_metadata() or (), "SetBatching", peer_common_names(context))
        queue = self.lanes.find(request.model_name).queue
        queue.set_policy(policy_from_pb(request.policy, queue.policy))
        return policy_to_pb(queue.policy)

    async def GetStats(
        self, request: batcher_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> batcher_pb2.BatcherStats:
        return stats_to_pb(self.lanes.find(request.model_name), reset=request.reset)

    async def ListStats(
        self, request: batcher_pb2.ListStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> batcher_pb2.ListStatsResponse:
        return batcher_pb2.ListStatsResponse(
            models=[stats_to_pb(lane, reset=request.reset) for lane in self.lanes],
            dedicated_model=self.lanes.dedicated_model,
        )
