"""Memory: Python allocations (tracemalloc) and what the operating system sees (RSS)."""


from __future__ import annotations

import contextlib
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
from memory_profiler import memory_usage

from .units import format_bytes

__all__ = [
    "Footprint",
    "MemoryUsage",
    "processes_with_env",
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



# ---------------------------------------------------------------------------------------------
# A session's footprint: several processes together (Binder, a learner on a shared server)
# ---------------------------------------------------------------------------------------------


def processes_with_env(name: str, value: str) -> Callable[[], list[psutil.Process]]:
    """A selector for :class:`Footprint`: every process whose environment has ``name=value``.

    The course's processes inherit the environment they were started with: a Jupyter server, its
    kernels, and the embedded PostgreSQL and Redis a kernel starts. Giving one session its own
    ``PERFCOURSE_DATA`` directory therefore names all of its processes, and only them. (Reading
    another user's environment needs root: as another user, only your own processes are seen.)
    """

    wanted = f"{name}={value}".encode()

    def select() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                with open(f"/proc/{process.pid}/environ", "rb") as environ:
                    if wanted in environ.read().split(b"\0"):
                        found.append(process)
            except OSError:  # gone, or not ours to read
                continue
        return found

    return select


class Footprint:
    """The peak memory of a group of processes together, sampled in a thread while a block runs.

    >>> with Footprint(processes_with_env("PERFCOURSE_DATA", "/tmp/learner1")) as footprint:
    ...     run_the_notebooks()
    >>> footprint.peak_bytes, footprint.peak_by_process

    Each process counts with its PSS (proportional set size: pages shared between processes,
    such as PostgreSQL's shared buffers or a forked worker's copy of its parent, are split among
    them), so the sum is what the group costs the machine, the figure a container limit such as
    Binder's is about. ``peak_by_process`` is the breakdown at the moment of the peak, by
    process name; ``most_by_process`` the most each name held at any sample.
    """

    def __init__(self, select: Callable[[], list[psutil.Process]], interval_s: float = 0.2) -> None:
        self.select = select
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_by_process: dict[str, int] = {}
        self.most_by_process: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Measure the group once; update the peak. Returns the group's total PSS in bytes."""
        by_name: dict[str, int] = {}
        for process in self.select():
            try:
                pss = process.memory_full_info().pss
                name = process.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            by_name[name] = by_name.get(name, 0) + pss
        total = sum(by_name.values())
        self.samples += 1
        for name, size in by_name.items():
            self.most_by_process[name] = max(size, self.most_by_process.get(name, 0))
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_by_process = total, by_name
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Footprint:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="footprint", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(size)}"
                          for name, size in sorted(self.peak_by_process.items(), key=lambda kv: -kv[1]))
        return f"peak {format_bytes(self.peak_bytes)} over {self.samples} samples ({parts})"
