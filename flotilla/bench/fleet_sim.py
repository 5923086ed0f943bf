"""The control plane at scale, by simulation with the real code (`flotilla bench --only fleet-sim`).

The real ``Controller`` core (registry, placement, autoscaler, cold starts)
runs on simulated time (:mod:`flotilla.bench.sim_loop`) against simulated
Triton replicas and traffic (:mod:`flotilla.bench.sim_fleet`): N models with
Zipf-distributed rates whose ranks shift over a simulated day, R replicas of
an 80 GiB budget, and replica failures (a replica down for ``down_s``, then
back empty). Nothing runs the controller's background loops: each tick of
``tick_s`` the simulation moves the traffic, starts a cold start
(``ensure_loaded``) for each model with requests and no ready copy, feeds the
usage counters (:func:`feed_usage`), then runs one decision round
(``check_replicas_once`` + ``autoscale_once``), timed in CPU
(``time.process_time``: the process's CPU, and the simulation adds no
thread).

Per run (:func:`simulate`): controller CPU per decision round, per usage
round and per deploy; cold starts, their wait (simulated seconds) and the
requests that waited for a copy; the fleet-watch message per change; memory
packing against a first-fit-decreasing bound over the same copies; copies
against demand over the day. The same simulator runs the baselines of
:mod:`flotilla.bench.sim_policy`, and :func:`split_scenario` the seeds' 002
case: 2 models on 20 GPUs, the split moving 50/50 -> 90/10 -> 10/90.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from flotilla.api.v1 import controller_pb2
from flotilla.common import metrics
from flotilla.common.fleet import FleetState
from flotilla.config import AutoscaleSettings
from flotilla.errors import FlotillaError
from flotilla.services.controller.controller import Controller, settle_heap
from flotilla.services.controller.registry import MemoryRecords
from flotilla.services.controller.server import fleet_since, fleet_to_pb

from .sim_fleet import SimArtifacts, SimModel, SimReplica, Traffic, make_models, model_spec, needed_copies
from .sim_loop import SimClock, run_simulated, settle
from .sim_policy import Policy, ffd_bins, policy
from .sim_shards import SimShards

DEFAULT_GC_THRESHOLDS = gc.get_threshold()
GIB = 1024.0
BUDGET_MB = 80 * GIB
"""A replica's memory budget: one 80 GB GPU."""
MODELS_PER_SHARD = 500
SAMPLES_PER_DAY = 96
WATCH_SAMPLES = 8
"""Fleet-watch messages measured per run (each a full snapshot now: O(fleet))."""


@dataclass(frozen=True)
class SimConfig:
    models: int
    replicas: int
    day_s: float = 4 * 3600.0
    """Simulated seconds of one day: its 24 hours of rank shifts are compressed into it."""
    tick_s: float = 1.0
    """Traffic step and decision round interval (the autoscaler's default interval_s)."""
    rps_per_model: float = 0.5
    """The fleet's mean request rate per model."""
    zipf_s: float = 1.4
    failures_per_hour: float = 0.01
    """Replica failures per simulated hour, as a fraction of the replicas (at least one per day)."""
    down_s: float = 60.0
    policy: str = "flotilla"
    seed: int = 2
    shards: int = 0
    """Batching shards; 0: one per ``MODELS_PER_SHARD`` models."""


@dataclass
class _Book:
    """What one run records as it goes."""

    round_cpu_s: list[float] = field(default_factory=list)
    round_parts_s: list[tuple[float, float, float]] = field(default_factory=list)
    """check_replicas_once, autoscale_once, shards_once of each round."""
    round_gc_s: list[float] = field(default_factory=list)
    """The interpreter's garbage collection within each round (part of ``round_cpu_s``)."""
    usage_cpu_s: list[float] = field(default_factory=list)
    deploy_cpu_s: list[float] = field(default_factory=list)
    deploy_watch: list[dict[str, float]] = field(default_factory=list)
    cold_waits_s: list[float] = field(default_factory=list)
    cold_failed: int = 0
    background_cpu_s: float = 0.0
    """CPU of everything else between rounds: cold starts, placements, loads and unloads, scalings."""
    series: list[dict[str, float]] = field(default_factory=list)
    deltas: list[dict[str, float]] = field(default_factory=list)
    full: list[dict[str, float]] = field(default_factory=list)
    packing: list[dict[str, float]] = field(default_factory=list)


class _GcMeter:
    """CPU seconds the interpreter's cyclic garbage collector spent while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.spent_s = 0.0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.process_time()
        else:
            self.spent_s += time.process_time() - self._began


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values), q))


def _ms(values: list[float], q: float) -> float:
    return round(_percentile(values, q) * 1000.0, 3)


def feed_usage(ctl: Controller, traffic: Traffic, shards: SimShards) -> float:
    """The one place the traffic reaches the controller: each shard's heartbeat with its changed
    queues' counters (``shard_heartbeat``); returns the controller CPU seconds it took."""
    shards.count(ctl, traffic)
    shards.heartbeat(ctl)
    return shards.take_cpu()


def _ready_counts(ctl: Controller, index: dict[str, int]) -> tuple[NDArray[np.int64], int, float]:
    """Ready copies per model (replicas up only), copies in any state, memory used (MiB)."""
    ready = np.zeros(len(index), dtype=np.int64)
    copies, used = 0, 0.0
    for replica in ctl.replicas.values():
        used += replica.used_mb
        copies += len(replica.copies)
        if not replica.healthy:
            continue
        for name, copy in replica.copies.items():
            if copy.state == "ready" and name in index:
                ready[index[name]] += 1
    return ready, copies, used


def _watch_cost(ctl: Controller, since: int | None, state: FleetState) -> dict[str, float]:
    """The WatchFleet message a watcher holding generation ``since`` gets now (``fleet_since``; the
    whole fleet, ``fleet_to_pb``, when ``since`` is None), its CPU on the controller (build and
    serialize, once for every watcher: ``FleetFeed`` caches it) and on one watcher (parse and
    ``FleetState.apply``)."""
    started = time.process_time()
    message = fleet_to_pb(ctl) if since is None else fleet_since(ctl, since)
    data = message.SerializeToString()
    built = time.process_time()
    change = state.apply(controller_pb2.Fleet.FromString(data))
    applied = time.process_time()
    return {"bytes": float(len(data)), "controller_ms": (built - started) * 1000.0,
            "watcher_ms": (applied - built) * 1000.0, "models": float(len(change.changed) + len(change.removed)),
            "generations": float(ctl.generation - (since or 0)), "full": float(not message.delta)}


def _packing(ctl: Controller) -> dict[str, float]:
    copies = [(c.model, c.memory_mb) for r in ctl.replicas.values() for c in r.copies.values()]
    used = sum(m for _, m in copies)
    held = sum(1 for r in ctl.replicas.values() if r.copies)
    bins = ffd_bins(copies, BUDGET_MB) if copies else 0
    return {"copies": float(len(copies)), "used_gib": used / GIB, "replicas_holding": float(held),
            "ffd_replicas": float(bins), "fill_of_holding": used / (held * BUDGET_MB) if held else 0.0,
            "fill_ffd": used / (bins * BUDGET_MB) if bins else 0.0}


def _failures(config: SimConfig, rng: np.random.Generator) -> Iterator[tuple[float, int]]:
    """(time, replica index) of each injected failure over the day."""
    hours = config.day_s / 3600.0
    count = round(config.failures_per_hour * config.replicas * hours)
    if config.failures_per_hour > 0:
        count = max(count, 1)
    times = np.sort(rng.uniform(0.05 * config.day_s, 0.95 * config.day_s, count))
    for t in times:
        yield float(t), int(rng.integers(config.replicas))


async def _deploy_all(ctl: Controller, models: list[SimModel], chosen: Policy, book: _Book, state: FleetState) -> None:
    """Deploy every model, each timed, and what each deploy sends a watcher (the route to it)."""
    for model in models:
        spec = model_spec(model, min_copies=chosen.min_copies, max_copies=chosen.max_copies)
        since = ctl.generation
        started = time.process_time()
        await ctl.deploy(model.name, spec)
        book.deploy_cpu_s.append(time.process_time() - started)
        book.deploy_watch.append(_watch_cost(ctl, since, state))


async def _run(config: SimConfig, models: list[SimModel], rates: Callable[[float], NDArray[np.float64]] | None,
               on_tick: Callable[[float, Controller, Traffic, NDArray[np.int64]], None] | None) -> dict[str, Any]:
    gc_meter = _GcMeter()
    gc.callbacks.append(gc_meter)
    try:
        return await _day(config, models, rates, on_tick, gc_meter)
    finally:
        gc.callbacks.remove(gc_meter)
        gc.unfreeze()  # _day froze its fleet: the next run's collector sees this one's garbage again
        gc.set_threshold(*DEFAULT_GC_THRESHOLDS)


async def _day(config: SimConfig, models: list[SimModel], rates: Callable[[float], NDArray[np.float64]] | None,
               on_tick: Callable[[float, Controller, Traffic, NDArray[np.int64]], None] | None,
               gc_meter: _GcMeter) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed)
    clock = SimClock()
    chosen = policy(config.policy, replicas=config.replicas)
    load_s = {m.name: m.load_s for m in models}
    replicas = [SimReplica(f"triton-{i:04d}:8001", BUDGET_MB, load_s, clock) for i in range(config.replicas)]
    traffic = Traffic(models, config.rps_per_model * len(models), config.day_s, rng, rates=rates)
    shards = SimShards(config.shards or max(1, len(models) // MODELS_PER_SHARD))
    ctl = Controller(chosen.settings, replicas, SimArtifacts(), MemoryRecords(), clock=clock)  # type: ignore[arg-type]
    book = _Book()
    shards.heartbeat(ctl)  # the shards report before the first deploy, so each model gets a queue at once
    watcher = FleetState()
    _watch_cost(ctl, None, watcher)
    t0 = clock.now()
    await _deploy_all(ctl, models, chosen, book, watcher)
    settle_heap()  # as the controller process does once it has started (services/controller/server.py)
    deployed_s = clock.now() - t0
    shards.heartbeat(ctl)
    shards.take_cpu()
    failures = list(_failures(config, rng))
    down: list[tuple[float, SimReplica]] = []
    cold: dict[str, asyncio.Task[None]] = {}
    # Waits are judged by the default autoscaler's threshold and idle window whatever the policy (the LRU
    # baseline turns them off for itself, not for the comparison).
    judged = AutoscaleSettings()
    threshold_s = judged.queue_wait_high_ms / 1000.0
    sample_every = max(1, round(config.day_s / SAMPLES_PER_DAY / config.tick_s))
    watch_every = max(1, round(config.day_s / WATCH_SAMPLES / config.tick_s))
    start = clock.now()
    ticks = round(config.day_s / config.tick_s)
    generation0 = ctl.generation
    seen = ctl.generation

    async def cold_start(name: str) -> None:
        began = clock.now()
        try:
            await ctl.ensure_loaded(name)
        except FlotillaError:
            book.cold_failed += 1
        else:
            book.cold_waits_s.append(clock.now() - began)
        finally:
            cold.pop(name, None)

    for tick in range(ticks):
        now = clock.now() - start
        while failures and failures[0][0] <= now:
            _, index = failures.pop(0)
            if replicas[index].live:
                replicas[index].fail()
                down.append((now + config.down_s, replicas[index]))
        for back in [d for d in down if d[0] <= now]:
            back[1].recover()
            down.remove(back)
        ready, copies, used = _ready_counts(ctl, traffic.index)
        demand = traffic.step(now, config.tick_s, ready, threshold_s)
        for i in np.flatnonzero((ready == 0) & (traffic.backlog > 0)):
            name = traffic.names[i]
            if name not in cold:
                cold[name] = asyncio.create_task(cold_start(name))
        if on_tick is not None:
            on_tick(now, ctl, traffic, ready)
        began = time.process_time()
        await settle()  # the loads, cold starts and scalings under way run first: the rounds are timed alone
        book.background_cpu_s += time.process_time() - began
        heard = feed_usage(ctl, traffic, shards)
        gc_before = gc_meter.spent_s
        began = time.process_time()
        await ctl.observe_usage_once()
        decided = time.process_time()
        await ctl.check_replicas_once()
        checked = time.process_time()
        await ctl.autoscale_once()
        scaled = time.process_time()
        await ctl.shards_once()
        ended = time.process_time()
        book.round_cpu_s.append(ended - decided)
        book.round_parts_s.append((checked - decided, scaled - checked, ended - scaled))
        book.round_gc_s.append(gc_meter.spent_s - gc_before)
        book.usage_cpu_s.append(decided - began + heard)
        if ctl.generation != seen:
            book.deltas.append(_watch_cost(ctl, seen, watcher))
            seen = ctl.generation
        if tick % sample_every == 0:
            book.series.append({
                "hour": round(traffic.hour(now), 3), "demand_copies": round(float((demand / traffic.capacity).sum()), 2),
                "needed_copies": int(needed_copies(demand, traffic.capacity, threshold_s * 1000.0,
                                                   judged.scale_to_zero_idle_s).sum()),
                "ready_copies": int(ready.sum()), "copies": copies, "used_gib": round(used / GIB, 1),
            })
        if tick % watch_every == watch_every // 2:
            book.full.append(_watch_cost(ctl, None, FleetState()))
            book.packing.append(_packing(ctl))
        await asyncio.sleep(config.tick_s)
    for task in list(cold.values()):
        task.cancel()
    changes = ctl.generation - generation0
    await ctl.stop()
    return _summary(config, chosen, book, traffic, replicas, changes, deployed_s)


def _mean(rows: list[dict[str, float]], key: str, digits: int = 3) -> float:
    return round(statistics.fmean(r[key] for r in rows), digits) if rows else 0.0


def _summary(config: SimConfig, chosen: Policy, book: _Book, traffic: Traffic, replicas: list[SimReplica],
             changes: int, deployed_s: float) -> dict[str, Any]:
    hours = config.day_s / 3600.0
    peak = max(book.packing, key=lambda p: p["used_gib"]) if book.packing else {}
    deltas = [d for d in book.deltas if not d["full"]]
    per_change_bytes = [d["bytes"] / max(d["generations"], 1.0) for d in deltas]
    demand = [s["needed_copies"] for s in book.series]
    held = [s["ready_copies"] for s in book.series]
    return {
        "policy": chosen.name, "models": config.models, "replicas": config.replicas,
        "simulated_hours": round(hours, 2), "ticks": len(book.round_cpu_s),
        "decision_round_ms_p50": _ms(book.round_cpu_s, 50), "decision_round_ms_p99": _ms(book.round_cpu_s, 99),
        "decision_round_ms_max": _ms(book.round_cpu_s, 100),
        "decision_round_without_gc_ms_p99": _ms([r - g for r, g in zip(book.round_cpu_s, book.round_gc_s, strict=True)],
                                                99),
        "rounds_with_gc_over_10ms": sum(1 for g in book.round_gc_s if g > 0.01),
        "check_replicas_ms_p50": _ms([p[0] for p in book.round_parts_s], 50),
        "autoscale_ms_p50": _ms([p[1] for p in book.round_parts_s], 50),
        "shards_ms_p50": _ms([p[2] for p in book.round_parts_s], 50),
        "usage_round_ms_p50": _ms(book.usage_cpu_s, 50), "usage_round_ms_p99": _ms(book.usage_cpu_s, 99),
        "deploy_ms_p50": _ms(book.deploy_cpu_s, 50), "deploy_ms_p99": _ms(book.deploy_cpu_s, 99),
        "deploy_all_cpu_s": round(sum(book.deploy_cpu_s), 2), "deploy_all_simulated_s": round(deployed_s, 1),
        "deploy_watch_bytes_mean": _mean(book.deploy_watch, "bytes", 0),
        "deploy_watch_controller_ms_p99": _ms([d["controller_ms"] / 1000.0 for d in book.deploy_watch], 99),
        "deploy_watch_watcher_ms_p99": _ms([d["watcher_ms"] / 1000.0 for d in book.deploy_watch], 99),
        "background_ms_per_tick": round(book.background_cpu_s / max(len(book.round_cpu_s), 1) * 1000.0, 3),
        "cold_starts": len(book.cold_waits_s), "cold_starts_failed": book.cold_failed,
        "cold_starts_per_hour": round(len(book.cold_waits_s) / hours, 1),
        "cold_wait_s_p50": round(_percentile(book.cold_waits_s, 50), 2),
        "cold_wait_s_p99": round(_percentile(book.cold_waits_s, 99), 2),
        "loads": sum(r.loads for r in replicas),
        "requests": traffic.requests_total,
        "requests_waited_for_copy": traffic.waited_for_copy,
        "requests_waited_over_threshold": traffic.waited_over_threshold,
        "requests_rejected": traffic.rejected_total,
        "ready_copies_over_needed_mean": round(statistics.fmean(h / d for h, d in zip(held, demand, strict=True)
                                                                 if d > 0), 2) if demand else 0.0,
        "fleet_changes": changes, "fleet_changes_per_hour": round(changes / hours, 1),
        "watch_delta_messages": len(deltas),
        "watch_delta_bytes_per_change_mean": round(statistics.fmean(per_change_bytes), 1) if deltas else 0.0,
        "watch_delta_controller_ms_mean": _mean(deltas, "controller_ms"),
        "watch_delta_watcher_ms_mean": _mean(deltas, "watcher_ms"),
        "watch_full_bytes_mean": _mean(book.full, "bytes", 0),
        "watch_full_controller_ms_mean": _mean(book.full, "controller_ms"),
        "watch_full_watcher_ms_mean": _mean(book.full, "watcher_ms"),
        "packing_at_peak": {k: round(v, 3) for k, v in peak.items()},
        "series": book.series,
    }


def _forget_gauges() -> None:
    """The controller's per-model gauges live in the process's registry: a run's go with it."""
    for gauge in (metrics.MODEL_COPIES, metrics.MODEL_PLACED, metrics.MODEL_UNPLACEABLE, metrics.MODEL_MIN_COPIES,
                  metrics.MODEL_QUEUE_WAIT_MS, metrics.REPLICA_MEMORY_USED, metrics.REPLICA_MEMORY_BUDGET,
                  metrics.REPLICA_HEALTHY):
        gauge.clear()


def simulate(config: SimConfig, *, rates: Callable[[float], NDArray[np.float64]] | None = None,
             models: list[SimModel] | None = None,
             on_tick: Callable[[float, Controller, Traffic, NDArray[np.int64]], None] | None = None) -> dict[str, Any]:
    """One simulated day of ``config``'s fleet under its policy (see the module docstring)."""
    catalog = models if models is not None else make_models(config.models, np.random.default_rng(config.seed),
                                                            zipf_s=config.zipf_s)
    if config.policy == "everywhere":
        need = sum(m.memory_mb for m in catalog)
        if need > BUDGET_MB:
            return {"policy": "everywhere", "models": config.models, "replicas": config.replicas, "fits": False,
                    "why": f"one replica would hold every model: {need / GIB:.0f} GiB against a budget of "
                           f"{BUDGET_MB / GIB:.0f} GiB"}
    quiet = logging.getLogger("flotilla.services.controller")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(_forget_gauges)
            return run_simulated(lambda: _run(config, catalog, rates, on_tick))
    finally:
        quiet.setLevel(level)
