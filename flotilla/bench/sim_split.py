"""The seeds' scenario 002 in the fleet simulation: 2 models on 20 GPUs, the split of the load moving.

Two vision models (2 GiB each, so a GPU holds both) share a load of 75% of
what 20 copies serve; the split is 50/50, then 90/10, then 10/90, each for
``phase_s``. For each phase: how long until both models hold the copies
their load needs (``needed_copies``: the modelled queue wait under the
autoscaler's threshold), and how many requests waited meanwhile: over the
threshold, for a copy, or rejected by a full queue.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from flotilla.config import AutoscaleSettings
from flotilla.services.controller.controller import Controller

from .fleet_sim import SimConfig, simulate
from .sim_fleet import MEASURED_LOAD_MB, MEASURED_LOAD_S, SimModel, Traffic, needed_copies

SPLITS = ((0.5, 0.5), (0.9, 0.1), (0.1, 0.9))
GPUS = 20
LOAD_OF_CAPACITY = 0.75
MODEL_MB = 2048.0
CAPACITY_RPS = 100.0


def split_scenario(policy: str = "flotilla", *, phase_s: float = 1200.0) -> dict[str, Any]:
    models = [SimModel(name, MODEL_MB, MEASURED_LOAD_S * MODEL_MB / MEASURED_LOAD_MB, CAPACITY_RPS, 0.5, 0.0)
              for name in ("detect", "classify")]
    total_rps = LOAD_OF_CAPACITY * GPUS * CAPACITY_RPS
    split = np.array(SPLITS)

    def rates(now_s: float) -> NDArray[np.float64]:
        phase = min(int(now_s // phase_s), len(SPLITS) - 1)
        result: NDArray[np.float64] = total_rps * split[phase]
        return result

    judged = AutoscaleSettings()
    phases: list[dict[str, Any]] = [{} for _ in SPLITS]

    def on_tick(now_s: float, ctl: Controller, traffic: Traffic, ready: NDArray[np.int64]) -> None:
        phase = min(int(now_s // phase_s), len(SPLITS) - 1)
        row = phases[phase]
        waited = traffic.waited_over_threshold + traffic.waited_for_copy + traffic.rejected_total
        if not row:
            row.update(split=f"{round(SPLITS[phase][0] * 100)}/{round(SPLITS[phase][1] * 100)}",
                       began_s=now_s, waited_at_start=waited)
        need = needed_copies(rates(now_s), traffic.capacity, judged.queue_wait_high_ms, judged.scale_to_zero_idle_s)
        row["needed_copies"] = need.tolist()
        row["copies_at_end"] = ready.tolist()
        if "followed_after_s" not in row:
            row["waited_until_followed"] = waited - row["waited_at_start"]
            if bool((ready >= need).all()):
                row["followed_after_s"] = round(now_s - row["began_s"], 1)

    config = SimConfig(len(models), GPUS, day_s=phase_s * len(SPLITS), failures_per_hour=0.0, policy=policy,
                       shards=1)
    result = simulate(config, rates=rates, models=models, on_tick=on_tick)
    for row in phases:
        row.setdefault("followed_after_s", None)  # not within the phase
        row.pop("waited_at_start", None)
        row.pop("began_s", None)
    return {
        "policy": policy, "gpus": GPUS, "phase_s": phase_s, "load_rps": total_rps,
        "copy_capacity_rps": CAPACITY_RPS, "phases": phases,
        "requests": result["requests"],
        "requests_waited_over_threshold": result["requests_waited_over_threshold"],
        "requests_rejected": result["requests_rejected"],
    }
