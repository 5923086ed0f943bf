"""What a route change costs the router: CPU per fleet-watch delta at a fleet's size.

``route_update_cost`` builds the router's real ``BatcherRoutes`` and
applies WatchFleet messages to it the way the router does (``FleetState``
first, then the routes): one whole fleet of ``models`` models spread over
``shards`` shards, then ``changes`` single-model deltas in turn: a model
moved to another shard, a model added, a model removed. It reports the
router's CPU time (``time.process_time``) per delta, per kind, and for the
whole fleet, and what the router holds afterwards.

Nothing is reached over the network: the shards' addresses are loopback
ports nobody listens on, channels connect only when used, and the health
checks' first probe (refused at once) is their only use; their interval is
set past the measurement.

Used by the fleet simulation (``flotilla bench --only fleet-sim``), and alone:
``python -m flotilla.bench.routes 1000 10000``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Iterator

from flotilla.api.v1 import controller_pb2
from flotilla.common.fleet import FleetState
from flotilla.config import PoolSettings
from flotilla.services.router.server import BatcherRoutes

FIRST_PORT = 1
"""Shard i listens (it does not) on 127.0.0.1:FIRST_PORT+i: low ports no service of a test machine uses."""
KINDS = ("move", "add", "remove")


def shard_address(index: int) -> str:
    return f"127.0.0.1:{FIRST_PORT + index}"


def _deltas(models: int, shards: int, changes: int, first_generation: int) -> Iterator[tuple[str, controller_pb2.Fleet]]:
    """``changes`` single-model delta messages, the kinds in turn; the fleet keeps about its size."""
    routed = {f"model-{i:06d}": i % shards for i in range(models)}
    names = list(routed)
    added = 0
    for n in range(changes):
        kind = KINDS[n % len(KINDS)]
        generation = first_generation + n + 1
        if kind == "move":
            name = names[(n * 7919) % len(names)]
            routed[name] = (routed[name] + 1) % shards
            status = controller_pb2.ModelStatus(name=name, batchers=[shard_address(routed[name])])
            yield kind, controller_pb2.Fleet(generation=generation, delta=True, models=[status])
        elif kind == "add":
            name = f"added-{added:06d}"
            added += 1
            routed[name] = added % shards
            names.append(name)
            status = controller_pb2.ModelStatus(name=name, batchers=[shard_address(routed[name])])
            yield kind, controller_pb2.Fleet(generation=generation, delta=True, models=[status])
        else:
            name = names.pop((n * 104729) % len(names))
            del routed[name]
            yield kind, controller_pb2.Fleet(generation=generation, delta=True, removed_models=[name])


async def measure_route_updates(models: int, shards: int, changes: int = 1000) -> dict[str, float]:
    """``route_update_cost``, on the running event loop."""
    if models < 1 or shards < 1:
        raise ValueError("models and shards must be at least 1")
    # Probes once at each group's creation (refused), then not again while this runs.
    routes = BatcherRoutes(PoolSettings(health_check_interval_s=3600.0), linger_s=0.0)
    state = FleetState()
    fleet = controller_pb2.Fleet(generation=1, models=[
        controller_pb2.ModelStatus(name=f"model-{i:06d}", batchers=[shard_address(i % shards)]) for i in range(models)
    ])
    try:
        started_s = time.process_time()
        await routes.apply(state, state.apply(fleet))
        full_us = (time.process_time() - started_s) * 1e6
        per_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
        watch_us: list[float] = []
        for kind, message in _deltas(models, shards, changes, fleet.generation):
            started_s = time.process_time()
            change = state.apply(message)
            applied_s = time.process_time()
            await routes.apply(state, change)
            ended_s = time.process_time()
            watch_us.append((applied_s - started_s) * 1e6)
            per_kind[kind].append((ended_s - applied_s) * 1e6)
        every = [us for values in per_kind.values() for us in values]
        result = {
            "models": float(models),
            "shards": float(shards),
            "changes": float(len(every)),
            "full_apply_us": full_us,
            "full_apply_us_per_model": full_us / models,
            "delta_us_mean": statistics.fmean(every) if every else 0.0,
            "delta_us_p50": statistics.median(every) if every else 0.0,
            "delta_us_p99": _p99(every),
            "fleet_state_delta_us_mean": statistics.fmean(watch_us) if watch_us else 0.0,
            "routes": float(len(routes.table)),
            "pools": float(len(routes.groups)),
            "peers": float(len(routes.clients)),
        }
        result.update({f"{kind}_us_mean": statistics.fmean(v) for kind, v in per_kind.items() if v})
        return result
    finally:
        await routes.close()


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100)[98]


def route_update_cost(models: int, shards: int, changes: int = 1000) -> dict[str, float]:
    """CPU microseconds the router spends per route change (and per whole fleet) at this fleet size.

    Keys: ``delta_us_mean``, ``_p50``, ``_p99`` (``BatcherRoutes.apply`` per delta, every kind),
    ``move_us_mean``, ``add_us_mean``, ``remove_us_mean`` (per kind), ``full_apply_us`` and
    ``full_apply_us_per_model`` (the first, whole fleet), ``fleet_state_delta_us_mean`` (the
    watcher's ``FleetState.apply`` per delta, before the routes), and what the router holds after
    the deltas: ``routes``, ``pools`` (shard groups), ``peers`` (one per shard).
    """
    return asyncio.run(measure_route_updates(models, shards, changes))


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [1000, 10000]
    for models in sizes:
        result = route_update_cost(models, shards=4)
        print(f"{models:>6} models: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items() if k != "models"))


if __name__ == "__main__":
    main(sys.argv[1:])
