"""Query plans on SQLite and PostgreSQL, read into one verdict per table access.

>>> explain(engine, select(User).where(User.email == "a@example.com")).verdict
'full scan'
"""


from __future__ import annotations

import html
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from .units import format_duration

__all__ = [
    "VERDICTS",
    "explain",
    "Plan",
    "TableAccess",
]

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
    have no unit, so tag cells showing them ``nbval-ignore-output``.

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


