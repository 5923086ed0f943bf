"""The bench's CPU accounting, on this process and a busy-looping child."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from flotilla.bench_cpu import CpuMeter, ProcStat, Tier, descendants, read_stat

BUSY_S = 0.3


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def until_child_spent(child: subprocess.Popen[bytes], cpu_s: float, timeout_s: float = 30.0) -> None:
    """Sleep until ``child`` has spent ``cpu_s`` of CPU: however loaded the machine is."""
    first = read_stat(child.pid)
    assert first is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = read_stat(child.pid)
        assert now is not None
        if (now.cpu_ticks - first.cpu_ticks) / os.sysconf("SC_CLK_TCK") >= cpu_s:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the child did not spend {cpu_s} s of CPU in {timeout_s} s")


@pytest.fixture
def spinning_child() -> Iterator[subprocess.Popen[bytes]]:
    """A child that busy-loops until killed."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_read_stat_of_this_process() -> None:
    stat = read_stat(os.getpid())
    assert stat is not None
    assert stat.pid == os.getpid() and stat.ppid == os.getppid()
    assert stat.cpu_ticks > 0


def test_read_stat_of_a_missing_process() -> None:
    assert read_stat(2**22 + 1) is None  # above the kernel's pid_max limit


def test_descendants_follow_the_tree() -> None:
    stats = {pid: ProcStat(pid, ppid, 0, 0) for pid, ppid in [(1, 0), (2, 1), (3, 2), (4, 1), (5, 9)]}
    assert descendants(1, stats) == {2, 3, 4}
    assert descendants(2, stats) == {3}
    assert descendants(5, stats) == set()


def test_meter_counts_this_process_busy_time() -> None:
    with CpuMeter({"me": Tier([os.getpid()], descendants=False)}) as meter:
        busy(BUSY_S)
    # Clock ticks are 10 ms; the loop burns what it measures (plus this process's other threads).
    assert meter.cpu_s["me"] >= BUSY_S - 0.02
    assert meter.processes == {"me": 1}
    assert meter.machine_busy_s >= meter.cpu_s["me"] - 0.02  # the machine's count includes this process
    assert meter.wall_s >= meter.cpu_s["me"] - 0.02


def test_meter_counts_a_child_in_its_parents_tier(spinning_child: subprocess.Popen[bytes]) -> None:
    with CpuMeter({"parent": Tier([os.getpid()])}) as meter:
        until_child_spent(spinning_child, BUSY_S)
    assert meter.processes["parent"] >= 2
    assert meter.cpu_s["parent"] >= BUSY_S - 0.02  # the child spins while this process sleeps


def test_meter_sends_children_to_another_tier(spinning_child: subprocess.Popen[bytes]) -> None:
    tiers = {"server": Tier([os.getpid()], children_to="stubs")}
    with CpuMeter(tiers) as meter:
        until_child_spent(spinning_child, BUSY_S)
    assert meter.cpu_s["stubs"] >= BUSY_S - 0.02
    assert meter.cpu_s["server"] < meter.cpu_s["stubs"]  # the parent mostly sleeps


def test_a_process_in_two_tiers_counts_once(spinning_child: subprocess.Popen[bytes]) -> None:
    tiers = {"child": Tier([spinning_child.pid]), "parent": Tier([os.getpid()])}
    with CpuMeter(tiers) as meter:
        until_child_spent(spinning_child, BUSY_S)
    # The child is the parent's descendant too, but counts under "child" only: the parent's
    # tier (this test process and whatever else it has started) does not get its CPU again.
    assert meter.processes["child"] == 1
    assert meter.cpu_s["child"] >= BUSY_S - 0.02
    assert meter.cpu_s["parent"] < meter.cpu_s["child"]


def test_per_item_us() -> None:
    meter = CpuMeter({})
    meter.cpu_s = {"a": 0.5, "b": 0.25}
    assert meter.per_item_us(1000) == {"a": 500.0, "b": 250.0, "total": 750.0}
    assert meter.per_item_us(0) == {}
