"""stack.json: the CLI tells a stopped or crashed stack from a running one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flotilla.cli import main
from flotilla.stack.state import StackNotRunning, StackState, mark_stopped, now_iso, process_start_ticks, read_running


def state(**changes: object) -> StackState:
    values: dict[str, object] = {
        "router": "127.0.0.1:1", "api_key": "k", "s3_endpoint": "127.0.0.1:2", "s3_access_key": "a",
        "s3_secret_key": "s", "s3_bucket": "images", "models": ["m"], "controller": "127.0.0.1:3",
        "pid": os.getpid(), "pid_start_ticks": process_start_ticks(os.getpid()) or 0, "started_at": now_iso(),
    }
    values.update(changes)
    return StackState(**values)  # type: ignore[arg-type]


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_running_stack_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    written = state()
    written.write(path)
    assert read_running(path) == written
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["stack.json"]  # no temporary file left


def test_a_stopped_stack_is_not_running_and_says_when_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    running = state()
    running.write(path)
    assert mark_stopped(path, running)
    stopped_at = json.loads(path.read_text())["stopped_at"]
    assert stopped_at and running.stopped_at == stopped_at
    with pytest.raises(StackNotRunning) as info:
        read_running(path)
    assert str(info.value) == (
        f"the stack in {tmp_path} is not running (stopped at {stopped_at}); start it with `flotilla up`"
    )


def test_a_stack_whose_process_is_gone_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    pid = exited_pid()
    state(pid=pid, pid_start_ticks=0, started_at="2026-12-06T10:00:00+00:00").write(path)
    with pytest.raises(StackNotRunning) as info:
        read_running(path)
    assert str(info.value) == (
        f"the stack in {tmp_path} is not running (its process {pid} is gone: killed or crashed, "
        "started at 2026-12-06T10:00:00+00:00); start it with `flotilla up`"
    )


def test_a_recycled_pid_is_not_taken_for_the_stack(tmp_path: Path) -> None:
    """A live process with the stack's pid but another start time is someone else."""
    path = tmp_path / "stack.json"
    ticks = process_start_ticks(os.getpid())
    assert ticks is not None
    state(pid_start_ticks=ticks + 1).write(path)
    with pytest.raises(StackNotRunning, match="is gone: killed or crashed"):
        read_running(path)


def test_a_stack_json_from_before_pids_were_recorded_counts_as_running(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    old = {k: v for k, v in state().__dict__.items() if k not in ("pid", "pid_start_ticks", "started_at", "stopped_at")}
    path.write_text(json.dumps(old))
    assert read_running(path).router == "127.0.0.1:1"


def test_only_the_stack_that_wrote_stack_json_marks_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "stack.json"
    mine = state(started_at="2026-12-06T10:00:00+00:00")
    newer = state(started_at="2026-12-06T11:00:00+00:00")  # a later stack in the same directory
    newer.write(path)
    assert not mark_stopped(path, mine)
    assert read_running(path) == newer
    assert not mark_stopped(tmp_path / "missing.json", mine)


@pytest.mark.parametrize(
    "argv",
    [
        ["infer", "a.jpg", "--model", "m"],
        ["models", "list"],
        ["models", "upload", "m", "dir"],
        ["top", "--once"],
        ["loadtest"],
    ],
)
def test_the_cli_says_the_stack_is_not_running(tmp_path: Path, argv: list[str]) -> None:
    path = tmp_path / "stack.json"
    running = state()
    running.write(path)
    mark_stopped(path, running)
    args = [*argv[:1], "--state", str(path), *argv[1:]] if argv[0] == "models" else [*argv, "--state", str(path)]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert str(exited.value) == (
        f"the stack in {tmp_path} is not running (stopped at {running.stopped_at}); start it with `flotilla up`"
    )


def test_the_cli_says_when_stack_json_is_missing(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["infer", "a.jpg", "--model", "m", "--state", str(tmp_path / "stack.json")])
    assert "no running stack found" in str(exited.value) and "flotilla up" in str(exited.value)
