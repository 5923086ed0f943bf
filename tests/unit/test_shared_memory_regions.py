"""The worker's shared-memory regions for batches to Triton: sizes, reuse, the cap, cleanup."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flotilla.services.preprocess.triton.shm import MIN_REGION_BYTES, SharedMemoryRegions, remove_stale


def regions(directory: Path, max_bytes: int = 64 * MIN_REGION_BYTES) -> SharedMemoryRegions:
    return SharedMemoryRegions("flotilla-worker-", max_bytes=max_bytes, directory=directory, owner=1)


def test_a_region_fits_its_batch_in_a_power_of_two_and_holds_its_bytes(tmp_path: Path) -> None:
    shm = regions(tmp_path)
    batch = np.arange(3 * MIN_REGION_BYTES // 2, dtype=np.uint32).astype(np.uint8)
    region = shm.acquire(batch.nbytes)
    assert region is not None
    assert region.nbytes == 2 * MIN_REGION_BYTES
    assert region.key == "/" + region.name and (tmp_path / region.name).stat().st_size == region.nbytes
    region.write(memoryview(batch))
    assert (tmp_path / region.name).read_bytes()[: batch.nbytes] == batch.tobytes(), "the file is the mapping"
    assert shm.acquire(10).nbytes == MIN_REGION_BYTES, "small batches still get a whole minimum region"


def test_a_released_region_is_reused_smallest_fit_first(tmp_path: Path) -> None:
    shm = regions(tmp_path)
    big, small = shm.acquire(4 * MIN_REGION_BYTES), shm.acquire(MIN_REGION_BYTES)
    assert big is not None and small is not None and big is not small
    shm.release(big)
    shm.release(small)
    assert shm.acquire(100) is small
    assert shm.acquire(100) is big, "a larger free region beats making a new one"
    assert len(shm.regions) == 2


def test_past_the_cap_a_batch_gets_no_region(tmp_path: Path) -> None:
    shm = regions(tmp_path, max_bytes=3 * MIN_REGION_BYTES)
    held = [shm.acquire(MIN_REGION_BYTES) for _ in range(3)]
    assert all(held)
    assert shm.acquire(1) is None, "the caller sends that batch inline"
    assert shm.acquire(8 * MIN_REGION_BYTES) is None
    shm.release(held[0])  # type: ignore[arg-type]
    assert shm.acquire(1) is held[0]


def test_close_removes_every_file(tmp_path: Path) -> None:
    shm = regions(tmp_path)
    for _ in range(3):
        shm.acquire(MIN_REGION_BYTES)
    assert len(list(tmp_path.iterdir())) == 3
    shm.close()
    assert list(tmp_path.iterdir()) == [] and shm.regions == []


def test_regions_of_a_stopped_worker_are_removed_and_a_running_ones_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    for name in (f"flotilla-worker-{dead_pid}-0", f"flotilla-worker-{dead_pid}-1",
                 f"flotilla-worker-{os.getpid()}-0", "flotilla-worker-notapid-0", "other-file"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale("flotilla-worker-", tmp_path)
    assert sorted(removed) == [f"flotilla-worker-{dead_pid}-0", f"flotilla-worker-{dead_pid}-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"flotilla-worker-{os.getpid()}-0", "flotilla-worker-notapid-0", "other-file"]
    )


def test_no_room_for_a_region_sends_the_batch_inline_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A container's /dev/shm is 64 MiB by default: reserving the pages fails with ENOSPC up front
    # (a sparse file would instead SIGBUS the worker on the first write past the room).
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    shm = regions(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", full)
    assert shm.acquire(MIN_REGION_BYTES) is None
    assert list(tmp_path.iterdir()) == [] and shm.regions == []
    monkeypatch.undo()
    assert shm.acquire(MIN_REGION_BYTES) is not None, "a later batch tries again"
