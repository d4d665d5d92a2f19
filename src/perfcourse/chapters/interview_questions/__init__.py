"""Chapter 10, the ten interview questions: the lesson's harness (this module) and the capstone
lab's app (:mod:`.capstone`).

The lesson re-measures, in miniature, one figure per interview question. What it needs besides
the platform lives here:

* :class:`Tracer` records nested spans (name, start, end, parent) of a request, the way an APM
  or OpenTelemetry does; :meth:`Tracer.table` lists them with their durations.
* :func:`latency_engine` is an engine on the course's SQLite dataset whose every statement
  first waits ``delay_s``: a database "1 ms away" without a network (what
  :mod:`perfcourse.proxy` does for PostgreSQL and Redis, on SQLite).
* :func:`zipf_keys` draws a skewed workload (a few keys asked for often, most rarely).
* :func:`throughput_by_workers` runs one piece of work under :func:`perfcourse.load.run_load`
  at several concurrencies and tabulates throughput and latency percentiles.
"""

from __future__ import annotations

import random
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import accumulate

import pandas as pd
from sqlalchemy import event
from sqlalchemy.engine import Engine

from perfcourse.db import engine as course_engine
from perfcourse.load import run_load
from perfcourse.stats import percentiles

__all__ = ["latency_engine", "throughput_by_workers", "Tracer", "zipf_keys"]


class Tracer:
    """Record the spans of one request: ``with tracer.span("render"): ...``, nested freely.

    Each span is a dict ``{"id", "parent", "name", "start", "end"}`` (seconds of
    ``time.perf_counter``; ``parent`` is the id of the enclosing span, None for the root), the
    shape tracing systems export. ``clock`` can be replaced (tests use a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.spans: list[dict] = []
        self._open: list[str] = []
        self._lock = threading.Lock()

    @contextmanager
    def span(self, name: str) -> Iterator[dict]:
        """Time the block as a span called ``name``, child of the span open around it."""
        if not isinstance(name, str) or not name:
            raise TypeError("A span needs a name (a non-empty str), e.g. tracer.span(\"render\").")
        with self._lock:
            record = {"id": f"s{len(self.spans) + 1}", "parent": self._open[-1] if self._open else None,
                      "name": name, "start": self.clock(), "end": None}
            self.spans.append(record)
            self._open.append(record["id"])
        try:
            yield record
        finally:
            record["end"] = self.clock()
            self._open.pop()

    def table(self) -> pd.DataFrame:
        """One row per span, in start order: its name, parent's name and duration (``duration_s``,
        the whole time between its start and end, children included)."""
        names = {s["id"]: s["name"] for s in self.spans}
        rows = [{"span": s["name"], "parent": names.get(s["parent"], ""),
                 "duration_s": (s["end"] if s["end"] is not None else self.clock()) - s["start"]}
                for s in self.spans]
        return pd.DataFrame(rows, columns=["span", "parent", "duration_s"])


def latency_engine(delay_s: float = 0.001, *, scale: str | None = None) -> Engine:
    """A new engine on the course's SQLite dataset whose every statement waits ``delay_s`` first.

    The wait is a ``time.sleep`` in a ``before_cursor_execute`` event: it models the network
    round trip each statement pays when the database is on another machine (it releases the
    GIL, as waiting on a socket does). The course's shared engine is not affected; dispose the
    returned one when done.
    """
    if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or not 0 <= delay_s <= 1:
        raise ValueError(f"delay_s must be a number of seconds between 0 and 1, not {delay_s!r}.")
    eng = course_engine("sqlite", scale=scale)

    @event.listens_for(eng, "before_cursor_execute")
    def _round_trip(conn, cursor, statement, parameters, context, executemany):
        time.sleep(delay_s)

    return eng


def zipf_keys(requests: int, keys: int, *, exponent: float = 1.0, seed: int = 10) -> list[int]:
    """``requests`` keys in ``1..keys`` drawn with probability ~ 1/rank**exponent (a Zipf law).

    Key 1 is the most popular: with ``exponent=1`` and 1,000 keys, the top 10 take about 40% of
    the requests. Deterministic for a ``seed``.
    """
    for name, value in (("requests", requests), ("keys", keys)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "requests" else 1):
            raise ValueError(f"{name} must be a positive int, not {value!r}.")
    weights = list(accumulate(1 / rank**exponent for rank in range(1, keys + 1)))
    rng = random.Random(seed)
    total = weights[-1]
    return [min(bisect_left(weights, rng.random() * total), keys - 1) + 1 for _ in range(requests)]


def throughput_by_workers(work: Callable[[int], object], workers: Sequence[int], *,
                          requests: int) -> pd.DataFrame:
    """Run ``work(i)`` ``requests`` times at each concurrency of ``workers`` (threads, closed loop).

    One row per concurrency: ``workers``, ``requests``, ``elapsed_s``, ``throughput`` (requests
    per second) and the ``p50_s``/``p95_s`` of the requests' latencies.
    """
    if not callable(work):
        raise TypeError(f"work must be a function of the request number, not {type(work).__name__}.")
    rows = []
    for n in workers:
        run = run_load(work, workers=int(n), requests=requests, sample_every_s=None)
        latencies = run.log["duration_s"].tolist()
        p50, p95 = percentiles(latencies, [50, 95])
        rows.append({"workers": int(n), "requests": len(latencies), "elapsed_s": run.elapsed_s,
                     "throughput": len(latencies) / run.elapsed_s, "p50_s": p50, "p95_s": p95})
    return pd.DataFrame(rows)
