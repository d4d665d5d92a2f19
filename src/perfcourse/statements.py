"""What reaches the database: statement counting and a slow-query log, on SQLAlchemy's events.

>>> with count_queries(engine) as q:
...     ...
>>> q.count
"""


from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .units import format_duration

__all__ = [
    "count_queries",
    "QueryCounter",
    "slow_query_log",
    "SlowQueryLog",
    "StatementRecord",
]

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


