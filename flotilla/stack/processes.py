"""Child processes of the local stack: started in their own process group,
killed with their parent, stopped with SIGTERM then SIGKILL."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork, never inside one


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the parent dies.

    The signal follows the thread that forked, so children must be started
    from a thread that lives as long as the stack (the main thread).
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    """One long-running child with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        address: str = "",
    ) -> None:
        self.name = name
        self.address = address
        """host:port the process serves, when it is a gRPC service."""
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group, stopped as a whole
                preexec_fn=_die_with_parent,
            )
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_summary(self) -> str:
        """Exit status and the end of the log, for error messages."""
        code = None if self.proc is None else self.proc.poll()
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            tail = []
        return f"{self.name} exited with {code}; last log lines ({self.log_path}):\n" + "\n".join(tail)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout_s)
        self._signal_group(signal.SIGKILL)  # stragglers in the group (e.g. backend stubs)
        self.proc.wait()

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


def wait_until(check, timeout_s: float, what: str, *, procs: Sequence[ManagedProcess] = (), interval_s: float = 0.2) -> None:  # type: ignore[no-untyped-def]
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
