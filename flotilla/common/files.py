"""Files that hold secrets: written private from their first byte, replaced whole (no grpc)."""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` at once (a reader never sees half a file), the new file
    created with ``mode`` (default: the owner's alone), never readable by others even while written."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a partial file left by a crash keeps its old mode otherwise
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
