"""Child processes of the local stack: started in their own process group,
killed with their parent, stopped with their stop signal (SIGTERM unless
set) then SIGKILL.

The parent-death signal follows the *thread* that started the child (the
kernel sends it when that thread exits, even while the process lives on),
so a child must be started from a thread that lives as long as the child
should: the stack's main thread, or the supervisor's monitor thread for
restarts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_SETPRIV = shutil.which("setpriv")
LOG_ROTATE_BYTES = 10 * 1024 * 1024
"""A log this large is rotated when its process (re)starts: <name>.log -> <name>.log.1 -> .2."""
LOG_BACKUPS = 2


def rotate_log(path: Path, max_bytes: int = LOG_ROTATE_BYTES, backups: int = LOG_BACKUPS) -> bool:
    """Shift ``path`` to ``path.1`` (and older ones up, the oldest dropped) when it is over ``max_bytes``."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for i in range(backups, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if i == backups:
            older.unlink(missing_ok=True)
        else:
            newer = path.with_name(f"{path.name}.{i + 1}")
            if older.exists():
                older.replace(newer)
    path.replace(path.with_name(f"{path.name}.1"))
    return True


_HANDED_OUT: dict[int, None] = {}
"""Ports free_port gave out, oldest first (at most _HANDED_OUT_MAX remembered)."""
_HANDED_OUT_MAX = 4096
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's choice) that this process has not
    handed out recently. The kernel may offer a port again as soon as the probe closes, before
    the process it was meant for binds it: 148 repeats in 2 000 calls here, and a stack asks for
    ~30 (two of its processes were once given one port)."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if _hand_out(port):
                return port


def _hand_out(port: int) -> bool:
    """Remember ``port`` as given out; False if it was already (the caller must not use it)."""
    if port in _HANDED_OUT:
        return False
    _HANDED_OUT[port] = None
    if len(_HANDED_OUT) > _HANDED_OUT_MAX:
        del _HANDED_OUT[next(iter(_HANDED_OUT))]
    return True


def free_port_pair(host: str = "127.0.0.1", offset: int = 10_000) -> int:
    """A free port P with P + ``offset`` free as well (for programs that derive one port from another)."""
    while True:
        port = free_port(host)
        if port + offset > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port + offset))
            except OSError:
                continue
        with _HANDED_OUT_LOCK:
            if not _hand_out(port + offset):
                continue
        return port


def _dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` wrapped so the child gets SIGKILL when this process dies.

    util-linux's setpriv sets the parent-death signal and execs the command.
    (A preexec_fn would do it too, but it runs Python between fork and exec,
    which is unsafe in a process whose other threads use gRPC.)
    """
    if _SETPRIV is None:
        return argv
    return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]


class ManagedProcess:
    """One long-running child with its output appended to a log file.

    ``start`` may be called again once the child has exited (the supervisor
    restarts it that way): same command line, environment and log, and a
    marker line in the log at every start. ``stop_signal`` is the signal
    that asks this program to shut down cleanly (SIGTERM unless the program
    honours another one better).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        address: str = "",
        stop_signal: signal.Signals = signal.SIGTERM,
        metrics_address: str = "",
    ) -> None:
        self.name = name
        self.address = address
        """host:port the process serves, when it is a gRPC service."""
        self.metrics_address = metrics_address
        """host:port of its Prometheus metrics (``/metrics``), when it has them."""
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.stop_signal = stop_signal
        """Sent to the process group first by ``stop``; SIGKILL follows after the grace."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        """How many times ``start`` has started the child."""
        self.started_at_s: float | None = None
        """``time.monotonic()`` at the latest start."""

    def start(self) -> None:
        """Start the child (again); what is left of an earlier run's process group is killed first."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)  # e.g. Triton's backend stubs, still holding ports
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path)  # bounded across runs and restarts
        with open(self.log_path, "ab") as log_file:
            proc = subprocess.Popen(
                _dying_with_parent(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group, stopped as a whole
            )
            self.proc = proc
            self.started_at_s = time.monotonic()
            self.starts += 1
            # The child has only just exec'd, so this lands ahead of its own output
            # (both write with O_APPEND; a program that prints within microseconds could
            # come first). It marks each new run and each restart in the kept log.
            stamp = datetime.now().astimezone().isoformat(timespec="seconds")
            marker = f"==== {self.name} started pid {proc.pid} at {stamp} (start #{self.starts}) ====\n"
            log_file.write(marker.encode())
        log.info("started %s (pid %d), log %s", self.name, proc.pid, self.log_path)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe_exit(self) -> str:
        """``exit 1``, ``exit -9, killed by SIGKILL``; ``running`` or ``not started`` otherwise."""
        if self.proc is None:
            return "not started"
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"exit {code}, killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"exit {code}, killed by signal {-code}"
        return f"exit {code}"

    def exit_summary(self) -> str:
        """Exit status and the end of the log, for error messages."""
        code = None if self.proc is None else self.proc.poll()
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            tail = []
        return f"{self.name} exited with {code}; last log lines ({self.log_path}):\n" + "\n".join(tail)

    def stop(self, timeout_s: float = 10.0) -> None:
        """``stop_signal`` to the whole process group, SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        began_s = time.monotonic()
        self._signal_group(self.stop_signal)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s did not stop within %.0f s of %s; killing it", self.name, timeout_s, self.stop_signal.name
            )
        self._signal_group(signal.SIGKILL)  # stragglers in the group (e.g. backend stubs)
        self.proc.wait()
        log.info("stopped %s (%s) in %.2f s", self.name, self.describe_exit(), time.monotonic() - began_s)

    def kill(self) -> None:
        """SIGKILL the process group at once (fault injection)."""
        if self.proc is not None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait()

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass


def processes_referencing(path: Path) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes, other than this one, with ``path`` as an argument.

    An argument counts when it is the path itself or an option's value
    (``-dir=<path>``). A process in the middle of an exec shows an empty
    command line for that moment; one that is not ours to read shows none.
    """
    wanted = {os.path.normpath(os.path.abspath(path)), os.path.normpath(path.resolve())}
    found = []
    for process in psutil.process_iter(["cmdline"]):  # a process gone meanwhile is skipped
        args: list[str] = process.info["cmdline"] or []  # None: not ours to read, or a zombie
        if process.pid == os.getpid():
            continue
        values = [a.split("=", 1)[1] if a.startswith("-") and "=" in a else a for a in args if a]
        if any(os.path.normpath(v) in wanted for v in values if v.startswith("/")):
            found.append((process.pid, " ".join(a for a in args if a)))
    return found


def wait_for_previous_holder(path: Path, timeout_s: float, *, interval_s: float = 0.2) -> None:
    """Wait until no other process has ``path`` on its command line.

    A data directory (e.g. SeaweedFS's leveldb stores) can be held by a
    process of an earlier run that is still stopping; starting a new one on
    it would fail deep inside that program. After ``timeout_s`` this raises
    RuntimeError naming each holder (pid and command) and the directory.
    """
    deadline = time.monotonic() + timeout_s
    holders = processes_referencing(path)
    if holders:
        pids = ", ".join(str(pid) for pid, _ in holders)
        log.info("waiting up to %.0f s for pid %s to release %s", timeout_s, pids, path)
    while holders:
        if time.monotonic() > deadline:
            listed = "; ".join(f"pid {pid}: {command}" for pid, command in holders)
            raise RuntimeError(
                f"{path} is still in use by another process after {timeout_s:.0f} s ({listed}); "
                "stop it or use another run directory"
            )
        time.sleep(interval_s)
        holders = processes_referencing(path)


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, *, procs: Sequence[ManagedProcess] = (),
    interval_s: float = 0.2,
) -> None:
    """Poll ``check()`` until true; fail early if one of ``procs`` died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{what}: {proc.exit_summary()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f}s")
        time.sleep(interval_s)
