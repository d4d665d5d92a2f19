"""Memory: Python allocations (tracemalloc) and what the operating system sees (RSS)."""


from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from memory_profiler import memory_usage

from .units import format_bytes

__all__ = [
    "MemoryUsage",
    "process_rss",
    "rss_during",
    "RssUsage",
    "track_memory",
]

# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryUsage:
    """Python allocations of a block, in bytes (filled in when the block ends)."""

    peak_bytes: int = 0
    current_bytes: int = 0
    _baseline: int = field(default=0, repr=False)
    _peak_seen: int = field(default=0, repr=False)

    def __str__(self) -> str:
        return (f"peak {format_bytes(self.peak_bytes)}, "
                f"still allocated {format_bytes(self.current_bytes)}")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


_active_trackers: list[MemoryUsage] = []


@contextlib.contextmanager
def track_memory() -> Iterator[MemoryUsage]:
    """Measure the Python memory a block allocates, with :mod:`tracemalloc`.

    >>> with track_memory() as mem:
    ...     rows = list(range(1_000_000))
    >>> mem.peak_bytes, mem.current_bytes    # peak during the block, still held at its end

    Both are relative to the start of the block. Only allocations made through Python's
    allocator count (C libraries allocating on their own are invisible: see :func:`rss_during`).
    Tracing slows code down several times: never time code inside this block. Blocks may nest.
    """
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    current, peak = tracemalloc.get_traced_memory()
    for outer in _active_trackers:  # reset_peak below must not hide an outer block's peak
        outer._peak_seen = max(outer._peak_seen, peak)
    tracemalloc.reset_peak()
    usage = MemoryUsage(_baseline=current, _peak_seen=current)
    _active_trackers.append(usage)
    try:
        yield usage
    finally:
        current, peak = tracemalloc.get_traced_memory()
        _active_trackers.remove(usage)
        usage.peak_bytes = max(peak, usage._peak_seen) - usage._baseline
        usage.current_bytes = current - usage._baseline
        for outer in _active_trackers:
            outer._peak_seen = max(outer._peak_seen, peak)
        if started_here:
            tracemalloc.stop()


def process_rss() -> int:
    """Resident set size of this process in bytes: the memory the operating system sees."""

    return psutil.Process().memory_info().rss


@dataclass
class RssUsage:
    """Process memory (RSS) around a call, in bytes. Made by :func:`rss_during`."""

    before_bytes: int
    peak_bytes: int
    result: Any = field(default=None, repr=False)

    @property
    def increase_bytes(self) -> int:
        """How much the peak exceeded the process size before the call."""
        return max(0, self.peak_bytes - self.before_bytes)

    def __str__(self) -> str:
        return (f"peak RSS {format_bytes(self.peak_bytes)} "
                f"(+{format_bytes(self.increase_bytes)} over {format_bytes(self.before_bytes)})")

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


def rss_during(fn: Callable[..., Any], *args: Any, interval: float = 0.01,
               **kwargs: Any) -> RssUsage:
    """Call ``fn(*args, **kwargs)`` while sampling the process RSS every ``interval`` seconds.

    Uses ``memory_profiler.memory_usage`` (the sampler runs in a helper process). Returns the
    RSS before the call, the peak during it, and the call's result in ``.result``. RSS counts
    every allocation (C libraries, NumPy, the database driver), unlike :func:`track_memory`,
    but memory freed by Python is not always returned to the OS: compare peaks, not ends.
    """

    before = process_rss()
    peak_mib, result = memory_usage(
        (fn, args, kwargs), interval=interval, max_usage=True, retval=True, include_children=False
    )
    if isinstance(peak_mib, list | tuple):  # older memory_profiler versions return a list
        peak_mib = max(peak_mib)
    peak = max(int(peak_mib * 1024 * 1024), before)
    return RssUsage(before_bytes=before, peak_bytes=peak, result=result)

