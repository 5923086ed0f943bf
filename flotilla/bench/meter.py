"""CPU accounting for the bench: what each tier of the mesh spent, from each process's own counters.

Each process's own counters (user + system CPU time, every thread included,
read with psutil) are read at the edges of a measured window::

    with CpuMeter({"router": Tier([router_pid]), "triton": Tier(triton_pids, children_to="model stubs")}) as meter:
        ...  # the load runs
    meter.cpu_s  # {"router": 1.9, "triton": 0.3, "model stubs": 4.1}

A tier is a set of root pids; their live descendants count too, unless the
tier sends them to another tier (Triton's Python-backend stubs are children
of tritonserver and are counted as "model stubs"), or ``descendants`` is off
(the bench process itself: the whole stack is its descendants).

A process that starts inside the window counts all its CPU (all of it was
spent inside the window); one that exits inside it loses what it spent
since the first read (its parent's children's times would hold it, but only
after a wait and mixed with every other child). Processes are keyed by pid
and start time (psutil's identity of a process), so a reused pid is a new
process.

:func:`metered_load` drives a closed loop through back-to-back metered
windows: the CPU, overhead and ceiling parts and the peer measure with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import NotRequired, TypedDict

import numpy as np
import psutil

from flotilla.clients.loadgen import closed_loop

LOAD_GENERATOR = "load generator"
MODEL_STUBS = "model stubs"
TIER_ORDER = ("router", "batcher", "worker", "triton server", MODEL_STUBS, "s3", "controller", LOAD_GENERATOR)
"""The mesh's tiers in the order the results list them."""


class MeteredPoint(TypedDict):
    """What :func:`metered_load` measured: medians over its windows, as bench/results.json holds them."""

    concurrency: int
    windows: int
    window_s: float
    images_per_s: float
    images_per_s_windows: list[float]
    p50_ms: float
    p99_ms: float
    succeeded: int
    errors: int
    cpu_us_per_image: dict[str, float]
    """CPU-µs per item by tier (and their ``total``)."""
    counted_cpu_us_per_image: NotRequired[dict[str, float]]
    """The caller's ``counters``, per item (only when it gave some)."""
    processes: dict[str, int]
    cores_busy_machine: float
    cores_counted_tiers: float


class _Counted(TypedDict, total=False):
    counted_cpu_us_per_image: dict[str, float]


@dataclass(frozen=True)
class ProcessCpu:
    """One process's reading: who it is, its parent, the CPU it has spent."""

    process: psutil.Process
    """The process: psutil compares two by pid and start time, so a reused pid is another process."""
    ppid: int
    cpu_s: float
    """User + system CPU seconds of every thread."""

    @property
    def pid(self) -> int:
        return self.process.pid


def read_process(pid: int) -> ProcessCpu | None:
    """The process's counters, or None when it is gone (or not ours to read)."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            times = process.cpu_times()
            return ProcessCpu(process, process.ppid(), times.user + times.system)
    except psutil.Error:
        return None


def all_processes() -> dict[int, ProcessCpu]:
    """Every live process's counters, by pid."""
    readings = (read_process(pid) for pid in psutil.pids())
    return {reading.pid: reading for reading in readings if reading is not None}


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy (not idle or waiting on I/O) since boot."""
    times = psutil.cpu_times()
    # Busy: user nice system irq softirq steal (guest time is inside user).
    return times.user + times.nice + times.system + times.irq + times.softirq + times.steal


def descendants(pid: int, parents: Mapping[int, int]) -> set[int]:
    """The live descendants of ``pid`` (not ``pid`` itself); ``parents`` maps each live pid to its parent's."""
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found:
            found.add(child)
            todo += children.get(child, [])
    return found


@dataclass
class Tier:
    """The processes one tier's CPU is read from."""

    pids: Iterable[int]
    """Root processes of the tier."""
    descendants: bool = True
    """Count the roots' live descendants too."""
    children_to: str | None = None
    """Count the descendants in this other tier instead (e.g. Triton's model stubs)."""


@dataclass
class CpuMeter:
    """Per-tier CPU seconds spent between ``__enter__`` and ``__exit__``."""

    tiers: Mapping[str, Tier]
    cpu_s: dict[str, float] = field(default_factory=dict)
    """Filled on exit: CPU seconds per tier inside the window."""
    processes: dict[str, int] = field(default_factory=dict)
    """Filled on exit: how many processes each tier counted."""
    machine_busy_s: float = 0.0
    """Filled on exit: busy CPU seconds of the whole machine (every process, counted or not)."""
    wall_s: float = 0.0
    """Filled on exit: the window's length."""
    _start: dict[psutil.Process, float] = field(default_factory=dict)
    _machine_start: tuple[float, float] = (0.0, 0.0)

    def members(self, processes: Mapping[int, ProcessCpu]) -> dict[str, set[int]]:
        """The pids of each tier in ``processes``; a pid counts in the first tier that claims it."""
        parents = {pid: reading.ppid for pid, reading in processes.items()}
        members: dict[str, set[int]] = {name: set() for name in self.tiers}
        for name, tier in self.tiers.items():
            for root in tier.pids:
                if root not in processes:
                    continue
                members[name].add(root)
                if tier.descendants:
                    into = tier.children_to or name
                    members.setdefault(into, set()).update(descendants(root, parents))
        seen: set[int] = set()
        for name in members:
            members[name] -= seen
            seen |= members[name]
        return members

    @staticmethod
    def snapshot() -> dict[psutil.Process, float]:
        """CPU seconds of every live process, by process (pid and start time)."""
        return {reading.process: reading.cpu_s for reading in all_processes().values()}

    def __enter__(self) -> CpuMeter:
        self._start = self.snapshot()
        self._machine_start = (machine_busy_s(), time.perf_counter())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        processes = all_processes()
        busy_s, started = self._machine_start
        self.machine_busy_s = machine_busy_s() - busy_s
        self.wall_s = time.perf_counter() - started
        self.cpu_s, self.processes = {}, {}
        for name, pids in self.members(processes).items():
            spent_s = 0.0
            for pid in pids:
                reading = processes[pid]
                spent_s += reading.cpu_s - self._start.get(reading.process, 0.0)
            self.cpu_s[name] = spent_s
            self.processes[name] = len(pids)

    def per_item_us(self, items: int) -> dict[str, float]:
        """CPU microseconds per item (image, request) by tier, and their total."""
        if items <= 0:
            return {}
        per = {name: round(cpu * 1e6 / items, 1) for name, cpu in self.cpu_s.items()}
        per["total"] = round(sum(self.cpu_s.values()) * 1e6 / items, 1)
        return per


async def metered_load(
    tiers: Mapping[str, Tier],
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    window_s: float,
    windows: int = 3,
    warmup_s: float = 2.0,
    items_per_call: int = 1,
    counters: Mapping[str, Callable[[], float]] | None = None,
) -> MeteredPoint:
    """A closed loop with ``windows`` back-to-back measured windows after the
    warm-up; each window's completions and each tier's CPU are read at its
    edges. Figures are medians over the windows (per tier, and items/s).
    ``counters`` (name -> a reading in CPU seconds, e.g. a service's own
    counter) are read at the same edges and reported per item too."""
    counters = counters or {}
    done = 0

    async def counted() -> object:
        nonlocal done
        reply = await call()
        done += 1
        return reply

    total_s = windows * window_s
    load = asyncio.create_task(closed_loop(counted, concurrency=concurrency, duration_s=total_s, warmup_s=warmup_s))
    await asyncio.sleep(warmup_s)
    rates: list[float] = []
    cores: list[tuple[float, float]] = []  # (machine busy, counted in the tiers), cores
    per_item: list[dict[str, float]] = []
    counted_per_item: list[dict[str, float]] = []
    for _ in range(windows):
        first, start = done, time.perf_counter()
        before = {name: read() for name, read in counters.items()}
        with CpuMeter(tiers) as meter:
            await asyncio.sleep(window_s)
        after = {name: read() for name, read in counters.items()}
        items = (done - first) * items_per_call
        rates.append(items / (time.perf_counter() - start))
        per_item.append(meter.per_item_us(items))
        counted_per_item.append({name: (after[name] - before[name]) * 1e6 / max(items, 1) for name in counters})
        cores.append((meter.machine_busy_s / meter.wall_s, sum(meter.cpu_s.values()) / meter.wall_s))
    result = await load
    # The usual tiers in their order, then any other the caller metered (the ceiling part's own).
    names = [k for k in (*TIER_ORDER, *(t for t in tiers if t not in TIER_ORDER), "total") if all(k in w for w in per_item)]
    counted_us: _Counted = {"counted_cpu_us_per_image": {
        k: round(float(np.median([w[k] for w in counted_per_item])), 1) for k in counters
    }} if counters else {}
    return {
        "concurrency": concurrency,
        "windows": windows,
        "window_s": window_s,
        "images_per_s": round(float(np.median(rates)), 1),
        "images_per_s_windows": [round(r, 1) for r in rates],
        "p50_ms": round(result.latency_ms(50), 1),
        "p99_ms": round(result.latency_ms(99), 1),
        "succeeded": result.succeeded,
        "errors": result.failed,
        "cpu_us_per_image": {k: round(float(np.median([w[k] for w in per_item])), 1) for k in names},
        **counted_us,
        "processes": meter.processes,
        # Cores busy on the whole machine and in the counted tiers (medians over the windows):
        # the difference is what other processes took from the mesh.
        "cores_busy_machine": round(float(np.median([c[0] for c in cores])), 2),
        "cores_counted_tiers": round(float(np.median([c[1] for c in cores])), 2),
    }
