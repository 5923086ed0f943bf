"""`flotilla up` starts every part, SIGTERM leaves no process behind, stack.json says whether the
stack still runs, and S3 restarted by the supervisor still stops on its stop signal."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flotilla.clients.client import FlotillaClient
from flotilla.common.object_store import ObjectStore
from flotilla.common.probe import is_serving
from flotilla.config import S3Settings
from flotilla.stack.components import seaweed_s3
from flotilla.stack.local import LocalStack, s3_ready
from flotilla.stack.processes import ManagedProcess, free_port, wait_until
from flotilla.stack.state import StackNotRunning, read_running
from flotilla.stack.supervisor import Supervisor
from tests.integration.conftest import API_KEY, MODEL, REPO, sample, stack_settings
from tests.waiting import until_sync


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(
    tmp_path: Path, *, sigint_ignored: bool = False
) -> tuple[subprocess.Popen[str], dict[str, object], set[int]]:
    """`flotilla up` with one Triton replica (with SIGINT ignored, as a script's `flotilla up &` starts
    it); returns it, its stack.json and its descendants."""
    env = dict(os.environ)
    env.update({
        "FLOTILLA_RUN_DIR": str(tmp_path),
        "FLOTILLA_TRITON__REPLICAS": "1",
    })
    up = subprocess.Popen(
        [sys.executable, "-m", "flotilla", "up", "--config", str(REPO / "flotilla.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )
    state_file = tmp_path / "stack.json"

    def up_or_exited() -> bool:
        if up.poll() is not None:
            raise AssertionError(up.stdout.read())  # type: ignore[union-attr]
        return state_file.exists()

    try:
        until_sync(up_or_exited, 180, "the stack up (its stack.json written)", interval_s=0.2)
    except AssertionError:
        up.kill()
        raise
    state = json.loads(state_file.read_text())
    return up, state, descendants(up.pid)


def wait_gone(pids: set[int], timeout_s: float = 15.0) -> list[int]:
    """The pids still alive once every one is gone or ``timeout_s`` has passed."""
    with contextlib.suppress(AssertionError):
        until_sync(lambda: not any(alive(pid) for pid in pids), timeout_s, "every process gone", interval_s=0.2)
    return [pid for pid in pids if alive(pid)]


def test_up_serves_then_stops_everything_on_sigterm(tmp_path: Path) -> None:
    up, state, children = start_up(tmp_path)
    try:
        assert is_serving(str(state["router"]))
        # S3, one Triton (+ its Python stub), preprocess, batcher, router
        assert len(children) >= 5, children
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "API key" in output and "router" in output
    assert wait_gone(children) == [], "orphaned processes after SIGTERM"
    # stack.json stays, marked: a client hears "not running", not "object store unreachable".
    stopped_at = json.loads((tmp_path / "stack.json").read_text())["stopped_at"]
    with pytest.raises(StackNotRunning) as info:
        read_running(tmp_path / "stack.json")
    assert f"the stack in {tmp_path} is not running (stopped at {stopped_at})" in str(info.value)


def test_ctrl_c_stops_a_stack_started_with_sigint_ignored(tmp_path: Path) -> None:
    # `flotilla up &` from a script starts with SIGINT ignored; "Ctrl-C stops the stack" must hold
    # for it too (a `kill -INT` did nothing before).
    up, _, children = start_up(tmp_path, sigint_ignored=True)
    try:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate(timeout=30)
    assert up.returncode == 0, output
    assert "stopping" in output
    assert wait_gone(children) == [], "orphaned processes after SIGINT"


def test_children_die_when_up_is_killed_outright(tmp_path: Path) -> None:
    up, _, children = start_up(tmp_path)
    up.kill()  # SIGKILL: no handler runs, only the parent-death signal
    up.communicate(timeout=30)
    assert wait_gone(children) == [], "orphaned processes after SIGKILL of flotilla up"
    # Nothing marked stack.json stopped; its pid says the stack is gone.
    assert json.loads((tmp_path / "stack.json").read_text())["stopped_at"] == ""
    with pytest.raises(StackNotRunning) as info:
        read_running(tmp_path / "stack.json")
    assert f"its process {up.pid} is gone: killed or crashed" in str(info.value)


async def test_a_stack_restarts_at_once_in_the_same_directory(tmp_path: Path) -> None:
    """Stop, then start again in the same run directory right away: S3 stops
    promptly, the registry it kept brings the model back as it was (not
    replaced: its shard is given it once), and it serves."""
    settings = stack_settings(tmp_path, triton={"replicas": 1})
    with LocalStack(settings) as first:
        assert first.s3 is not None and first.state is not None
    stopped_s = time.monotonic()
    assert json.loads((tmp_path / "stack.json").read_text())["stopped_at"] == first.state.stopped_at != ""
    with LocalStack(settings) as second:
        assert second.state is not None and second.settings is not None
        restarted_s = time.monotonic() - stopped_s
        async with FlotillaClient(second.state.router, API_KEY, second.settings.s3) as client:
            result = await client.classify_jpeg(sample("chelsea.jpg"), MODEL)
        with second.models_client() as models:
            status = models.status(MODEL)
            events = [e.kind for e in status.events]
        # Only this stack's batcher is listed: the first stack's address went with it.
        assert list(status.batchers) == [second.batchers[MODEL].address]
    assert result.classes[0].label == "Egyptian cat"
    assert "deployed" in events and "lost" not in events
    assert restarted_s < 120
    s3_log = (tmp_path / "logs" / "seaweedfs.log").read_text()
    assert s3_log.count("==== seaweedfs started pid") == 2
    assert "resource temporarily unavailable" not in s3_log, "the first S3 still held its store"
    # The second stack found the model registered as configured: its shard started once, and was
    # given the model once (not taken away as "undeployed" and given again by a needless --replace).
    batcher_log = (tmp_path / "logs" / "batcher-0.log").read_text()
    assert batcher_log.count("==== batcher-0 started pid") == 2
    second_run = batcher_log.rsplit("==== batcher-0 started pid", 1)[1]
    assert second_run.count(f"now hosting {MODEL}") == 1 and "moved away" not in second_run


def test_s3_restarted_by_the_supervisor_stops_on_sigterm_even_with_sigint_ignored(tmp_path: Path) -> None:
    """A stack started in the background by a script has SIGINT ignored, and so do its children
    until they install a handler. A weed the supervisor had just restarted lost the SIGINT it was
    stopped with and was killed after the whole grace; it is sent SIGTERM, which it honours."""
    port = free_port()
    settings = S3Settings(endpoint=f"127.0.0.1:{port}")
    weed = seaweed_s3(settings, "127.0.0.1", port, tmp_path / "s3-data", tmp_path / "seaweedfs.log")
    supervisor = Supervisor(poll_interval_s=0.05, initial_backoff_s=0.05)
    stopped = threading.Event()

    def stop_the_stack(proc: ManagedProcess) -> None:
        """As the stack stops: the supervisor first, then the process - here just as it came back."""
        supervisor.stop()
        proc.stop()
        stopped.set()

    supervisor.on_restart = stop_the_stack
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `flotilla up &` in a script has it
    try:
        weed.start()
        wait_until(lambda: s3_ready(ObjectStore(settings, timeout_s=2.0, retries=0)), 60, "SeaweedFS", procs=[weed])
        supervisor.add(weed)
        supervisor.start()
        weed.kill()
        assert stopped.wait(timeout=60), "the supervisor did not restart weed"
    finally:
        signal.signal(signal.SIGINT, previous)
        supervisor.stop()
        weed.stop()
    assert supervisor.restarts("seaweedfs") == 1
    assert weed.describe_exit() in ("exit 0", "exit -15, killed by SIGTERM")  # not SIGKILL after the grace
    assert supervisor.join(timeout_s=10)
