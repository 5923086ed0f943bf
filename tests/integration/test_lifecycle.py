"""`flotilla up` starts every part, and SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flotilla.common.server import is_serving
from tests.integration.conftest import MODEL_REPOSITORY, REPO


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


def test_up_serves_then_stops_everything_on_sigterm(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update({
        "FLOTILLA_RUN_DIR": str(tmp_path),
        "FLOTILLA_TRITON__REPLICAS": "1",
        "FLOTILLA_TRITON__MODEL_REPOSITORY": str(MODEL_REPOSITORY),
    })
    up = subprocess.Popen(
        [sys.executable, "-m", "flotilla", "up", "--config", str(REPO / "flotilla.yaml")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    try:
        state_file = tmp_path / "stack.json"
        deadline = time.monotonic() + 180
        while not state_file.exists():
            assert up.poll() is None, up.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "stack did not come up"
            time.sleep(0.2)
        state = json.loads(state_file.read_text())
        assert is_serving(state["router"])
        children = descendants(up.pid)
        # S3, one Triton (+ its Python stub), preprocess, batcher, router
        assert len(children) >= 5, children
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "API key" in output and "router" in output
    time.sleep(0.5)  # let the kernel reap the last ones
    left = [pid for pid in children if alive(pid)]
    assert left == [], f"orphaned processes after SIGTERM: {left}"
