"""`flotilla bench --only fleet-sim`: the fleet simulation at each size, its baselines, the seeds' 002
scenario, the router's cost per route change, and the results page's table and plot.

Sizes (``SIZES``): 1 000 models x 100 replicas over a day compressed into
2 simulated hours (each hour of rank shifts lasts 5 minutes), with the
baselines; 10 000 x 1 000 over 5 simulated minutes, Flotilla only (what
the targets are stated at: CPU per round, per deploy, per fleet change; a
whole day there takes the controller's CPU, not the simulation's, past the
few minutes this part may take on 2 cores). The first minutes of every run
are a cold start of the whole fleet (every model deployed with no copy).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .fleet_sim import MODELS_PER_SHARD, SimConfig, simulate
from .sim_split import split_scenario

SIZES: tuple[tuple[int, int, float, tuple[str, ...]], ...] = (
    (1000, 100, 2 * 3600.0, ("flotilla", "lru", "everywhere")),
    (10000, 1000, 300.0, ("flotilla", "everywhere")),
)
"""(models, replicas, simulated seconds of the day, policies)."""
PLOT = Path("docs/img/fleet_sim_copies.png")
DECISION_ROUND_TARGET_MS = 100.0


def route_update(models: int, shards: int) -> dict[str, float] | str:
    """The router's CPU per route change (``flotilla.bench.routes``), or why it was not measured."""
    try:
        from . import routes
    except ImportError as exc:  # pragma: no cover - the module is another part's
        return f"TODO: flotilla.bench.routes not importable ({exc})"
    quiet = [logging.getLogger(name) for name in ("flotilla.services.router", "flotilla.pool")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:  # a line per route and pool otherwise
        logger.setLevel(logging.WARNING)
    try:
        return {k: round(v, 2) for k, v in routes.route_update_cost(models, shards, changes=300).items()}
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def run(sizes: tuple[tuple[int, int, float, tuple[str, ...]], ...] = SIZES, *, split_phase_s: float = 1200.0,
        plot_path: Path | None = PLOT) -> dict[str, Any]:
    result: dict[str, Any] = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "cpus": os.cpu_count(), "sizes": {}}
    for models, replicas, day_s, policies in sizes:
        key = f"{models}x{replicas}"
        entry: dict[str, Any] = {}
        for name in policies:
            print(f"fleet-sim: {key} {name} ({day_s / 3600.0:.2f} simulated hours) ...", flush=True)
            started = time.monotonic()
            entry[name] = simulate(SimConfig(models, replicas, day_s=day_s, policy=name))
            entry[name]["wall_s"] = round(time.monotonic() - started, 1)
        entry["route_update"] = route_update(models, max(1, models // MODELS_PER_SHARD))
        result["sizes"][key] = entry
    print("fleet-sim: seeds 002 (2 models, 20 GPUs, the split moving) ...", flush=True)
    result["split_002"] = {name: split_scenario(name, phase_s=split_phase_s) for name in ("flotilla", "lru")}
    if plot_path is not None:
        result["plot"] = plot(result, plot_path)
    return result


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Copies against demand over the simulated day at the first size; the path written, or None
    without matplotlib (the ``loadtest`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key, entry = next(iter(result["sizes"].items()))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    first = entry["flotilla"]["series"]
    hours = [s["hour"] for s in first]
    ax.plot(hours, [s["needed_copies"] for s in first], color="black", lw=2, label="copies the load needs (each model with traffic needs one)")
    for name, colour in (("flotilla", "tab:blue"), ("lru", "tab:orange")):
        if name in entry and "series" in entry[name]:
            series = entry[name]["series"]
            ax.plot([s["hour"] for s in series], [s["ready_copies"] for s in series], color=colour,
                    label=f"ready copies: {'Flotilla' if name == 'flotilla' else 'LRU by bytes (ModelMesh-style)'}")
    ax.set_xlabel("hour of the simulated day")
    ax.set_ylabel("copies")
    models, replicas = key.split("x")
    ax.set_title(f"Copies against demand: {models} models, {replicas} replicas of 80 GiB (simulated)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _cell(entry: dict[str, Any], policy: str, key: str, unit: str = "") -> str:
    run = entry.get(policy)
    if run is None:
        return "-"
    if run.get("fits") is False:
        return "does not fit"
    value = run.get(key)
    return "-" if value is None else f"{value}{unit}"


def table_lines(result: dict[str, Any]) -> list[str]:
    """The results page's fleet-simulation table (and the split scenario's)."""
    lines = [
        f"Fleet simulation, `flotilla bench --only fleet-sim` ({result['measured_at']}, {result['cpus']} CPU cores): "
        "the real controller core on simulated time, simulated Triton replicas (80 GiB each) and Zipf traffic "
        "whose ranks shift over a day. CPU is the controller's `time.process_time` per call.",
        "",
        "| figure | " + " | ".join(f"{k}: Flotilla" for k in result["sizes"]) + " | target |",
        "|---|" + "---|" * len(result["sizes"]) + "---|",
    ]
    rows: list[tuple[str, Callable[[dict[str, Any]], str], str]] = [
        ("decision round (replicas + autoscale + shards), CPU p50 / p99 ms",
         lambda e: f"{_cell(e, 'flotilla', 'decision_round_ms_p50')} / **{_cell(e, 'flotilla', 'decision_round_ms_p99')}**",
         f"< {DECISION_ROUND_TARGET_MS:.0f} ms at 10 000 x 1 000"),
        ("the same p99 less garbage collection, ms",
         lambda e: _cell(e, "flotilla", "decision_round_without_gc_ms_p99"), ""),
        ("usage round (heartbeats + observe), CPU p50 / p99 ms",
         lambda e: f"{_cell(e, 'flotilla', 'usage_round_ms_p50')} / {_cell(e, 'flotilla', 'usage_round_ms_p99')}", ""),
        ("deploy, controller CPU p50 / p99 ms",
         lambda e: f"{_cell(e, 'flotilla', 'deploy_ms_p50')} / {_cell(e, 'flotilla', 'deploy_ms_p99')}", ""),
        ("deploy's fleet-watch delta: bytes, controller / watcher CPU p99 ms",
         lambda e: f"{_cell(e, 'flotilla', 'deploy_watch_bytes_mean')} B, "
                   f"{_cell(e, 'flotilla', 'deploy_watch_controller_ms_p99')} / "
                   f"{_cell(e, 'flotilla', 'deploy_watch_watcher_ms_p99')}", "visible on every router < 1 s"),
        ("router: route change CPU p99 us",
         lambda e: str(e["route_update"].get("delta_us_p99")) if isinstance(e["route_update"], dict)
         else e["route_update"], ""),
        ("fleet watch per change: bytes (delta) vs the whole fleet",
         lambda e: f"{_cell(e, 'flotilla', 'watch_delta_bytes_per_change_mean')} vs "
                   f"{_cell(e, 'flotilla', 'watch_full_bytes_mean')}", "O(change), not O(fleet)"),
        ("fleet watch per delta message: controller / watcher CPU ms",
         lambda e: f"{_cell(e, 'flotilla', 'watch_delta_controller_ms_mean')} / "
                   f"{_cell(e, 'flotilla', 'watch_delta_watcher_ms_mean')}", ""),
        ("cold starts per simulated hour (Flotilla / LRU)",
         lambda e: f"{_cell(e, 'flotilla', 'cold_starts_per_hour')} / {_cell(e, 'lru', 'cold_starts_per_hour')}", ""),
        ("cold start wait p50 / p99, simulated s",
         lambda e: f"{_cell(e, 'flotilla', 'cold_wait_s_p50')} / {_cell(e, 'flotilla', 'cold_wait_s_p99')}", ""),
        ("requests over 100 ms queue wait or rejected (Flotilla / LRU)",
         lambda e: f"{_waited(e, 'flotilla')} / {_waited(e, 'lru')}", ""),
        ("ready copies / copies the load needs, mean over the day",
         lambda e: f"{_cell(e, 'flotilla', 'ready_copies_over_needed_mean')} (LRU {_cell(e, 'lru', 'ready_copies_over_needed_mean')})",
         ""),
        ("memory at peak: replicas holding copies vs first-fit-decreasing",
         lambda e: _packing(e), ""),
        ("every model on every replica", lambda e: _cell(e, "everywhere", "why") if e.get("everywhere", {}).get(
            "fits") is False else "fits", ""),
        ("simulated hours / wall s", lambda e: f"{_cell(e, 'flotilla', 'simulated_hours')} / "
                                             f"{_cell(e, 'flotilla', 'wall_s')}", ""),
    ]
    for label, cell, target in rows:
        lines.append(f"| {label} | " + " | ".join(cell(e) for e in result["sizes"].values()) + f" | {target} |")
    split = result.get("split_002", {})
    if split:
        lines += ["", "Seeds 002: 2 models on 20 GPUs, the load (75% of 20 copies) split 50/50 -> 90/10 -> 10/90, "
                  f"{split['flotilla']['phase_s'] / 60:.0f} simulated minutes each.", "",
                  "| split | copies needed | Flotilla: copies followed after | requests waited meanwhile | "
                  "copies at the phase's end | LRU: copies at the end |", "|---|---|---|---|---|---|"]
        for ours, lru in zip(split["flotilla"]["phases"], split.get("lru", split["flotilla"])["phases"], strict=True):
            followed = "not within the phase" if ours["followed_after_s"] is None else f"{ours['followed_after_s']} s"
            lines.append(f"| {ours['split']} | {ours['needed_copies']} | {followed} | {ours['waited_until_followed']} | "
                         f"{ours['copies_at_end']} | {lru['copies_at_end']} |")
    return lines


def _waited(entry: dict[str, Any], policy: str) -> str:
    run = entry.get(policy)
    if run is None or run.get("fits") is False:
        return "-"
    waited = run["requests_waited_over_threshold"] + run["requests_rejected"]
    return f"{100.0 * waited / max(run['requests'], 1):.2f}%"


def _packing(entry: dict[str, Any]) -> str:
    peak = entry.get("flotilla", {}).get("packing_at_peak") or {}
    if not peak:
        return "-"
    return (f"{peak['used_gib']:.0f} GiB on {peak['replicas_holding']:.0f} replicas vs "
            f"{peak['ffd_replicas']:.0f} (FFD)")
