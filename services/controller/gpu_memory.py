"""GPU memory of a Triton replica, read from its Prometheus metrics (``controller.memory_kind: gpu``).

Triton exports, for each GPU it sees (label ``gpu_uuid``), ``nv_gpu_memory_used_bytes`` and
``nv_gpu_memory_total_bytes`` at ``http://<metrics address>/metrics``, refreshed every
``--metrics-interval-ms`` (2000 by default). They are the device's figures, not Triton's own: every
process on the GPU counts, so a replica needs its GPUs to itself for the growth to be its copies'.

A copy's memory is the growth of the used figure that its load and warm-up cause
(``GpuMemoryMeter``); a replica's budget is at most the total, less a reserve per GPU.

Errors (both are ``GpuMemoryError``, so a caller catches either with one clause)::

    GpuMemoryError                  FlotillaError
    ├── GpuMetricsUnavailable       UNAVAILABLE: the endpoint did not answer, or not with Prometheus text
    └── NoGpuReported               FAILED_PRECONDITION: metrics, but no nv_gpu_memory_* series

Nothing here imports grpc; reads block (the replica calls them from a worker thread).
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from flotilla.errors import FailedPrecondition, FlotillaError, Unavailable

MIB = 1024 * 1024
USED = "nv_gpu_memory_used_bytes"
TOTAL = "nv_gpu_memory_total_bytes"
METRICS_TIMEOUT_S = 2.0
"""How long one read of a replica's metrics endpoint may take."""
METRICS_INTERVAL_S = 2.0
"""Triton's default ``--metrics-interval-ms``: the used figure may lag a warm-up by this much."""
GPU_RESERVE_MB = 1024.0
"""Per GPU, kept out of a replica's budget: Triton's own CUDA context, its CUDA memory pool
(``--cuda-memory-pool-byte-size``, 64 MiB per GPU by default) and fragmentation."""
WINDOW_MAX_S = 900.0
"""A copy's load-to-measure window left open longer than this is dropped (never measured: the
controller gave up on the load, or ``controller.measure_memory`` is off)."""


class GpuMemoryError(FlotillaError):
    """Reading a replica's GPU memory failed."""


class GpuMetricsUnavailable(GpuMemoryError, Unavailable):
    """The metrics endpoint did not answer, or its answer was not Prometheus text."""


class NoGpuReported(GpuMemoryError, FailedPrecondition):
    """The metrics have no ``nv_gpu_memory_*`` series: Triton sees no GPU (or GPU metrics are off)."""


@dataclass(frozen=True)
class GpuMemory:
    """One reading of the GPUs a replica uses, summed over them."""

    used_mb: float
    """MiB in use on those GPUs, by every process on them (``nv_gpu_memory_used_bytes``)."""
    total_mb: float
    """MiB those GPUs have (``nv_gpu_memory_total_bytes``)."""
    gpus: int
    """How many GPUs the figures sum."""


class GpuMemorySource(Protocol):
    """Where a replica's GPU memory figures come from (blocking: called from a worker thread)."""

    def read(self) -> GpuMemory:
        """The figures now; raises ``GpuMetricsUnavailable`` or ``NoGpuReported``."""
        ...


def parse_gpu_memory(text: str, where: str, gpu_uuids: Collection[str] | None = None) -> GpuMemory:
    """Sum used and total bytes over the GPUs in Triton's metrics ``text`` (``where`` names it in errors).

    ``gpu_uuids`` limits the sum to those GPUs; by default every GPU Triton reports, which are the
    ones visible to it (``CUDA_VISIBLE_DEVICES``, the GPUs a pod was given).
    """
    used: dict[str, float] = {}
    total: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name not in (USED, TOTAL):
                continue
            for sample in family.samples:
                uuid = sample.labels.get("gpu_uuid", "")
                if sample.name == family.name and (gpu_uuids is None or uuid in gpu_uuids):
                    (used if family.name == USED else total)[uuid] = sample.value
    except ValueError as exc:
        raise GpuMetricsUnavailable(f"Triton metrics at {where} are not Prometheus text: {exc}") from exc
    gpus = used.keys() & total.keys()
    if not gpus:
        wanted = f" for GPUs {sorted(gpu_uuids)}" if gpu_uuids is not None else ""
        raise NoGpuReported(
            f"Triton at {where} reports no GPU{wanted}; memory_kind gpu needs a GPU replica (its metrics have "
            f"no {USED} and {TOTAL} series: no GPU visible to it, or it runs with --allow-gpu-metrics=false)"
        )
    return GpuMemory(
        used_mb=sum(used[g] for g in gpus) / MIB, total_mb=sum(total[g] for g in gpus) / MIB, gpus=len(gpus)
    )


def metrics_url(address: str) -> str:
    """``host:port`` (or a URL) -> the URL of its ``/metrics``."""
    url = address if "://" in address else f"http://{address}"
    return url if url.rstrip("/").endswith("/metrics") else f"{url.rstrip('/')}/metrics"


class TritonGpuMetrics:
    """A ``GpuMemorySource`` over one Triton replica's metrics endpoint."""

    def __init__(
        self, address: str, *, timeout_s: float = METRICS_TIMEOUT_S, gpu_uuids: Collection[str] | None = None
    ) -> None:
        self.url = metrics_url(address)
        self.timeout_s = timeout_s
        self.gpu_uuids = gpu_uuids

    def read(self) -> GpuMemory:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as reply:
                text = reply.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset, HTTP error status
            reason = getattr(exc, "reason", None) or exc
            raise GpuMetricsUnavailable(f"Triton metrics at {self.url} did not answer: {reason}") from exc
        return parse_gpu_memory(text, self.url, self.gpu_uuids)


@dataclass
class _Window:
    weight_mb: float
    opened_s: float
    growth_mb: float = 0.0


class GpuMemoryMeter:
    """A replica's GPU budget and the growth each copy's load and warm-up cause.

    A copy's window opens when its load starts (``begin``: a reading) and closes after its warm-up
    (``end``: a reading ``settle_s`` later, so the gauge has caught up). The used figure's change
    between two readings goes to the windows open in between. Alone, a copy gets exactly
    (used after its warm-up) - (used before its load). Loads that overlap on one replica (it loads
    several models at once) share each change in proportion to their declared memory: an
    approximation whose sum is right, where serializing them would make cold starts wait for other
    models' warm-ups. A copy unloaded while windows are open lowers the base by what it held (its
    measured growth, else its declared memory), so its release is not counted against them.

    Readings happen outside the lock (a slow endpoint blocks no one else); the accounting inside it.
    """

    def __init__(
        self,
        source: GpuMemorySource,
        *,
        reserve_mb_per_gpu: float = GPU_RESERVE_MB,
        settle_s: float = METRICS_INTERVAL_S,
        window_max_s: float = WINDOW_MAX_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.reserve_mb_per_gpu = reserve_mb_per_gpu
        self.settle_s = settle_s
        self.window_max_s = window_max_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._base_mb = 0.0
        """The used figure the open windows' growth is counted from (meaningful while any is open)."""
        self._held: dict[str, float] = {}
        """Model -> MiB its copy's window measured (what its unload frees)."""
        self.last: GpuMemory | None = None
        """The latest reading, None before the first."""

    def read(self) -> GpuMemory:
        """Read the source (blocking) and keep it as ``last``."""
        reading = self.source.read()
        with self._lock:
            self.last = reading
        return reading

    def budget_mb(self, configured_mb: float) -> float:
        """``configured_mb``, at most the GPUs' total less the reserve once a reading gave the total."""
        if self.last is None:
            return configured_mb
        usable = self.last.total_mb - self.reserve_mb_per_gpu * self.last.gpus
        return max(0.0, min(configured_mb, usable))

    def begin(self, model: str, declared_mb: float) -> None:
        """Open ``model``'s window with a reading now (blocking); its load is about to start."""
        used = self.read().used_mb
        with self._lock:
            self._advance(used)
            self._windows[model] = _Window(max(declared_mb, 1.0), self._clock())

    def end(self, model: str) -> float | None:
        """Close ``model``'s window after its warm-up (blocking: waits ``settle_s``, then reads);
        the MiB it grew by, or None when it has no open window or grew by nothing (a gauge that has
        not caught up, or CPU instances on a GPU replica: the declared figure stands, not a free copy)."""
        with self._lock:
            if model not in self._windows:
                return None
        if self.settle_s > 0:
            self._sleep(self.settle_s)
        used = self.read().used_mb
        with self._lock:
            self._advance(used)
            window = self._windows.pop(model, None)
            if window is None:  # unloaded or expired meanwhile
                return None
            if window.growth_mb <= 0:
                return None
            self._held[model] = window.growth_mb
            return window.growth_mb

    def unloaded(self, model: str, declared_mb: float) -> None:
        """``model``'s copy is unloaded: drop its window; the other open windows do not count its release.

        What it frees: its measured growth; with its window still open (a failed load or warm-up),
        what the window had counted; never measured here (adopted at a restart), ``declared_mb``.
        """
        with self._lock:
            window = self._windows.pop(model, None)
            held = self._held.pop(model, None)
            if held is None:
                held = max(window.growth_mb, 0.0) if window is not None else declared_mb
            if self._windows:
                self._base_mb -= held

    def _advance(self, used_mb: float) -> None:
        """Share the change since the base among the open windows (by weight); the base becomes ``used_mb``."""
        now = self._clock()
        for model in [m for m, w in self._windows.items() if now - w.opened_s > self.window_max_s]:
            del self._windows[model]
        if self._windows:
            change = used_mb - self._base_mb
            weights = sum(w.weight_mb for w in self._windows.values())
            for window in self._windows.values():
                window.growth_mb += change * window.weight_mb / weights
        self._base_mb = used_mb
