"""The fleet simulation (``flotilla bench --only fleet-sim``) at tiny sizes: it drives the real
controller on simulated time, reports its figures, keeps copies within budgets, and tells the
policies apart. No figure is timed here; the bench reports them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from flotilla.bench import sim_run
from flotilla.bench.fleet_sim import SimConfig, simulate
from flotilla.bench.report import fleet_sim_table
from flotilla.bench.sim_fleet import Traffic
from flotilla.bench.sim_loop import SimulationStalled, run_simulated
from flotilla.bench.sim_policy import ffd_bins
from flotilla.bench.sim_split import split_scenario
from flotilla.services.controller.controller import Controller

TINY = SimConfig(30, 4, day_s=1800.0, rps_per_model=10.0, failures_per_hour=0.5, down_s=30.0)
"""30 models on 4 replicas over a day compressed into half an hour, hot enough that the top models
need several copies, two replica failures."""


def test_virtual_time_jumps_and_threads_run_inline() -> None:
    async def main() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.sleep(3600.0)  # duration: simulated time, which jumps at once
        value = await asyncio.to_thread(lambda: 7)
        return loop.time() - began, value

    wall = time.monotonic()
    elapsed_s, value = run_simulated(main)
    assert elapsed_s == pytest.approx(3600.0) and value == 7
    assert time.monotonic() - wall < 30.0, "a simulated hour does not take a real one"


def test_a_simulation_that_can_never_move_says_so() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()  # nothing will ever set it

    with pytest.raises(SimulationStalled):
        run_simulated(main)


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    over_budget: list[str] = []

    def check(now_s: float, ctl: Controller, traffic: Traffic, ready: NDArray[np.int64]) -> None:
        over_budget.extend(r.address for r in ctl.replicas.values() if r.used_mb > r.budget_mb + 1e-6)

    result = {name: simulate(SimConfig(**{**TINY.__dict__, "policy": name}), on_tick=check)
              for name in ("flotilla", "lru")}
    result["everywhere"] = simulate(SimConfig(**{**TINY.__dict__, "policy": "everywhere"}))
    result["over_budget"] = {"replicas": over_budget}
    return result


def test_a_run_reports_every_figure(runs: dict[str, dict[str, Any]]) -> None:
    flotilla = runs["flotilla"]
    for key in ("decision_round_ms_p50", "decision_round_ms_p99", "usage_round_ms_p99", "deploy_ms_p99",
                "cold_starts_per_hour", "cold_wait_s_p99", "watch_delta_bytes_per_change_mean",
                "watch_full_bytes_mean", "packing_at_peak", "ready_copies_over_needed_mean"):
        assert key in flotilla, key
    assert flotilla["ticks"] == 1800 and flotilla["requests"] > 0
    assert flotilla["cold_starts"] > 0, "every model starts with no copy"
    assert flotilla["series"] and {"hour", "needed_copies", "ready_copies"} <= set(flotilla["series"][0])
    peak = flotilla["packing_at_peak"]
    # First-fit decreasing is a heuristic, not an optimum: placement may pack the same copies tighter.
    assert peak["ffd_replicas"] >= 1 and peak["replicas_holding"] <= TINY.replicas


def test_copies_never_exceed_a_replicas_budget(runs: dict[str, dict[str, Any]]) -> None:
    assert runs["over_budget"]["replicas"] == []


def test_lru_without_queue_time_scaling_leaves_hot_models_waiting(runs: dict[str, dict[str, Any]]) -> None:
    def waited(run: dict[str, Any]) -> int:
        return int(run["requests_waited_over_threshold"] + run["requests_rejected"])

    assert waited(runs["lru"]) > 2 * waited(runs["flotilla"])
    assert runs["lru"]["ready_copies_over_needed_mean"] < runs["flotilla"]["ready_copies_over_needed_mean"]


def test_every_model_everywhere_is_reported_as_not_fitting(runs: dict[str, dict[str, Any]]) -> None:
    assert runs["everywhere"]["fits"] is False and "GiB" in runs["everywhere"]["why"]


def test_seeds_002_copies_follow_the_split() -> None:
    result = split_scenario(phase_s=300.0)
    phases = result["phases"]
    assert [p["split"] for p in phases] == ["50/50", "90/10", "10/90"]
    assert phases[1]["needed_copies"][0] > phases[1]["needed_copies"][1]
    assert all(p["followed_after_s"] is not None for p in phases)
    assert all(c >= n for p in phases for c, n in zip(p["copies_at_end"], p["needed_copies"], strict=True))


def test_ffd_bound_keeps_one_copy_of_a_model_per_replica() -> None:
    assert ffd_bins([("a", 50.0), ("a", 50.0)], 100.0) == 2
    assert ffd_bins([("a", 60.0), ("b", 40.0), ("c", 50.0), ("d", 50.0)], 100.0) == 2


def test_the_bench_block_has_the_table_and_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "img" / "copies.png"
    result = sim_run.run(((30, 4, 900.0, ("flotilla", "lru", "everywhere")),), split_phase_s=120.0, plot_path=plot)
    entry = result["sizes"]["30x4"]
    assert {"flotilla", "lru", "everywhere", "route_update"} <= set(entry)
    block = fleet_sim_table(result, tmp_path / "page.md")
    assert "decision round" in block and "50/50" in block and "does not fit" in block
    if result.get("plot"):
        assert plot.exists() and "(img/copies.png)" in block


def test_simulated_shards_hold_what_the_controller_assigns_them() -> None:
    """The simulated shards apply each heartbeat answer (a change, or the whole list) as the batcher does:
    their models stay the controller's assignment through deploys and undeploys."""
    from flotilla.bench.sim_fleet import SimArtifacts, SimReplica, make_models, model_spec
    from flotilla.bench.sim_loop import SimClock
    from flotilla.bench.sim_shards import SimShards
    from flotilla.config import ControllerSettings
    from flotilla.services.controller.registry import MemoryRecords

    async def main() -> None:
        models = make_models(6, np.random.default_rng(1))
        clock = SimClock()
        replica = SimReplica("r:1", 80_000.0, {m.name: 1.0 for m in models}, clock)
        ctl = Controller(ControllerSettings(measure_memory=False, drain_s=0.0), [replica], SimArtifacts(),  # type: ignore[arg-type]
                         MemoryRecords(), clock=clock)
        shards = SimShards(2)
        shards.heartbeat(ctl)
        for model in models[:4]:
            await ctl.deploy(model.name, model_spec(model, min_copies=0, max_copies=1))
        shards.heartbeat(ctl)
        for model in models[4:]:
            await ctl.deploy(model.name, model_spec(model, min_copies=0, max_copies=1))
        await ctl.undeploy(models[0].name)
        shards.heartbeat(ctl)
        for shard in shards.shards:
            assert shard.models == ctl.shards.shards[shard.address].models
        assert set().union(*(s.models for s in shards.shards)) == {m.name for m in models[1:]}

    run_simulated(main)
