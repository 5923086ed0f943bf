"""Child processes of the local stack: started in their own process group,
killed with their parent, stopped with SIGTERM then SIGKILL.

The parent-death signal follows the thread that started the child, so the
stack starts its children from a thread that lives as long as it does.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_SETPRIV = shutil.which("setpriv")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
                _dying_with_parent(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group, stopped as a whole
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
