"""Pool state as the ``flotilla.api.v1.Pools`` message (for GetPools RPCs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flotilla.api.v1 import pools_pb2
from flotilla.pool.pool import EndpointPool, strategy_name


def pools_to_pb(pools: Iterable[EndpointPool[Any]]) -> pools_pb2.Pools:
    reply = pools_pb2.Pools()
    for pool in pools:
        admitted = {id(e) for e in pool.admitted()}
        reply.pools.append(
            pools_pb2.PoolStatus(
                name=pool.name,
                strategy=strategy_name(pool.strategy),
                max_outstanding=pool.max_outstanding or 0,
                endpoints=[
                    pools_pb2.EndpointStatus(
                        address=e.address, admitted=id(e) in admitted, outstanding=e.outstanding,
                        calls=e.calls, failures=e.failures, ejections=e.ejections,
                    )
                    for e in pool.endpoints
                ],
            )
        )
    return reply
