"""``stack.json``: how clients reach a local stack, and whether it still runs.

``flotilla up`` writes it into its run directory once every part is up and
marks it stopped (``stopped_at``) when it stops. A stack whose process was
killed outright leaves it unmarked; ``pid`` (and the process's start time,
so a recycled pid does not pass for it) tells that case apart. The CLI's
``infer``, ``models``, ``top`` and ``loadtest`` read it through
``read_running``, which says which of the two happened instead of letting a
dead address time out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
from pydantic import SecretStr

from flotilla.common.files import replace_file
from flotilla.common.tls import PLAINTEXT, Dialer
from flotilla.config import S3Settings, TlsSettings


class StackNotRunning(Exception):
    """stack.json is missing, marked stopped, or its process is gone; the message says which."""


def now_iso() -> str:
    """Local time with its offset, to the second (what stack.json's times look like)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _start_ticks(process: psutil.Process) -> int | None:
    """When ``process`` started, in clock ticks since boot (/proc/PID/stat's starttime); None for a
    zombie. Raises psutil.Error when it is gone or not ours to read."""
    with process.oneshot():
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        started_s = process.create_time()
    # psutil adds the boot time to the ticks since boot; taken off again, what is left does not move
    # when the clock is set (and is what stack.json has always recorded).
    return round((started_s - psutil.boot_time()) * CLOCK_TICKS_PER_S)


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it is gone, a zombie, or not ours to read."""
    try:
        return _start_ticks(psutil.Process(pid))
    except psutil.Error:
        return None


def process_alive(pid: int, start_ticks: int) -> bool:
    """Whether ``pid`` is still the process that started at ``start_ticks`` (0: not recorded)."""
    try:
        ticks = _start_ticks(psutil.Process(pid))
    except psutil.AccessDenied:
        return psutil.pid_exists(pid)  # there, but when it started is not ours to read
    except psutil.Error:
        return False  # gone
    return ticks is not None and (not start_ticks or ticks == start_ticks)


@dataclass
class StackState:
    """What a client needs to reach a running stack (written as stack.json)."""

    router: str
    """The router's gRPC address (host:port): the Flotilla API and KServe v2 over gRPC."""
    api_key: str = field(repr=False)
    """The router's dev key (router.api_keys): unscoped, unlimited."""
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    s3_bucket: str
    models: list[str]
    controller: str = ""
    router_http: str = ""
    """The router's KServe v2 HTTP/REST address (host:port; ``http://<it>/v2/...``); "" in a state
    written before the router served HTTP."""
    artifact_bucket: str = ""
    triton: list[str] = field(default_factory=list)
    triton_http: list[str] = field(default_factory=list)
    """The same replicas' HTTP endpoints, in the same order."""
    preprocess: list[str] = field(default_factory=list)
    batcher_shards: list[str] = field(default_factory=list)
    """The shared batcher processes (host:port); which models each hosts is the controller's to say
    (``flotilla models status``)."""
    config: str = ""
    metrics: dict[str, str] = field(default_factory=dict)
    """Process name -> host:port of its Prometheus metrics (dedicated batchers come and go: see metrics_targets)."""
    pid: int = 0
    """The process running the stack (``flotilla up``); its children die with it. 0: not recorded."""
    pid_start_ticks: int = 0
    """That process's start time (clock ticks since boot), so a recycled pid is not taken for it."""
    started_at: str = ""
    """When the stack was up (ISO 8601, local time)."""
    stopped_at: str = ""
    """When it began to stop; empty while it runs."""
    admin_key: str = field(default="", repr=False)
    """The control plane's admin key (controller.admin_keys), for ``flotilla models``/``keys``."""
    tls_ca: str = ""
    """With TLS on: the CA that signed the stack's certificates (PEM file); "" when it runs plaintext."""
    tls_cert: str = ""
    """The client certificate the CLI presents (the stack's admin identity), with ``tls_key``."""
    tls_key: str = ""
    s3_secure: bool = False
    """The store speaks HTTPS (the stack runs with TLS); false in a state written before it could."""
    s3_ca_file: str = ""
    """The CA its certificate is checked against (PEM file; the stack's CA); "": the system's."""

    def dialer(self) -> Dialer:
        """Channels to the stack's services: TLS with the stack's client certificate when it has one."""
        if not self.tls_ca:
            return PLAINTEXT
        return Dialer(TlsSettings(enabled=True, ca_file=Path(self.tls_ca), cert_file=Path(self.tls_cert),
                                  key_file=Path(self.tls_key)))

    def s3_settings(self) -> S3Settings:
        """How to reach the stack's image bucket."""
        return S3Settings(
            endpoint=self.s3_endpoint, access_key=self.s3_access_key,
            secret_key=SecretStr(self.s3_secret_key), bucket=self.s3_bucket,
            secure=self.s3_secure, ca_file=Path(self.s3_ca_file) if self.s3_ca_file else None,
        )

    def write(self, path: Path) -> None:
        """Replace ``path`` at once (a reader never sees half a file); mode 0600."""
        # Holds the dev API key, the admin key and the S3 secret: private from its first byte.
        replace_file(path, (json.dumps(self.__dict__, indent=2) + "\n").encode("utf-8"))

    @classmethod
    def read(cls, path: Path) -> StackState:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def not_running(self, where: Path) -> str | None:
        """Why the stack of this state is not running (a sentence naming ``where``); None if it is."""
        if self.stopped_at:
            return f"the stack in {where} is not running (stopped at {self.stopped_at}); start it with `flotilla up`"
        if self.pid and not process_alive(self.pid, self.pid_start_ticks):
            since = f", started at {self.started_at}" if self.started_at else ""
            return (
                f"the stack in {where} is not running (its process {self.pid} is gone: killed or crashed{since}); "
                "start it with `flotilla up`"
            )
        return None


def read_running(path: Path) -> StackState:
    """The state of the stack that wrote ``path``; StackNotRunning saying why when there is none."""
    if not path.exists():
        raise StackNotRunning(f"no running stack found ({path} is missing); start one with `flotilla up`")
    state = StackState.read(path)
    reason = state.not_running(path.parent)
    if reason is not None:
        raise StackNotRunning(reason)
    return state


def mark_stopped(path: Path, state: StackState) -> bool:
    """Mark ``path`` stopped if it is still ``state``'s (another stack may have written it since)."""
    try:
        on_disk = StackState.read(path)
    except (OSError, ValueError, TypeError):
        return False
    if (on_disk.pid, on_disk.started_at) != (state.pid, state.started_at) or on_disk.stopped_at:
        return False
    on_disk.stopped_at = now_iso()
    on_disk.write(path)
    state.stopped_at = on_disk.stopped_at
    return True
