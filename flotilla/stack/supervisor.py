"""The local stack's supervisor: a watched process that dies is started again, with backoff.

One monitor thread polls the watched processes every ``poll_interval_s``.
When one has exited it is started again with the same command line,
environment and log (so the same port: its peers reconnect to the same
address) after a backoff: ``initial_backoff_s`` at first, doubling with
each further crash up to ``max_backoff_s``, and back to ``initial_backoff_s``
once the process has stayed up for ``stable_uptime_s``. Each restart is
logged once, at WARNING, with the exit status.

Who owns the children. A child's parent-death signal (see
``flotilla.stack.processes``) fires when the *thread* that started it
exits, not the process. Restarted children are therefore started by the
monitor thread itself, and that thread outlives ``stop``: it stops
supervising at once but ends only when every child it started has exited
(the caller stops them), so ``stop`` never kills them ahead of their
graceful stop. Processes handed to ``add`` were started by the caller's
thread and die when that thread ends; the stack's main thread lives as
long as the stack, so that is the intended lifetime.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from flotilla.stack.processes import ManagedProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessStatus:
    """One watched process as ``Supervisor.status`` reports it."""

    name: str
    pid: int | None
    alive: bool
    restart: bool
    """Whether the supervisor restarts it when it exits."""
    restarts: int
    """Restarts so far."""
    uptime_s: float | None
    """Seconds since its latest start; None while it is down."""
    last_exit: str
    """How it last exited (``exit -9, killed by SIGKILL``); empty if it never has."""

    def __str__(self) -> str:
        if self.alive and self.uptime_s is not None:
            state = f"up {self.uptime_s:.0f} s, pid {self.pid}"
        else:
            state = f"down ({self.last_exit or 'not started'})" + ("" if self.restart else ", not restarted")
        return f"{self.name}: {state}, {self.restarts} restarts"


@dataclass
class _Watch:
    proc: ManagedProcess
    restart: bool
    backoff_s: float
    """The delay before the next restart."""
    restarts: int = 0
    restart_at_s: float | None = None
    """Monotonic time of the pending restart; None while none is pending."""
    last_exit: str = ""
    reported: bool = False
    """The current exit has been logged."""


class Supervisor:
    """Restarts watched processes that exit; grpc-free, one monitor thread.

    ``on_restart(proc)`` runs on the monitor thread after each restart
    (e.g. to log or re-register the process); an exception in it is logged.
    """

    def __init__(
        self,
        *,
        poll_interval_s: float = 0.2,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        stable_uptime_s: float = 30.0,
        on_restart: Callable[[ManagedProcess], None] | None = None,
    ) -> None:
        self.poll_interval_s = poll_interval_s
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_uptime_s = stable_uptime_s
        self.on_restart = on_restart
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()  # guards _watches; held while a restart starts a child
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_here: list[subprocess.Popen[bytes]] = []
        """Children the monitor thread started; it outlives ``stop`` until they have exited."""

    # -- watching ------------------------------------------------------------

    def add(self, proc: ManagedProcess, *, restart: bool = True) -> None:
        """Watch ``proc``, which must have been started; replaces a watch of the same name."""
        if proc.proc is None:
            raise ValueError(f"{proc.name} has not been started")
        with self._lock:
            self._watches[proc.name] = _Watch(proc, restart, self.initial_backoff_s)

    def remove(self, name: str) -> ManagedProcess | None:
        """Stop watching ``name`` (the caller stops the process); None if it was not watched.

        Once this returns the process is never restarted; a restart already
        under way completes first, so the caller stops the current child.
        """
        with self._lock:
            watch = self._watches.pop(name, None)
        return None if watch is None else watch.proc

    def restarts(self, name: str) -> int:
        """How many times ``name`` has been restarted (0 if not watched)."""
        with self._lock:
            watch = self._watches.get(name)
            return 0 if watch is None else watch.restarts

    def status(self) -> list[ProcessStatus]:
        """Each watched process, in the order they were added; ``str()`` of one is a line to print."""
        now_s = time.monotonic()
        with self._lock:
            watches = list(self._watches.values())
        statuses = []
        for w in watches:
            alive = w.proc.alive()
            started_s = w.proc.started_at_s
            statuses.append(
                ProcessStatus(
                    name=w.proc.name,
                    pid=w.proc.pid,
                    alive=alive,
                    restart=w.restart,
                    restarts=w.restarts,
                    uptime_s=now_s - started_s if alive and started_s is not None else None,
                    last_exit=w.last_exit,
                )
            )
        return statuses

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the monitor thread (once; a stopped supervisor is not started again)."""
        if self._stopping.is_set():
            raise RuntimeError("this supervisor was stopped; make a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop supervising (idempotent): once this returns, nothing is restarted.

        The processes are left running for the caller to stop. The monitor
        thread ends once the children it started have exited (``join``).
        """
        self._stopping.set()
        with self._lock:  # waits for a restart under way
            pass

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the monitor thread to end after ``stop``; True if it has (or never ran)."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- the monitor thread --------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_interval_s):
            for proc in self._check_all(time.monotonic()):
                self._notify(proc)
        # Children started on this thread get the parent-death signal when it ends:
        # keep it alive until the caller has stopped them.
        while any(child.poll() is None for child in self._started_here):
            time.sleep(self.poll_interval_s)

    def _check_all(self, now_s: float) -> list[ManagedProcess]:
        """Bookkeeping for every watch, and the restarts that are due; returns the restarted."""
        restarted = []
        with self._lock:
            for w in self._watches.values():
                if self._stopping.is_set():
                    break
                if self._check(w, now_s):
                    restarted.append(w.proc)
        return restarted

    def _check(self, w: _Watch, now_s: float) -> bool:
        proc = w.proc
        uptime_s = 0.0 if proc.started_at_s is None else now_s - proc.started_at_s
        if proc.alive():
            if uptime_s >= self.stable_uptime_s:
                w.backoff_s = self.initial_backoff_s  # stable again: the next crash is a first one
            return False
        if not w.reported:
            w.reported = True
            w.last_exit = proc.describe_exit()
            if not w.restart:
                log.warning("%s exited (%s); not restarting it", proc.name, w.last_exit)
                return False
            if uptime_s >= self.stable_uptime_s:
                w.backoff_s = self.initial_backoff_s
            w.restart_at_s = now_s + w.backoff_s
            log.warning(
                "restarting %s (%s), restart %d, after %.3g s", proc.name, w.last_exit, w.restarts + 1, w.backoff_s
            )
        if w.restart_at_s is None or now_s < w.restart_at_s:
            return False
        w.backoff_s = min(w.backoff_s * 2, self.max_backoff_s)
        try:
            proc.start()
        except OSError as exc:  # e.g. its binary is gone; try again after the next backoff
            w.restart_at_s = now_s + w.backoff_s
            log.error("restarting %s failed: %s; next try after %.3g s", proc.name, exc, w.backoff_s)
            return False
        w.restarts += 1
        w.restart_at_s = None
        w.reported = False
        assert proc.proc is not None
        self._started_here = [c for c in self._started_here if c.poll() is None] + [proc.proc]
        return True

    def _notify(self, proc: ManagedProcess) -> None:
        if self.on_restart is None:
            return
        try:
            self.on_restart(proc)
        except Exception:
            log.exception("on_restart failed for %s", proc.name)
