"""Measure before you optimise: timing, query counting, query plans and memory.

Timing, in the spirit of SQLAlchemy's ``examples/performance`` registry, with repeats and robust
statistics (median, p95, spread) instead of one run:

>>> bench = Benchmark(repeat=5, warmup=1)
>>> @bench.case
... def lazy(n):
...     '''Lazy loading (N+1)'''
...     ...
>>> df = bench.run(n=100)            # one row per case, in registration order
>>> format_table(df)                 # the same table with "1.23 ms" and "12.3x" for notebooks

Queries and plans:

>>> with count_queries(engine) as q:
...     ...
>>> q.count
>>> explain(engine, select(User).where(User.email == "a@example.com")).verdict
'full scan'

Memory: :func:`track_memory` (Python allocations, tracemalloc), :func:`process_rss` and
:func:`rss_during` (what the operating system sees).

Every number these helpers *display* carries a unit (``850 µs``, ``12.3 MB``, ``5.3x``): the
notebooks' output checks mask exactly such numbers, so a displayed figure without a unit would
make a notebook fail on the next run.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import json
import logging
import math
import re
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

__all__ = [
    "Benchmark",
    "Timing",
    "time_call",
    "format_duration",
    "format_bytes",
    "format_ratio",
    "format_table",
    "time_unit",
    "count_queries",
    "QueryCounter",
    "StatementRecord",
    "slow_query_log",
    "SlowQueryLog",
    "explain",
    "Plan",
    "TableAccess",
    "track_memory",
    "MemoryUsage",
    "process_rss",
    "rss_during",
    "RssUsage",
]

# ---------------------------------------------------------------------------------------------
# Formatting: every displayed number carries a unit
# ---------------------------------------------------------------------------------------------

#: (unit name, seconds per unit), smallest first.
TIME_UNITS = (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0))


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit in which ``seconds`` reads best: ``("ms", 1e-3)`` for 0.0123.

    Used to scale a whole column or axis at once (:mod:`perfcourse.plots`).
    """
    seconds = abs(seconds)
    for name, size in reversed(TIME_UNITS):
        if seconds >= size:
            return name, size
    return TIME_UNITS[0]


def _three_digits(value: float) -> str:
    # 3 significant digits, no exponent: 1.23, 12.3, 123
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_duration(seconds: float) -> str:
    """A duration with a unit and 3 significant digits: ``"850 µs"``, ``"1.23 ms"``, ``"2.10 s"``.

    Durations of a minute or more read ``"2.5 min"``; ``None``/NaN read ``"n/a"``.
    """
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "n/a"
    sign = "-" if seconds < 0 else ""
    seconds = abs(float(seconds))
    if seconds >= 60:
        return f"{sign}{seconds / 60:.1f} min"
    if seconds == 0:
        return "0 s"
    name, size = time_unit(seconds)
    value = seconds / size
    if round(value, 2 if value < 10 else 1 if value < 100 else 0) >= 1000 and name != "s":
        # 999.7 µs rounds to "1000 µs": show the next unit instead
        name, size = TIME_UNITS[[u for u, _ in TIME_UNITS].index(name) + 1]
        value = seconds / size
    return f"{sign}{_three_digits(value)} {name}"


#: Decimal (SI) units, as disk and network vendors use them: 1 KB = 1000 bytes.
BYTE_UNITS = (("B", 1), ("KB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12))


def format_bytes(n: float) -> str:
    """A size in decimal units with one decimal: ``"512 B"``, ``"12.3 KB"``, ``"1.5 GB"``.

    The course uses SI units throughout (1 KB = 1000 bytes, 1 MB = 10^6 bytes).
    """
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    if n < 1000:
        return f"{sign}{n:.0f} B"
    for name, size in BYTE_UNITS[1:]:
        if round(n / size, 1) < 1000 or name == BYTE_UNITS[-1][0]:
            return f"{sign}{n / size:.1f} {name}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_ratio(x: float) -> str:
    """A ratio with one decimal and an ``x``: ``"12.3x"`` (how many times slower or bigger)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.1f}x"


def format_rate(per_second: float, unit: str = "req/s") -> str:
    """``1234.5`` -> ``"1,234 req/s"``: a throughput, in the form the nbval sanitizer masks."""
    return f"{per_second:,.0f} {unit}"


def format_table(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of a results table with every measured number as text with its unit.

    Columns ending in ``_per_s`` become rates (``"1,234 req/s"``), in ``_s`` durations
    (``"1.23 ms"``), in ``_bytes`` sizes (``"12.3 MB"``), ``ratio`` becomes ``"12.3x"``; the suffix
    is dropped from the column name since the unit is now in the value (``median_s`` ->
    ``median``, ``throughput_per_s`` -> ``throughput``). Other columns are kept.
    Show this in notebooks, never the raw floats: their digits change on every run.
    """
    out = df.copy()
    renames = {}
    for column in out.columns:
        name = str(column)
        if name.endswith("_per_s"):
            out[column] = out[column].map(format_rate)
            renames[column] = name[: -len("_per_s")]
        elif name.endswith("_s"):
            out[column] = out[column].map(format_duration)
            renames[column] = name[:-2]
        elif name.endswith("_bytes"):
            out[column] = out[column].map(format_bytes)
            renames[column] = name[: -len("_bytes")]
        elif name == "ratio" or name.endswith("_ratio"):
            out[column] = out[column].map(format_ratio)
    return out.rename(columns=renames)


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
            p95_s=_percentile(ordered, 95),
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


def _percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted list."""
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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


# ---------------------------------------------------------------------------------------------
# Statement events: one listener machinery for counting and for the slow-query log
# ---------------------------------------------------------------------------------------------


@dataclass
class StatementRecord:
    """One statement sent to the database (an ``executemany`` counts as one)."""

    sql: str
    parameters: Any
    duration_s: float | None = None  # None while running, or when it failed
    executemany: bool = False
    error: str | None = None

    @property
    def kind(self) -> str:
        """The statement's first keyword, upper-case: ``SELECT``, ``INSERT``, ``PRAGMA``...

        A statement opening with common table expressions (``WITH ... SELECT``) is named by
        what it does: a write when it inserts, updates or deletes, else ``SELECT``.
        """
        match = re.match(r"\s*(?:/\*.*?\*/\s*)*(\w+)", self.sql, re.S)
        first = match.group(1).upper() if match else ""
        if first == "WITH":
            write = re.search(r"\b(INSERT|UPDATE|DELETE)\b", self.sql, re.I)
            return write.group(1).upper() if write else "SELECT"
        return first


class _StatementWatcher:
    """Listens to one engine's cursor executions; subclasses decide what to do with each.

    Works for Core connections and ORM sessions bound to the engine alike; statements on other
    engines are never seen. Listeners are removed on :meth:`stop` (or leaving the ``with``).
    """

    def __init__(self, engine: Engine | Connection) -> None:
        if isinstance(engine, Connection):
            engine = engine.engine
        if not isinstance(engine, Engine):
            raise TypeError(
                f"Expected a SQLAlchemy Engine, got {type(engine).__name__}: pass the engine "
                "your session or connection uses (session.get_bind())."
            )
        self.engine = engine
        self._key = f"perfcourse_watch_{id(self)}"
        self._active = False

    # event handlers -----------------------------------------------------------------------
    def _before(self, conn, cursor, statement, parameters, context, executemany):
        record = StatementRecord(statement, parameters, executemany=executemany)
        conn.info.setdefault(self._key, []).append((record, time.perf_counter()))
        self._started(record)

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        stack = conn.info.get(self._key)
        if stack:
            record, start = stack.pop()
            record.duration_s = time.perf_counter() - start
            self._finished(record)

    def _error(self, context):
        stack = context.connection.info.get(self._key) if context.connection else None
        if stack:
            record, start = stack.pop()
            record.duration_s = time.perf_counter() - start
            record.error = type(context.original_exception).__name__
            self._finished(record)

    # hooks ----------------------------------------------------------------------------------
    def _started(self, record: StatementRecord) -> None:
        pass

    def _finished(self, record: StatementRecord) -> None:
        pass

    # lifecycle --------------------------------------------------------------------------
    def start(self):
        """Start listening (idempotent)."""
        if not self._active:
            sa.event.listen(self.engine, "before_cursor_execute", self._before)
            sa.event.listen(self.engine, "after_cursor_execute", self._after)
            sa.event.listen(self.engine, "handle_error", self._error)
            self._active = True
        return self

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self._active:
            sa.event.remove(self.engine, "before_cursor_execute", self._before)
            sa.event.remove(self.engine, "after_cursor_execute", self._after)
            sa.event.remove(self.engine, "handle_error", self._error)
            self._active = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


class QueryCounter(_StatementWatcher):
    """Every statement executed on an engine while active. Made by :func:`count_queries`."""

    def __init__(self, engine: Engine | Connection) -> None:
        super().__init__(engine)
        self.statements: list[StatementRecord] = []

    def _started(self, record: StatementRecord) -> None:
        self.statements.append(record)

    @property
    def count(self) -> int:
        """How many statements were sent (round trips to the database)."""
        return len(self.statements)

    @property
    def select_count(self) -> int:
        """How many of them were SELECTs."""
        return sum(1 for record in self.statements if record.kind == "SELECT")

    @property
    def total_s(self) -> float:
        """Time spent inside the driver's execute calls, in seconds."""
        return sum(record.duration_s or 0.0 for record in self.statements)

    def df(self) -> pd.DataFrame:
        """One row per statement: ``kind, sql, parameters, duration_s``."""
        return pd.DataFrame(
            [
                {"kind": r.kind, "sql": r.sql, "parameters": r.parameters,
                 "duration_s": r.duration_s}
                for r in self.statements
            ],
            columns=["kind", "sql", "parameters", "duration_s"],
        )

    def reset(self) -> None:
        """Forget the statements recorded so far."""
        self.statements.clear()

    def __repr__(self) -> str:
        return f"<QueryCounter: {self.count} statements in {format_duration(self.total_s)}>"


def count_queries(engine: Engine | Connection) -> QueryCounter:
    """Count the statements executed on ``engine`` inside a ``with`` block.

    >>> with count_queries(engine) as q:
    ...     users = session.scalars(select(User)).all()
    ...     orders = [u.orders for u in users]       # lazy loads
    >>> q.count                                     # 1 + len(users): the N+1 problem

    Counts what reaches the driver: one per ``cursor.execute``/``executemany`` (so a bulk
    insert of many rows in one executemany counts once). Sessions bound to the engine are
    counted too; other engines are not. The result also has ``.statements``, ``.total_s``,
    ``.select_count`` and ``.df()``.
    """
    return QueryCounter(engine)


logger = logging.getLogger("perfcourse.slow_queries")


class SlowQueryLog(_StatementWatcher):
    """Logs statements slower than a threshold. Made by :func:`slow_query_log`."""

    def __init__(self, engine: Engine | Connection, threshold_s: float,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(engine)
        self.threshold_s = threshold_s
        self.logger = logger or globals()["logger"]
        self.slow: list[StatementRecord] = []

    def _finished(self, record: StatementRecord) -> None:
        if record.duration_s is not None and record.duration_s >= self.threshold_s:
            self.slow.append(record)
            sql = " ".join(record.sql.split())
            params = repr(record.parameters)
            if len(params) > 200:
                params = params[:200] + "..."
            self.logger.warning("slow query (%s): %s | parameters: %s",
                                format_duration(record.duration_s), sql, params)

    def df(self) -> pd.DataFrame:
        """The slow statements seen so far: ``kind, sql, parameters, duration_s``."""
        return pd.DataFrame(
            [{"kind": r.kind, "sql": r.sql, "parameters": r.parameters,
              "duration_s": r.duration_s} for r in self.slow],
            columns=["kind", "sql", "parameters", "duration_s"],
        )

    def __repr__(self) -> str:
        return (f"<SlowQueryLog: {len(self.slow)} statements slower than "
                f"{format_duration(self.threshold_s)}>")


def slow_query_log(engine: Engine | Connection, threshold_s: float = 0.1,
                   logger: logging.Logger | None = None) -> SlowQueryLog:
    """Log every statement on ``engine`` taking ``threshold_s`` seconds or more.

    Use as ``with slow_query_log(engine, 0.05) as log:`` or keep it on with ``.start()`` and
    ``.stop()``. Each slow statement is logged at WARNING level on ``logger`` (default
    ``perfcourse.slow_queries``) with its duration, SQL and parameters, and kept in ``.slow``.
    """
    return SlowQueryLog(engine, threshold_s, logger)


# ---------------------------------------------------------------------------------------------
# EXPLAIN
# ---------------------------------------------------------------------------------------------


class _Explain(Executable, ClauseElement):
    """``EXPLAIN <statement>`` as a construct, so bound parameters are handled by SQLAlchemy."""

    inherit_cache = False

    def __init__(self, statement: ClauseElement, prefix: str) -> None:
        self.statement = statement
        self.prefix = prefix


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler, **kw) -> str:
    return f"{element.prefix} {compiler.process(element.statement, **kw)}"


#: Verdicts from worst to best. ``full index scan`` walks a whole index without a search
#: condition (e.g. for ORDER BY); ``covering index search`` is PostgreSQL's index-only scan.
VERDICTS = ("full scan", "full index scan", "index search", "covering index search")


@dataclass(frozen=True)
class TableAccess:
    """How one table is read in a plan (SQLite names it by its alias when it has one)."""

    table: str
    verdict: str
    index: str | None = None


@dataclass
class Plan:
    """A query plan and what it means. Made by :func:`explain`.

    ``verdict`` is the worst access of the plan, in :data:`VERDICTS` vocabulary: ``"full scan"``,
    ``"full index scan"``, ``"index search"`` or ``"covering index search"`` (PostgreSQL's
    index-only scan, SQLite's covering index); ``accesses`` says it per table.
    """

    backend: str
    sql: str
    plan_text: list[str]
    accesses: list[TableAccess]
    analyze: bool = False
    actual_time_s: float | None = None
    planning_time_s: float | None = None
    raw: Any = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        if not self.accesses:
            return "no table access"
        return min((a.verdict for a in self.accesses), key=VERDICTS.index)

    @property
    def index(self) -> str | None:
        """The (first) index the plan uses, or None."""
        indexes = self.indexes
        return indexes[0] if indexes else None

    @property
    def indexes(self) -> list[str]:
        return [a.index for a in self.accesses if a.index]

    @property
    def uses_index(self) -> bool:
        return bool(self.indexes)

    @property
    def scanned_tables(self) -> list[str]:
        """Tables read in full, row by row."""
        return [a.table for a in self.accesses if a.verdict == "full scan"]

    def summary(self) -> str:
        text = f"{self.verdict}" + (f" using {self.index}" if self.index else "")
        if self.scanned_tables:
            text += f" (scans {', '.join(self.scanned_tables)})"
        if self.actual_time_s is not None:
            text += f"; actual time {format_duration(self.actual_time_s)}"
        return text

    def __str__(self) -> str:
        return "\n".join([f"Plan ({self.backend}): {self.summary()}",
                          *("  " + line for line in self.plan_text)])

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        body = html.escape("\n".join(self.plan_text))
        return (f"<div><b>{html.escape(self.backend)}: {html.escape(self.summary())}</b>"
                f"<pre>{body}</pre></div>")


_SQLITE_ACCESS = re.compile(
    r"^(?P<op>SCAN|SEARCH) (?:TABLE )?(?P<table>[^\s(][^\s]*)(?: AS (?P<alias>\S+))?"
    r"(?: USING (?P<using>.*?))?(?: \((?P<cond>.*)\))?$"
)


def _sqlite_access(detail: str) -> TableAccess | None:
    match = _SQLITE_ACCESS.match(detail.strip())
    if not match or match["table"] in ("CONSTANT", "SUBQUERY"):
        return None
    table, using, op = match["table"], match["using"] or "", match["op"]
    if not using or using.startswith("AUTOMATIC"):
        # an automatic index is built by scanning the whole table first, on every query
        return TableAccess(table, "full scan")
    index_match = re.search(r"INDEX (\S+)", using)
    if "PRIMARY KEY" in using and not index_match:
        index = "PRIMARY KEY"
    else:
        index = index_match.group(1) if index_match else using
    if op == "SCAN":
        return TableAccess(table, "full index scan", index)
    verdict = "covering index search" if "COVERING" in using else "index search"
    return TableAccess(table, verdict, index)


def _postgres_accesses(node: dict, out: list[TableAccess]) -> None:
    kind = node.get("Node Type", "")
    table = node.get("Relation Name")
    if kind == "Seq Scan":
        out.append(TableAccess(table, "full scan"))
    elif kind in ("Index Scan", "Index Only Scan"):
        if "Index Cond" not in node:
            verdict = "full index scan"
        else:
            verdict = "covering index search" if kind == "Index Only Scan" else "index search"
        out.append(TableAccess(table, verdict, node.get("Index Name")))
    elif kind == "Bitmap Heap Scan":
        indexes: list[str] = []
        _bitmap_indexes(node, indexes)
        out.append(TableAccess(table, "index search", ",".join(indexes) or None))
        return  # children are the bitmap index scans, already accounted for
    for child in node.get("Plans", []):
        _postgres_accesses(child, out)


def _bitmap_indexes(node: dict, out: list[str]) -> None:
    if node.get("Node Type") == "Bitmap Index Scan":
        out.append(node.get("Index Name"))
    for child in node.get("Plans", []):
        _bitmap_indexes(child, out)


def explain(
    bind: Engine | Connection,
    statement: Any,
    params: dict[str, Any] | None = None,
    *,
    analyze: bool = False,
    costs: bool = True,
) -> Plan:
    """The query plan of ``statement`` on SQLite or PostgreSQL, with a verdict.

    ``statement`` is a SQLAlchemy ``select()`` (ORM or Core) or a SQL string (with ``:name``
    parameters given in ``params``). On SQLite this is ``EXPLAIN QUERY PLAN``; on PostgreSQL
    ``EXPLAIN`` (``EXPLAIN (ANALYZE, BUFFERS)`` with ``analyze=True``: the statement really runs,
    inside a transaction that is rolled back). The verdict is read from PostgreSQL's
    ``FORMAT JSON`` plan, the text shown is PostgreSQL's own text plan. SQLite has no EXPLAIN
    ANALYZE: with ``analyze=True`` the statement is run and timed once. ``costs=False`` hides
    PostgreSQL's cost estimates (stable output for notebooks); ANALYZE's per-node actual times
    have no unit, so mark cells showing them ``# NBVAL_IGNORE_OUTPUT``.

    Pass a Connection instead of an Engine to explain under session settings you made on it
    (``SET enable_seqscan = off``).
    """
    if isinstance(statement, str):
        statement = sa.text(statement)
    params = params or {}
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            try:
                return _explain_on(conn, statement, params, analyze, costs)
            finally:
                conn.rollback()
    return _explain_on(bind, statement, params, analyze, costs)


_PLAN_IDS = itertools.count()


def _explain_on(conn: Connection, statement, params, analyze: bool, costs: bool) -> Plan:
    dialect = conn.dialect.name
    sql = str(statement.compile(dialect=conn.dialect))
    if dialect == "sqlite":
        # Python's sqlite3 caches prepared statements by their text, and a cached EXPLAIN keeps
        # the plan of the schema it was prepared on: a unique comment forces a fresh plan.
        fresh = f"EXPLAIN QUERY PLAN /* perfcourse plan {next(_PLAN_IDS)} */"
        rows = conn.execute(_Explain(statement, fresh), params).all()
        depth: dict[int, int] = {0: -1}
        lines, accesses = [], []
        for node_id, parent, _unused, detail in rows:
            depth[node_id] = depth.get(parent, -1) + 1
            lines.append("  " * depth[node_id] + detail)
            access = _sqlite_access(detail)
            if access:
                accesses.append(access)
        actual = None
        if analyze:
            start = time.perf_counter()
            conn.execute(statement, params).fetchall()
            actual = time.perf_counter() - start
        return Plan("sqlite", sql, lines, accesses, analyze, actual, raw=rows)
    if dialect == "postgresql":
        # the JSON plan (planning only: cheap, never runs the statement) gives the verdict
        raw = conn.execute(_Explain(statement, "EXPLAIN (FORMAT JSON)"), params).scalar_one()
        if isinstance(raw, str):
            raw = json.loads(raw)
        accesses: list[TableAccess] = []
        _postgres_accesses(raw[0]["Plan"], accesses)
        options = ["ANALYZE", "BUFFERS"] if analyze else []
        if not costs:
            options.append("COSTS OFF")
        prefix = f"EXPLAIN ({', '.join(options)})" if options else "EXPLAIN"
        if analyze:
            conn.exec_driver_sql("SAVEPOINT perfcourse_explain")
        lines = [row[0] for row in conn.execute(_Explain(statement, prefix), params)]
        if analyze:
            conn.exec_driver_sql("ROLLBACK TO SAVEPOINT perfcourse_explain")
        actual = planning = None
        for line in lines:
            if match := re.match(r"\s*Execution Time: ([\d.]+) ms", line):
                actual = float(match.group(1)) / 1000
            elif match := re.match(r"\s*Planning Time: ([\d.]+) ms", line):
                planning = float(match.group(1)) / 1000
        return Plan("postgres", sql, lines, accesses, analyze, actual, planning, raw=raw)
    raise ValueError(f"explain() knows SQLite and PostgreSQL, not {dialect!r}.")


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
    import psutil  # noqa: PLC0415

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
    from memory_profiler import memory_usage  # noqa: PLC0415

    before = process_rss()
    peak_mib, result = memory_usage(
        (fn, args, kwargs), interval=interval, max_usage=True, retval=True, include_children=False
    )
    if isinstance(peak_mib, list | tuple):  # older memory_profiler versions return a list
        peak_mib = max(peak_mib)
    peak = max(int(peak_mib * 1024 * 1024), before)
    return RssUsage(before_bytes=before, peak_bytes=peak, result=result)
