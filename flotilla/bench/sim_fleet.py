"""The simulated world the fleet simulation drives the real controller in: models, replicas, traffic.

Figures and the assumptions behind them (every one a module constant):

- A copy's load time scales with its memory from the one load measured on
  this machine: the bare Triton load of EfficientNet-Lite0 (155.4 MiB
  measured, 158.7 ms median; ``flotilla bench --only fleet``, results in
  docs/benchmarks.md), i.e. about 1 GiB per second. GPU-sized models are
  larger: memory per copy is log-normal, median 6 GiB, clipped to
  [0.15, 40] GiB, so one copy of every model is about the fleet's memory at
  10 models per 80 GB replica: the regime where placement and eviction
  matter.
- A copy serves ``capacity_rps`` requests/s (log-normal, median 100: a GPU
  copy of a mid-size vision model at batch 8); the queue wait of a copy at
  utilisation rho is its service time times rho / (1 - rho) plus the
  batching delay (2 ms), and a backlog drains at the copies' capacity.
- Rates: model m has a Zipf weight (its rank's, exponent ``zipf_s``) and a
  phase (its customers' time zone): its rate at hour h is the fleet's rate
  times its weight times a day curve peaking at its phase (``DAY_FLOOR`` at
  night), so the ranks shift over the simulated day and the tail sleeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from flotilla.config import ModelSettings
from flotilla.errors import Unavailable
from flotilla.services.controller.graph import ModelGraph, TensorInfo

from .sim_loop import SimClock

MEASURED_LOAD_S = 0.1587
"""Bare Triton load of EfficientNet-Lite0, median (bench/results.json fleet.cold_start.bare_triton_load_ms_median)."""
MEASURED_LOAD_MB = 155.4
"""Its measured memory (bench/results.json fleet.placement.model_memory_mib_measured)."""
MEMORY_MEDIAN_MB = 4096.0
MEMORY_SIGMA = 0.8
MEMORY_RANGE_MB = (155.4, 40960.0)
CAPACITY_MEDIAN_RPS = 100.0
CAPACITY_SIGMA = 0.3
BATCH_DELAY_S = 0.002
"""The batcher's default max_queue_delay_us (2000)."""
MAX_QUEUE = 1024
"""The batcher's default max_queue_size: what queues beyond it is rejected."""
DAY_FLOOR = 0.02
"""A model's rate at the bottom of its day, as a fraction of its peak."""
GRAPH = ModelGraph(
    (TensorInfo("images", "UINT8", ("batch", 224, 224, 3)),), (TensorInfo("probabilities", "FP32", ("batch", 2)),)
)
"""What every simulated model's graph declares (the default spec's input, two classes)."""


@dataclass(frozen=True)
class SimModel:
    name: str
    memory_mb: float
    load_s: float
    capacity_rps: float
    weight: float
    """Share of the fleet's rate at the model's peak hour, before the day curve."""
    phase_h: float
    """Hour of the simulated day at which the model peaks."""


def make_models(count: int, rng: np.random.Generator, *, zipf_s: float = 1.4) -> list[SimModel]:
    memory = np.clip(rng.lognormal(math.log(MEMORY_MEDIAN_MB), MEMORY_SIGMA, count), *MEMORY_RANGE_MB)
    capacity = rng.lognormal(math.log(CAPACITY_MEDIAN_RPS), CAPACITY_SIGMA, count)
    ranks = rng.permutation(count) + 1
    weights = ranks.astype(float) ** -zipf_s
    weights /= weights.sum()
    phases = rng.uniform(0.0, 24.0, count)
    return [
        SimModel(f"m{i:05d}", round(float(memory[i]), 1), MEASURED_LOAD_S * float(memory[i]) / MEASURED_LOAD_MB,
                 float(capacity[i]), float(weights[i]), float(phases[i]))
        for i in range(count)
    ]


def model_spec(model: SimModel, *, min_copies: int, max_copies: int) -> str:
    """The deploy's spec JSON: the default input (``GRAPH`` fits it), the model's memory and copies."""
    return ModelSettings(
        storage_uri=f"s3://flotilla-models/{model.name}", memory_mb=model.memory_mb, labels=["a", "b"],
        min_copies=min_copies, max_copies=max_copies,
    ).model_dump_json()


class SimArtifacts:
    """Every artifact exists, with one version and ``GRAPH`` (no object store behind it)."""

    def check(self, uri: str, versions: list[int]) -> dict[str, dict[str, object]]:
        return {f"{v}/model.onnx": {"sha256": "0" * 64, "bytes": 1} for v in versions}

    def labels(self, uri: str, manifest: dict[str, dict[str, object]]) -> list[str]:
        return ["a", "b"]

    def graph(self, uri: str, version: int, manifest: dict[str, dict[str, object]]) -> ModelGraph:
        return GRAPH


class SimReplica:
    """A Triton replica (the controller's ``ReplicaAgent``): loads take the model's load time in
    simulated time; a replica that fails loses every copy and fails the loads under way."""

    def __init__(self, address: str, budget_mb: float, load_s: dict[str, float], clock: SimClock) -> None:
        self.address = address
        self.budget_mb = budget_mb
        self.live = True
        self.models: dict[str, list[int]] = {}
        self.loads = 0
        self._load_s = load_s
        self._clock = clock
        self._epoch = 0

    async def is_live(self) -> bool:
        return self.live

    async def loaded(self) -> dict[str, list[int]]:
        if not self.live:
            raise Unavailable(f"{self.address} is down")
        return self.models

    async def load(self, name: str, spec: ModelSettings, uri: str, manifest: dict[str, dict[str, object]]) -> None:
        epoch = self._epoch
        self.loads += 1
        await self._clock.sleep(self._load_s[name])
        if not self.live or epoch != self._epoch:
            raise Unavailable(f"{self.address} went down during the load")
        self.models[name] = list(spec.versions)

    async def unload(self, name: str, spec: ModelSettings) -> None:
        self.models.pop(name, None)

    async def warm_up(self, name: str, spec: ModelSettings) -> None:
        return None

    def measure_memory_mb(self, name: str, spec: ModelSettings) -> float | None:
        return None

    async def close(self) -> None:
        return None

    def fail(self) -> None:
        """Down, and every copy lost: it comes back empty (``recover``)."""
        self.live = False
        self.models = {}
        self._epoch += 1

    def recover(self) -> None:
        self.live = True


class Traffic:
    """Every model's queue as a fluid: arrivals (Poisson), a backlog served at the ready copies'
    capacity, and what each step adds to the batchers' counters (``last_*``)."""

    def __init__(
        self, models: list[SimModel], total_rps: float, day_s: float, rng: np.random.Generator,
        *, rates: Callable[[float], NDArray[np.float64]] | None = None,
    ) -> None:
        self.names = [m.name for m in models]
        self.index = {m.name: i for i, m in enumerate(models)}
        self.weight = np.array([m.weight for m in models])
        self.phase_h = np.array([m.phase_h for m in models])
        self.capacity = np.array([m.capacity_rps for m in models])
        self.total_rps = total_rps
        self.day_s = day_s
        self.rng = rng
        self._rates = rates
        """Overrides the Zipf day: requests/s of every model at a time (a scenario's own split)."""
        n = len(models)
        self.backlog = np.zeros(n)
        self.arrivals_total = np.zeros(n, dtype=np.int64)
        self.dispatched_total = np.zeros(n, dtype=np.int64)
        self.wait_s_total = np.zeros(n)
        self.active = np.zeros(n, dtype=bool)
        self.last_arrivals = np.zeros(n, dtype=np.int64)
        self.last_served = np.zeros(n, dtype=np.int64)
        self.last_wait_s = np.zeros(n)
        """The last step's arrivals, dispatches and summed queue wait per model (what the shards count)."""
        self.rejected_total = 0
        self.waited_for_copy = 0
        """Requests that arrived while their model had no ready copy."""
        self.waited_over_threshold = 0
        """Requests served with a modelled queue wait above the autoscaler's threshold."""
        self.requests_total = 0
        # The day curve's mean, so the fleet's total rate stays ``total_rps`` on average.
        hours = np.linspace(0.0, 24.0, 97)[:-1]
        self._curve_mean = float(np.mean(self._curve(hours)))

    @staticmethod
    def _curve(hours: NDArray[np.float64]) -> NDArray[np.float64]:
        peak = np.cos(np.pi * hours / 24.0) ** 2  # 1 at the phase, 0 twelve hours away
        curve: NDArray[np.float64] = DAY_FLOOR + (1.0 - DAY_FLOOR) * peak**2
        return curve

    def hour(self, now_s: float) -> float:
        return (now_s / self.day_s * 24.0) % 24.0

    def rates(self, now_s: float) -> NDArray[np.float64]:
        """Requests/s of every model at ``now_s``."""
        if self._rates is not None:
            return self._rates(now_s)
        curve = self._curve(self.hour(now_s) - self.phase_h)
        rates: NDArray[np.float64] = self.total_rps * self.weight * curve / self._curve_mean
        return rates

    def step(self, now_s: float, dt_s: float, ready: NDArray[np.int64], threshold_s: float) -> NDArray[np.float64]:
        """Advance every queue by ``dt_s`` with ``ready`` copies each; returns the arrivals' rates."""
        rates = self.rates(now_s)
        arrivals = self.rng.poisson(rates * dt_s)
        self.requests_total += int(arrivals.sum())
        self.arrivals_total += arrivals
        self.waited_for_copy += int(arrivals[ready == 0].sum())
        service = ready * self.capacity
        served = np.floor(np.minimum(self.backlog + arrivals, service * dt_s))
        left = self.backlog + arrivals - served
        # The batcher's queue holds MAX_QUEUE; what is left over that at the end of the step was rejected.
        overflow = np.maximum(left - MAX_QUEUE, 0.0)
        self.rejected_total += int(overflow.sum())
        left -= overflow
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = np.where(service > 0, rates / np.maximum(service, 1e-9), 0.0)
            queueing = np.minimum(rho / np.maximum(1.0 - rho, 1e-3), 100.0) / np.maximum(self.capacity, 1e-9)
            # What was queued at the start and what is left at the end wait behind the copies' capacity
            # (arrivals within a step that the capacity covers are served as they come).
            drain = np.where(service > 0, (self.backlog + left) / 2.0 / np.maximum(service, 1e-9), 0.0)
        wait_s = BATCH_DELAY_S + queueing + drain
        served_n = served
        self.dispatched_total += served_n.astype(np.int64)
        self.wait_s_total += served_n * wait_s
        self.waited_over_threshold += int(served_n[wait_s > threshold_s].sum())
        self.backlog = left
        self.active = (arrivals > 0) | (served_n > 0)
        self.last_arrivals = arrivals
        self.last_served = served_n.astype(np.int64)
        self.last_wait_s = served_n * wait_s
        return rates


def needed_copies(rates: NDArray[np.float64], capacity: NDArray[np.float64], threshold_ms: float,
                  idle_window_s: float) -> NDArray[np.int64]:
    """Copies each model needs: enough that the modelled queue wait stays under ``threshold_ms``
    (utilisation rho with rho / (1 - rho) / capacity + the batching delay <= threshold), and none
    for a model that expects no request within ``idle_window_s`` (the autoscaler's scale-to-zero)."""
    x = np.maximum(threshold_ms / 1000.0 - BATCH_DELAY_S, 1e-6) * capacity
    rho = x / (1.0 + x)
    needed = np.maximum(np.ceil(rates / (capacity * rho)), 1.0)
    result: NDArray[np.int64] = np.where(rates * idle_window_s >= 1.0, needed, 0.0).astype(np.int64)
    return result
