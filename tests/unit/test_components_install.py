"""The local stack installs Triton's backend files even while an earlier run's process still runs them,
and removes the shared memory its replicas' Python backends leave when killed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flotilla.config import load_settings
from flotilla.services.preprocess.triton.shm import SHM_DIR
from flotilla.stack.components import _install_file
from flotilla.stack.local import LocalStack


def test_a_running_executable_is_replaced_not_written_into(tmp_path: Path) -> None:
    source = tmp_path / "new"
    source.write_bytes(Path("/bin/sleep").read_bytes())
    source.chmod(0o755)
    target = tmp_path / "stub"
    target.write_bytes(Path("/bin/sleep").read_bytes())
    target.chmod(0o755)
    running = subprocess.Popen([str(target), "30"])  # the old stub, still running (open for writing: ETXTBSY)
    try:
        source.write_bytes(source.read_bytes() + b"\0")  # a different build of the same file
        _install_file(source, target)
        assert target.read_bytes() == source.read_bytes()
        assert running.poll() is None
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    finally:
        running.kill()
        running.wait()


def test_a_stack_removes_its_replicas_python_backend_shared_memory_on_stop(tmp_path: Path) -> None:
    # A replica killed outright leaves its Python backend's /dev/shm files: the stack that named
    # them removes them when it stops, and only them (another stack may be running beside it).
    if not SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    stack = LocalStack(load_settings(None, run_dir=tmp_path))
    other = LocalStack(load_settings(None, run_dir=tmp_path / "other"))
    mine, theirs = SHM_DIR / f"{stack.shm_prefix}0-region", SHM_DIR / f"{other.shm_prefix}0-region"
    try:
        mine.write_bytes(b"x")
        theirs.write_bytes(b"x")
        stack.stop()
        assert not mine.exists() and theirs.exists()
    finally:
        mine.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)
