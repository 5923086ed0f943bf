"""The supervisor and ManagedProcess, with real tiny child processes.

Every child is ``python -c ...``; each test stops what it started, and a
fixture checks afterwards that no pid named in a log's start markers is
still alive.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flotilla.stack.processes import ManagedProcess, wait_for_previous_holder
from flotilla.stack.supervisor import Supervisor
from tests.waiting import until_sync

SLEEPER = "import time; time.sleep(60)"
MARKER = re.compile(r"^==== (\S+) started pid (\d+) at (\S+) \(start #(\d+)\) ====$", re.MULTILINE)
# Crashes four times at once, then stays up 1.5 s and exits, then stays up.
CRASH_LOOP = """
import pathlib, sys, time
counter = pathlib.Path(sys.argv[1])
runs = int(counter.read_text() or 0) + 1 if counter.exists() else 1
counter.write_text(str(runs))
if runs <= 4:
    sys.exit(3)
time.sleep(1.5 if runs == 5 else 60)
"""


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def handles(pid: int | None, field: str, signum: int) -> bool:
    """Whether the process's ``/proc`` status lists ``signum`` under ``field`` (``SigIgn``: ignored,
    ``SigCgt``: caught by a handler)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith(f"{field}:"))
    return bool(mask >> (signum - 1) & 1)


def cmdline(pid: int | None) -> list[str]:
    """The process's command line; briefly setpriv's, or empty, while it execs."""
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    except OSError:
        return []


def markers(log_path: Path) -> list[tuple[str, int, int]]:
    """(name, pid, start number) of each start marker in a log."""
    return [(m[1], int(m[2]), int(m[4])) for m in MARKER.finditer(log_path.read_text())]


def backoffs_logged(caplog: pytest.LogCaptureFixture, name: str) -> list[float]:
    pattern = re.compile(rf"^restarting {re.escape(name)} \(.*\), restart \d+, after ([\d.]+) s$")
    found = (pattern.match(r.getMessage()) for r in caplog.records if r.name == "flotilla.stack.supervisor")
    return [float(m[1]) for m in found if m]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Starts ``python -c code``; stops it at the end and checks every pid it ever had is gone."""
    procs: list[ManagedProcess] = []

    def start(name: str, code: str = SLEEPER, *args: str, **kwargs: object) -> ManagedProcess:
        proc = ManagedProcess(name, [sys.executable, "-c", code, *args], log_path=tmp_path / f"{name}.log", **kwargs)  # type: ignore[arg-type]
        proc.start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop(timeout_s=2)
    for proc in procs:
        for _, pid, _ in markers(proc.log_path):
            assert gone(pid), f"{proc.name} pid {pid} is still alive"


@pytest.fixture
def supervisors() -> Iterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def make(**kwargs: object) -> Supervisor:
        supervisor = Supervisor(poll_interval_s=0.02, **kwargs)  # type: ignore[arg-type]
        made.append(supervisor)
        return supervisor

    yield make
    for supervisor in made:
        supervisor.stop()


def test_a_killed_child_comes_back_with_the_same_command_line(
    spawn: Callable[..., ManagedProcess], supervisors: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    restarted: list[int | None] = []
    supervisor = supervisors(initial_backoff_s=0.1, on_restart=lambda p: restarted.append(p.pid))
    proc = spawn("sleeper")
    argv, first_pid = list(proc.argv), proc.pid
    assert first_pid is not None
    supervisor.add(proc)
    supervisor.start()

    with caplog.at_level(logging.WARNING, logger="flotilla.stack.supervisor"):
        os.kill(first_pid, signal.SIGKILL)
        until_sync(lambda: supervisor.restarts("sleeper") == 1 and proc.alive(), 10, "the sleeper restarted")

    assert proc.pid != first_pid and restarted == [proc.pid]
    assert proc.argv == argv
    until_sync(lambda: cmdline(proc.pid) == argv, 10, "its exec")  # setpriv execs the command itself
    warnings = [r.getMessage() for r in caplog.records if r.name == "flotilla.stack.supervisor"]
    assert warnings == ["restarting sleeper (exit -9, killed by SIGKILL), restart 1, after 0.1 s"]
    # Both runs are marked in the one appended log.
    assert markers(proc.log_path) == [("sleeper", first_pid, 1), ("sleeper", proc.pid, 2)]
    assert proc.starts == 2


def test_a_restarted_child_outlives_stop_until_the_caller_stops_it(
    spawn: Callable[..., ManagedProcess], supervisors: Callable[..., Supervisor]
) -> None:
    """The monitor thread started it, so the thread must not end (parent-death signal) before it does."""
    supervisor = supervisors(initial_backoff_s=0.05)
    proc = spawn("sleeper")
    supervisor.add(proc)
    supervisor.start()
    proc.kill()
    until_sync(lambda: supervisor.restarts("sleeper") == 1 and proc.alive(), 10, "the sleeper restarted")

    supervisor.stop()
    assert not supervisor.join(timeout_s=0.5)  # still holding its child
    assert proc.alive()
    proc.stop(timeout_s=2)
    assert proc.proc is not None and proc.proc.returncode == -signal.SIGTERM  # its own stop, not SIGKILL
    assert supervisor.join(timeout_s=5)


def test_backoff_doubles_in_a_crash_loop_up_to_the_cap_and_resets_after_stable_uptime(
    spawn: Callable[..., ManagedProcess],
    supervisors: Callable[..., Supervisor],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    supervisor = supervisors(initial_backoff_s=0.05, max_backoff_s=0.2, stable_uptime_s=1.0)
    with caplog.at_level(logging.WARNING, logger="flotilla.stack.supervisor"):
        proc = spawn("crasher", CRASH_LOOP, str(tmp_path / "runs"))
        supervisor.add(proc)
        supervisor.start()
        # 4 quick crashes, one exit after a stable run, then up for good: 5 restarts.
        until_sync(lambda: supervisor.restarts("crasher") == 5 and proc.alive(), 20, "five restarts, then up")

    assert backoffs_logged(caplog, "crasher") == [0.05, 0.1, 0.2, 0.2, 0.05]
    assert [start for _, _, start in markers(proc.log_path)] == [1, 2, 3, 4, 5, 6]
    status = supervisor.status()
    assert [(s.name, s.alive, s.restarts, s.last_exit) for s in status] == [("crasher", True, 5, "exit 0")]
    assert re.fullmatch(rf"crasher: up \d+ s, pid {proc.pid}, 5 restarts", str(status[0]))


def test_stop_prevents_restarts_even_when_one_is_pending(
    spawn: Callable[..., ManagedProcess], supervisors: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = supervisors(initial_backoff_s=0.3)
    proc = spawn("sleeper")
    supervisor.add(proc)
    supervisor.start()
    with caplog.at_level(logging.WARNING, logger="flotilla.stack.supervisor"):
        proc.kill()
        until_sync(lambda: backoffs_logged(caplog, "sleeper") == [0.3], 10, "the restart pending")  # seen dead
    supervisor.stop()
    supervisor.stop()  # idempotent
    assert supervisor.join(timeout_s=2)  # it started no child, so it ends at once: no restart can follow
    assert not proc.alive() and supervisor.restarts("sleeper") == 0
    with pytest.raises(RuntimeError):
        supervisor.start()


def test_remove_stops_watching(
    spawn: Callable[..., ManagedProcess], supervisors: Callable[..., Supervisor]
) -> None:
    supervisor = supervisors(initial_backoff_s=0.05)
    kept, removed = spawn("kept"), spawn("removed")
    supervisor.add(kept)
    supervisor.add(removed)
    supervisor.start()

    assert supervisor.remove("removed") is removed
    assert supervisor.remove("removed") is None
    removed.kill()
    kept.kill()
    until_sync(lambda: supervisor.restarts("kept") == 1 and kept.alive(), 10, "kept restarted")
    assert not removed.alive() and supervisor.restarts("removed") == 0
    assert [s.name for s in supervisor.status()] == ["kept"]


def test_a_process_without_restart_is_reported_and_left_down(
    spawn: Callable[..., ManagedProcess], supervisors: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = supervisors(initial_backoff_s=0.05)
    proc = spawn("oneshot", "import sys; sys.exit(7)")
    supervisor.add(proc, restart=False)
    with caplog.at_level(logging.WARNING, logger="flotilla.stack.supervisor"):
        supervisor.start()
        until_sync(lambda: "not restarting it" in caplog.text, 10, "its exit seen and reported")
    assert supervisor.restarts("oneshot") == 0 and not proc.alive()
    messages = [r.getMessage() for r in caplog.records if r.name == "flotilla.stack.supervisor"]
    assert messages == ["oneshot exited (exit 7); not restarting it"]
    assert str(supervisor.status()[0]) == "oneshot: down (exit 7), not restarted, 0 restarts"


def test_stop_uses_the_process_stop_signal(spawn: Callable[..., ManagedProcess]) -> None:
    """A program that ignores SIGTERM but honours SIGINT stops at once with stop_signal=SIGINT."""
    ignores_term = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    # It honours SIGINT even when started from a shell's background job, which starts its children
    # with SIGINT ignored (and Python then installs no KeyboardInterrupt handler).
    honours_int = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " + ignores_term
    proc = spawn("int-stopper", honours_int, stop_signal=signal.SIGINT)
    until_sync(lambda: handles(proc.pid, "SigIgn", signal.SIGTERM), 10, "its handlers installed")  # SIGINT's first
    began_s = time.monotonic()
    proc.stop(timeout_s=5)
    assert time.monotonic() - began_s < 2
    assert proc.describe_exit() != "exit -9, killed by SIGKILL"

    stubborn = spawn("term-ignorer", ignores_term)
    until_sync(lambda: handles(stubborn.pid, "SigIgn", signal.SIGTERM), 10, "SIGTERM ignored")
    stubborn.stop(timeout_s=0.5)
    assert stubborn.describe_exit() == "exit -9, killed by SIGKILL"


def test_waiting_for_a_previous_holder_of_a_directory(spawn: Callable[..., ManagedProcess], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    wait_for_previous_holder(data, timeout_s=0.1)  # nobody holds it

    holder = spawn("holder", SLEEPER, f"-dir={data}")
    until_sync(lambda: cmdline(holder.pid) == holder.argv, 10, "the holder's exec")
    with pytest.raises(RuntimeError) as failure:
        wait_for_previous_holder(data, timeout_s=0.3)
    message = str(failure.value)
    assert f"pid {holder.pid}" in message and f"-dir={data}" in message and str(data) in message

    # A holder that exits within the timeout is waited for.
    began_s = time.monotonic()
    leaving = spawn("leaving", "import time; time.sleep(1.0)", str(data))
    until_sync(lambda: cmdline(leaving.pid) == leaving.argv, 10, "the leaver's exec")
    holder.stop(timeout_s=2)
    wait_for_previous_holder(data, timeout_s=10)
    waited_s = time.monotonic() - began_s
    # It returns as the leaver exits: an exiting process shows no command line a moment before waitpid
    # reports it gone (seen once under a loaded CI run), so its end is waited for, briefly.
    until_sync(lambda: not leaving.alive(), 2, "the leaver's exit")
    assert 0.9 <= waited_s < 5  # it waited out the leaver's second of sleep, and no longer


def test_a_big_log_is_rotated_when_its_process_starts_and_old_ones_are_dropped(tmp_path: Path) -> None:
    from flotilla.stack.processes import rotate_log

    log = tmp_path / "svc.log"
    for run in range(4):
        log.write_bytes(f"run {run}\n".encode() * 100)
        assert rotate_log(log, max_bytes=10, backups=2)
    assert not log.exists()
    assert (tmp_path / "svc.log.1").read_text().startswith("run 3")
    assert (tmp_path / "svc.log.2").read_text().startswith("run 2")
    assert not (tmp_path / "svc.log.3").exists()
    log.write_text("small\n")
    assert not rotate_log(log, max_bytes=10_000)
