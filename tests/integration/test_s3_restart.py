"""SeaweedFS stops promptly and a new one starts cleanly on the same data directory.

A real ``weed mini`` (as the local stack starts it), no other part of the
stack. Stopping it used to take the whole 10 s grace and end in SIGKILL
when a client connection to its volume server sat idle; starting another
on the same directory while the old one still ran failed inside weed's
leveldb ("resource temporarily unavailable").
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flotilla.common.object_store import ObjectStore
from flotilla.config import S3Settings
from flotilla.stack.components import seaweed_s3
from flotilla.stack.local import s3_ready
from flotilla.stack.processes import ManagedProcess, free_port, wait_until

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
KEY = "kept-across-restarts.jpg"
BODY = b"\xff\xd8 not really a jpeg \xff\xd9"


class Weeds:
    """Starts ``weed mini`` on one data directory; stops whatever is left at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.data_dir = run_dir / "s3-data"
        self.logs = run_dir / "logs"
        self.started: list[ManagedProcess] = []

    def start(self, *, previous_holder_timeout_s: float = 15.0) -> tuple[ManagedProcess, ObjectStore]:
        port = free_port(HOST)
        settings = S3Settings(endpoint=f"{HOST}:{port}")
        proc = seaweed_s3(
            settings, HOST, port, self.data_dir, self.logs / "seaweedfs.log",
            previous_holder_timeout_s=previous_holder_timeout_s,
        )
        proc.start()
        self.started.append(proc)
        store = ObjectStore(settings, timeout_s=2.0, retries=0)
        wait_until(lambda: s3_ready(store), START_TIMEOUT_S, "SeaweedFS S3", procs=[proc])
        return proc, store

    def stop_all(self) -> None:
        for proc in self.started:
            proc.stop()


@pytest.fixture
def weeds(tmp_path: Path) -> Iterator[Weeds]:
    running = Weeds(tmp_path)
    yield running
    running.stop_all()


def flag_value(proc: ManagedProcess, flag: str) -> str:
    return next(arg.split("=", 1)[1] for arg in proc.argv if arg.startswith(f"-{flag}="))


def test_weed_stops_promptly_and_restarts_on_the_same_directory(weeds: Weeds) -> None:
    first, store = weeds.start()
    assert first.stop_signal == signal.SIGTERM  # a SIGINT can be lost: see seaweed_s3
    store.put(KEY, BODY)
    # A client connection left idle on the volume server held the old stop until SIGKILL.
    idle = socket.create_connection((HOST, int(flag_value(first, "volume.port"))))
    try:
        began_s = time.monotonic()
        first.stop()
        stop_s = time.monotonic() - began_s
    finally:
        idle.close()
    assert first.describe_exit() == "exit 0"  # its own clean stop, not SIGKILL
    assert stop_s < 8.0, f"weed took {stop_s:.1f} s to stop"

    second, store = weeds.start()  # at once, same directory
    assert store.get(KEY, max_bytes=1024) == BODY
    assert second.alive()


def test_a_new_weed_waits_for_the_previous_one_or_names_it(weeds: Weeds) -> None:
    first, _ = weeds.start()

    # Still running: the new start gives up naming the holder, before weed itself fails.
    with pytest.raises(RuntimeError) as failure:
        weeds.start(previous_holder_timeout_s=0.5)
    message = str(failure.value)
    assert f"pid {first.pid}" in message and "weed mini" in message and str(weeds.data_dir) in message
    assert len(weeds.started) == 1

    # Still stopping: the new start waits for it, then comes up on the same directory.
    assert first.pid is not None
    os.kill(first.pid, signal.SIGINT)
    second, store = weeds.start()
    assert not first.alive() and first.describe_exit() == "exit 0"
    assert second.alive() and s3_ready(store)


def test_a_port_taken_before_weed_binds_it_starts_weed_again_on_other_ports(tmp_path: Path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A port chosen free can be taken before weed binds it; the stack starts weed again on other ports."""
    from flotilla.config import FlotillaSettings
    from flotilla.stack import components
    from flotilla.stack.local import LocalStack

    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen()
    # The Iceberg port given to the first weed is already in use (weed finds another for some of its
    # ports by itself, not for this one: it exits).
    iceberg = components.WEED_PORT_FLAGS.index("s3.port.iceberg")
    calls = iter(range(10**6))
    monkeypatch.setattr(
        components, "free_port", lambda host: taken.getsockname()[1] if next(calls) == iceberg else free_port(host)
    )
    stack = LocalStack(FlotillaSettings(run_dir=tmp_path))
    stack.logs.mkdir(parents=True)
    try:
        settings = stack.start_object_store()
        ObjectStore(settings, timeout_s=2.0, retries=0).put(KEY, BODY)
        assert "a port chosen for it was taken before it bound it" in caplog.text
        assert stack.s3 is not None and stack.s3.alive()
    finally:
        taken.close()
        if stack.s3 is not None:
            stack.s3.stop()
