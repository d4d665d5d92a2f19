"""Timing in the spirit of SQLAlchemy's ``examples/performance``: a registry of cases, each a
small function whose docstring is its label, timed with repeats and robust statistics.

>>> bench = Benchmark(repeat=5, warmup=1)
>>> @bench.case
... def lazy(n):
...     '''Lazy loading (N+1)'''
...     ...
>>> df = bench.run(n=100)            # one row per case, in registration order
>>> format_table(df)                 # the same table with "1.23 ms" and "12.3x" for notebooks
"""


from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .stats import percentile
from .units import format_duration

__all__ = [
    "Benchmark",
    "time_call",
    "Timing",
    "timings_table",
]

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Statistics of repeated runs of one piece of code, in seconds per call."""

    label: str
    runs: int
    min_s: float
    median_s: float
    p95_s: float
    stdev_s: float
    samples_s: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, label: str, samples_s: list[float]) -> Timing:
        if not samples_s:
            raise ValueError("No samples: repeat must be at least 1.")
        ordered = sorted(samples_s)
        return cls(
            label=label,
            runs=len(samples_s),
            min_s=ordered[0],
            median_s=statistics.median(ordered),
            p95_s=percentile(ordered, 95),
            stdev_s=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            samples_s=tuple(samples_s),
        )

    def as_row(self) -> dict[str, Any]:
        return {
            "case": self.label,
            "runs": self.runs,
            "min_s": self.min_s,
            "median_s": self.median_s,
            "p95_s": self.p95_s,
            "stdev_s": self.stdev_s,
        }

    def __str__(self) -> str:
        return (
            f"{self.label}: median {format_duration(self.median_s)}, "
            f"p95 {format_duration(self.p95_s)}, min {format_duration(self.min_s)}, "
            f"stdev {format_duration(self.stdev_s)} ({self.runs} runs)"
        )

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows the readable form
        printer.text(str(self))


def _sample(
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    *,
    repeat: int,
    warmup: int,
    number: int,
    setup: Callable[..., Any] | None,
) -> list[float]:
    if repeat < 1 or number < 1 or warmup < 0:
        raise ValueError("repeat and number must be at least 1, warmup at least 0.")
    samples = []
    for run in range(warmup + repeat):
        if setup is not None:
            setup(**kwargs)  # outside the timed part
        start = time.perf_counter()
        for _ in range(number):
            fn(**kwargs)
        elapsed = time.perf_counter() - start
        if run >= warmup:
            samples.append(elapsed / number)
    return samples


def time_call(
    fn: Callable[..., Any],
    *,
    repeat: int = 7,
    warmup: int = 1,
    number: int = 1,
    setup: Callable[..., Any] | None = None,
    label: str | None = None,
    **kwargs: Any,
) -> Timing:
    """Time ``fn(**kwargs)``: ``warmup`` untimed runs, then ``repeat`` timed runs.

    Each run calls ``fn`` ``number`` times (raise it for calls of a few microseconds) and the
    statistics are per call. ``setup(**kwargs)``, when given, runs before every run, untimed.
    """
    samples = _sample(fn, kwargs, repeat=repeat, warmup=warmup, number=number, setup=setup)
    return Timing.from_samples(label or _label_of(fn), samples)


def _label_of(fn: Callable[..., Any]) -> str:
    doc = (getattr(fn, "__doc__", None) or "").strip()
    if doc:
        return doc.splitlines()[0].strip()
    return getattr(fn, "__name__", repr(fn))


@dataclass
class _Case:
    label: str
    fn: Callable[..., Any]
    setup: Callable[..., Any] | None


class Benchmark:
    """A registry of cases timed side by side; :meth:`run` gives one table row per case.

    >>> bench = Benchmark(repeat=5, warmup=1)
    >>> @bench.setup
    ... def fresh_session(n): ...        # before each case, untimed
    >>> @bench.case
    ... def lazy(n):
    ...     '''Lazy loading: one query per order'''
    >>> bench.add("eager", lambda n: ...)
    >>> bench.run(n=100)

    A case's label is the first line of its docstring, else its name. Keyword arguments of
    :meth:`run` are passed to every case and setup. Rows keep registration order (never sorted
    by speed, so a notebook's table has the same shape on every run); ``ratio`` is each case's
    median divided by the fastest median. Raw samples stay in :attr:`samples` (label -> list).
    """

    def __init__(self, *, repeat: int = 7, warmup: int = 1, number: int = 1) -> None:
        self.repeat = repeat
        self.warmup = warmup
        self.number = number
        self.cases: list[_Case] = []
        self._setup: Callable[..., Any] | None = None
        self.samples: dict[str, list[float]] = {}

    def case(self, fn: Callable[..., Any] | None = None, *, label: str | None = None,
             setup: Callable[..., Any] | None = None):
        """Register a case; usable as ``@bench.case`` or ``@bench.case(label=..., setup=...)``.

        ``setup``, if given, runs before every timed run of this case, untimed.
        """
        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self.add(label or _label_of(func), func, setup=setup)
            return func

        return register(fn) if fn is not None else register

    def add(self, name: str, fn: Callable[..., Any], *,
            setup: Callable[..., Any] | None = None) -> None:
        """Register ``fn`` under the label ``name``."""
        if any(case.label == name for case in self.cases):
            raise ValueError(f"A case labelled {name!r} is already registered: pick another name.")
        self.cases.append(_Case(name, fn, setup))

    def setup(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Register a function run once before each case, outside the timed part."""
        self._setup = fn
        return fn

    def run(self, **kwargs: Any) -> pd.DataFrame:
        """Time every case; return a DataFrame with ``case, runs, min_s, median_s, p95_s,
        stdev_s, ratio`` (seconds per call)."""
        if not self.cases:
            raise ValueError("No cases registered: decorate functions with @bench.case first.")
        timings = []
        for case in self.cases:
            if self._setup is not None:
                self._setup(**kwargs)
            samples = _sample(case.fn, kwargs, repeat=self.repeat, warmup=self.warmup,
                              number=self.number, setup=case.setup)
            self.samples[case.label] = samples
            timings.append(Timing.from_samples(case.label, samples))
        return timings_table(timings)


def timings_table(timings: list[Timing]) -> pd.DataFrame:
    """One row per :class:`Timing`, with ``ratio`` = median / fastest median."""
    df = pd.DataFrame([t.as_row() for t in timings],
                      columns=["case", "runs", "min_s", "median_s", "p95_s", "stdev_s"])
    fastest = df["median_s"].min()
    df["ratio"] = df["median_s"] / fastest if fastest > 0 else float("nan")
    return df


