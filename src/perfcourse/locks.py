"""One lock across processes: two kernels (or two `perfcourse` commands) starting the same
server or building the same dataset at once wait for each other instead of colliding."""

from __future__ import annotations

import contextlib
import fcntl  # POSIX only, like the embedded servers
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
