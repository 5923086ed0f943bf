"""`flotilla up` starts every part, and SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flotilla.clients.client import FlotillaClient
from flotilla.common.server import is_serving
from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MODEL, REPO, sample, stack_settings


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


def start_up(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, object], set[int]]:
    """`flotilla up` with one Triton replica; returns it, its stack.json and its descendants."""
    env = dict(os.environ)
    env.update({
        "FLOTILLA_RUN_DIR": str(tmp_path),
        "FLOTILLA_TRITON__REPLICAS": "1",
    })
    up = subprocess.Popen(
        [sys.executable, "-m", "flotilla", "up", "--config", str(REPO / "flotilla.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    state_file = tmp_path / "stack.json"
    deadline = time.monotonic() + 180
    while not state_file.exists():
        if up.poll() is not None:
            raise AssertionError(up.stdout.read())  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            up.kill()
            raise AssertionError("stack did not come up")
        time.sleep(0.2)
    state = json.loads(state_file.read_text())
    return up, state, descendants(up.pid)


def wait_gone(pids: set[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
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


def test_children_die_when_up_is_killed_outright(tmp_path: Path) -> None:
    up, _, children = start_up(tmp_path)
    up.kill()  # SIGKILL: no handler runs, only the parent-death signal
    up.communicate(timeout=30)
    assert wait_gone(children) == [], "orphaned processes after SIGKILL of flotilla up"


async def test_a_stack_restarts_at_once_in_the_same_directory(tmp_path: Path) -> None:
    """Stop, then start again in the same run directory right away: S3 stops
    promptly, the registry it kept brings the model back, and it serves."""
    settings = stack_settings(tmp_path, triton={"replicas": 1})
    with LocalStack(settings) as first:
        assert first.s3 is not None and first.state is not None
    stopped_s = time.monotonic()
    with LocalStack(settings) as second:
        assert second.state is not None and second.settings is not None
        restarted_s = time.monotonic() - stopped_s
        async with FlotillaClient(second.state.router, API_KEY, second.settings.s3) as client:
            result = await client.classify_jpeg(sample("chelsea.jpg"), MODEL)
        with second.models_client() as models:
            events = [e.kind for e in models.status(MODEL).events]
    assert result.classes[0].label == "Egyptian cat"
    assert "deployed" in events and "lost" not in events
    assert restarted_s < 120
    s3_log = (tmp_path / "logs" / "seaweedfs.log").read_text()
    assert s3_log.count("==== seaweedfs started pid") == 2
    assert "resource temporarily unavailable" not in s3_log, "the first S3 still held its store"
