"""The local stack installs Triton's backend files even while an earlier run's process still runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flotilla.stack.components import _install_file


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
