"""Chapter 04, memory and CPU: the code the notebook profiles, measures and grades against.

Memory: loading strategies
    :func:`load_orders` walks every order with one of :data:`LOAD_STRATEGIES` (ORM ``all()``,
    ``yield_per`` as Rails' ``find_each``, keyset batches as ``find_in_batches``, Core rows,
    ``select(Order.id)`` as ``pluck``); :func:`compare_loading` measures rows, queries and
    the tracemalloc peak of each; :func:`compare_streaming_rss` does the same on PostgreSQL with
    the process RSS, where a client-side cursor's buffer is invisible to tracemalloc.
    :func:`report_loading_everything` and :func:`report_streaming` are small functions written to
    be read line by line by memory-profiler (``%mprun`` needs code in a file);
    :func:`line_memory_profile` gives the same report as text.

Memory: CSV out and in
    :class:`CountingSink` is a write-only text sink that keeps nothing (like a socket or an HTTP
    response); :func:`compare_csv_export` runs exports written in the notebook into it under
    tracemalloc; :func:`import_orders_csv_all` and :func:`import_orders_csv_chunked` read a CSV
    back into :data:`IMPORT_TABLE` with ``executemany``.

Memory: garbage collection
    :func:`gc_myth` (``gc.collect()`` cannot free a list you still reference) and
    :func:`reference_cycle_demo` (what only the cycle collector frees).

CPU
    :func:`slow_product_report` (the function profiled with pyinstrument) and
    :func:`fast_product_report`; users with more than ``k`` orders three ways
    (:func:`more_than_nested`, :func:`more_than_counter`, :func:`more_than_sql`,
    :func:`heavy_users_grid`); the same GROUP BY on SQLite and on DuckDB over Parquet (:func:`category_sales_sqlite`,
    :func:`category_sales_duckdb`); memoising with :func:`functools.lru_cache`
    (:func:`cached_category_revenue`, :func:`call_sequence`, :func:`memo_table`).
"""

from __future__ import annotations

import csv
import gc
import io
import multiprocessing
import random
import threading
import time
import tracemalloc
import weakref
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import psutil
import sqlalchemy as sa
from memory_profiler import LineProfiler, show_results
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .. import db
from ..memory import track_memory
from ..models import Order, OrderItem, Product
from ..statements import count_queries
from ..timing import time_call

__all__ = [
    "CATEGORY_SALES_SQL",
    "IMPORT_TABLE",
    "LOAD_STRATEGIES",
    "ORDER_CSV_COLUMNS",
    "ORDERS",
    "cached_category_revenue",
    "call_sequence",
    "category_revenue",
    "category_sales_duckdb",
    "category_sales_sqlite",
    "compare_csv_export",
    "compare_csv_import",
    "compare_loading",
    "compare_streaming_rss",
    "comparisons",
    "CountingSink",
    "each_order",
    "fast_product_report",
    "gc_myth",
    "heavy_users_grid",
    "import_orders_csv_all",
    "import_orders_csv_chunked",
    "line_memory_profile",
    "load_orders",
    "lru_misses",
    "memo_table",
    "more_than_counter",
    "more_than_nested",
    "more_than_sql",
    "more_than_statement",
    "Node",
    "order_user_ids",
    "orders_in_batches",
    "reference_cycle_demo",
    "report_loading_everything",
    "report_streaming",
    "reset_import_table",
    "same_sales",
    "slow_product_report",
]

# ---------------------------------------------------------------------------------------------
# Loading strategies
# ---------------------------------------------------------------------------------------------

#: Strategy -> the Rails idiom it stands for.
LOAD_STRATEGIES = {
    "ORM all()": "User.all.each",
    "ORM yield_per": "find_each",
    "keyset batches": "find_in_batches",
    "rows all()": "select_all / pluck of every column",
    "rows iterated": "(a cursor, row by row)",
    "ids only": "pluck(:id)",
}

ORDERS = Order.__table__


def _up_to(statement, column, up_to: int | None):
    """``statement`` restricted to rows whose ``column`` (an id) is at most ``up_to``."""
    return statement if up_to is None else statement.where(column <= up_to)


def orders_in_batches(session: Session, batch: int = 1000,
                      up_to: int | None = None) -> Iterator[list[Order]]:
    """Orders in lists of ``batch``, by id: a keyset query per batch (Rails' ``find_in_batches``).

    Each batch is one ``SELECT ... WHERE id > :last ORDER BY id LIMIT :batch``; the session is
    emptied between batches so the objects of a finished batch can be freed.
    """
    last = 0
    while True:
        rows = session.scalars(
            _up_to(select(Order).where(Order.id > last), Order.id, up_to)
            .order_by(Order.id).limit(batch)
        ).all()
        if not rows:
            return
        yield rows
        last = rows[-1].id
        session.expunge_all()


def each_order(session: Session, batch: int = 1000, up_to: int | None = None) -> Iterator[Order]:
    """Every order, one at a time, ``batch`` rows per fetch (Rails' ``find_each``): ``yield_per``."""
    yield from session.scalars(
        _up_to(select(Order), Order.id, up_to).order_by(Order.id)
        .execution_options(yield_per=batch)
    )


def load_orders(engine: Engine, strategy: str, batch: int = 1000,
                up_to: int | None = None) -> tuple[int, int]:
    """Walk every order (or those with an id up to ``up_to``) with ``strategy`` (a key of
    :data:`LOAD_STRATEGIES`).

    Returns ``(rows, checksum)``: the number of orders seen and the sum of their user ids, the
    same for every strategy (a strategy that skipped rows would show).
    """
    if strategy == "ORM all()":
        with Session(engine) as session:
            orders = session.scalars(_up_to(select(Order), Order.id, up_to)
                                     .order_by(Order.id)).all()
            return len(orders), sum(o.user_id for o in orders)
    if strategy == "ORM yield_per":
        with Session(engine) as session:
            rows = checksum = 0
            for order in each_order(session, batch, up_to):
                rows += 1
                checksum += order.user_id
            return rows, checksum
    if strategy == "keyset batches":
        with Session(engine) as session:
            rows = checksum = 0
            for orders in orders_in_batches(session, batch, up_to):
                rows += len(orders)
                checksum += sum(o.user_id for o in orders)
            return rows, checksum
    if strategy == "rows all()":
        with engine.connect() as conn:
            result = conn.execute(_up_to(select(ORDERS), ORDERS.c.id, up_to)
                                  .order_by(ORDERS.c.id)).all()
            return len(result), sum(r.user_id for r in result)
    if strategy == "rows iterated":
        with engine.connect() as conn:
            rows = checksum = 0
            result = conn.execute(
                _up_to(select(ORDERS), ORDERS.c.id, up_to).order_by(ORDERS.c.id)
                .execution_options(yield_per=batch))
            for part in result.partitions():
                rows += len(part)
                checksum += sum(row.user_id for row in part)
            return rows, checksum
    if strategy == "ids only":
        with Session(engine) as session:
            ids = session.scalars(_up_to(select(Order.id), Order.id, up_to)).all()
            user_ids = session.scalars(_up_to(select(Order.user_id), Order.id, up_to)).all()
            return len(ids), sum(user_ids)
    raise ValueError(f"Unknown strategy {strategy!r}: use one of {', '.join(LOAD_STRATEGIES)}.")


def compare_loading(engine: Engine, strategies: Iterable[str] = tuple(LOAD_STRATEGIES),
                    batch: int = 1000, up_to: int | None = None) -> pd.DataFrame:
    """One row per strategy: ``strategy, rails, rows, checksum, queries, peak_bytes``.

    Each strategy runs once under :func:`~perfcourse.memory.track_memory` (the peak of Python
    allocations) while queries are counted; ``gc.collect()`` runs before each, so garbage of the
    previous case is not counted. No time column: tracing slows code several times, so time
    measured here would mislead; time strategies separately, untraced.
    """
    out = []
    for strategy in strategies:
        gc.collect()
        with count_queries(engine) as queries, track_memory() as memory:
            rows, checksum = load_orders(engine, strategy, batch, up_to)
        out.append({"strategy": strategy, "rails": LOAD_STRATEGIES[strategy], "rows": rows,
                    "checksum": checksum, "queries": queries.count,
                    "peak_bytes": memory.peak_bytes})
    return pd.DataFrame(out)


def _sum_quantities(engine: Engine, stream: bool, up_to: int | None = None) -> int:
    table = OrderItem.__table__
    statement = _up_to(select(table.c.id, table.c.quantity, table.c.unit_price), table.c.id,
                       up_to).order_by(table.c.id)
    if stream:
        statement = statement.execution_options(stream_results=True, max_row_buffer=1000)
    with engine.connect() as conn:
        return sum(row.quantity for row in conn.execute(statement))


def _peak_rss_increase(fn: Callable[..., Any], *args: Any, interval: float = 0.002) -> tuple[Any, int]:
    """``(fn(*args), peak RSS during the call minus RSS before)``, sampled by a thread."""


    process = psutil.Process()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn(*args)
    finally:
        done.set()
        sampler.join()
    return result, max(peak, process.memory_info().rss) - before


def _sum_quantities_in_child(url: str, namespace: str, stream: bool,
                             up_to: int | None = None) -> tuple[int, int]:
    child_engine = db.engine("postgres" if url.startswith("postgresql") else "sqlite",
                             namespace=namespace, url=url if url.startswith("postgresql") else None)
    try:
        _sum_quantities(child_engine, stream, up_to)  # warm up: connection, imports, SQL
        return _peak_rss_increase(_sum_quantities, child_engine, stream, up_to)
    finally:
        child_engine.dispose()


def compare_streaming_rss(engine: Engine, up_to: int | None = None) -> pd.DataFrame:
    """Iterate every order item (or those with an id up to ``up_to``) with a client-side cursor
    and with a server-side one.

    One row per cursor: ``cursor, units, peak_bytes`` (tracemalloc, in this process) and
    ``rss_increase_bytes``: how far the process RSS rose above its value before the loop, measured
    in a fresh process (a long-lived one reuses memory it freed earlier, which hides growth). On
    PostgreSQL a client-side cursor receives the whole result into libpq's C memory before the
    first row is read: tracemalloc cannot see it, the RSS does. ``stream_results=True`` opens a
    server-side cursor that fetches ``max_row_buffer`` rows at a time.
    """
    if engine.url.get_backend_name() == "sqlite" and engine.url.database in (None, "", ":memory:"):
        raise ValueError("compare_streaming_rss measures in a second process, which cannot open "
                         "an in-memory SQLite database: pass a file or PostgreSQL engine.")
    url = engine.url.render_as_string(hide_password=False)
    namespace = db.namespace_of(engine)
    out = []
    for label, stream in (("client-side (default)", False), ("server-side (stream_results)", True)):
        gc.collect()
        with track_memory() as memory:
            units = _sum_quantities(engine, stream, up_to)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            _, increase = pool.submit(_sum_quantities_in_child, url, namespace, stream,
                                      up_to).result()
        out.append({"cursor": label, "units": units, "peak_bytes": memory.peak_bytes,
                    "rss_increase_bytes": increase})
    return pd.DataFrame(out)


# Two functions written for memory-profiler's line-by-line report: one statement per line, and
# no loop in their own body (the profiler measures the process at every line event).


def report_loading_everything(engine: Engine, limit: int = 20_000) -> dict[str, int]:
    """Orders per status among the first ``limit``, from Order objects all loaded at once."""
    with Session(engine) as session:
        orders = session.scalars(select(Order).order_by(Order.id).limit(limit)).all()
        statuses = Counter(map(_status_of, orders))
        del orders
    return dict(sorted(statuses.items()))


def report_streaming(engine: Engine, limit: int = 20_000) -> dict[str, int]:
    """The same counts from Order objects streamed 1000 at a time (``yield_per``)."""
    with Session(engine) as session:
        orders = session.scalars(select(Order).order_by(Order.id).limit(limit)
                                 .execution_options(yield_per=1000))
        statuses = Counter(map(_status_of, orders))
        del orders
    return dict(sorted(statuses.items()))


def _status_of(order: Order) -> str:
    return order.status


def line_memory_profile(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """memory-profiler's line-by-line report of ``fn(*args, **kwargs)``, as text.

    What ``%mprun -f fn fn(...)`` shows in a pager: the process memory after each line and the
    increment it caused, in MiB. ``fn`` must live in a file (a module), not in a notebook cell.
    """

    profiler = LineProfiler()
    profiler(fn)(*args, **kwargs)
    stream = io.StringIO()
    show_results(profiler, stream=stream)
    return stream.getvalue()


# ---------------------------------------------------------------------------------------------
# CSV out and in
# ---------------------------------------------------------------------------------------------

#: Columns of the orders CSV, in order.
ORDER_CSV_COLUMNS = ("id", "user_id", "status", "total", "created_at")


class CountingSink:
    """A write-only text sink that keeps nothing: what a socket or an HTTP response is to you.

    It counts the lines and characters written, the sum of the first field of every data line
    (the order ids) and a CRC of everything, so an export can be checked without storing it.
    Pass it where a file opened with ``open(path, "w", newline="")`` would go.
    """

    def __init__(self) -> None:
        self.lines = 0
        self.chars = 0
        self.crc = 0
        self.header: str | None = None
        self.id_sum = 0
        self._partial = ""

    def write(self, text: str) -> int:
        self.chars += len(text)
        self.crc = zlib.crc32(text.encode(), self.crc)
        if not self._partial and self.header is not None and text.count("\n") == 1 \
                and text.endswith("\n"):
            # the usual case: csv.writer writes one whole line per call
            first = text.split(",", 1)[0]
            self.id_sum += int(first) if first.isdigit() else 0
            self.lines += 1
            return len(text)
        pieces = (self._partial + text).split("\n")
        self._partial = pieces.pop()
        for line in pieces:
            line = line.rstrip("\r")
            if self.header is None:
                self.header = line
            else:
                first = line.split(",", 1)[0]
                self.id_sum += int(first) if first.isdigit() else 0
            self.lines += 1
        return len(text)

    @property
    def rows(self) -> int:
        """Data lines written (the header excluded)."""
        return max(self.lines - 1, 0)

    def __repr__(self) -> str:
        return f"<CountingSink: {self.rows:,} rows, {self.chars:,} characters>"


def compare_csv_export(engine: Engine, exports: Mapping[str, Callable[[Engine, Any], Any]]
                       ) -> pd.DataFrame:
    """Run each export ``export(engine, sink)`` of ``exports`` (label -> function) into a fresh
    :class:`CountingSink` under :func:`~perfcourse.memory.track_memory`.

    One row per export: ``method, rows, characters, same_content, peak_bytes``; ``same_content``
    says whether it wrote exactly what the first export wrote (a CRC of every character).
    """
    out = []
    for label, export in exports.items():
        sink = CountingSink()
        gc.collect()
        with track_memory() as memory:
            export(engine, sink)
        out.append({"method": label, "rows": sink.rows, "characters": sink.chars,
                    "same_content": sink.crc, "peak_bytes": memory.peak_bytes})
    df = pd.DataFrame(out)
    df["same_content"] = df.same_content == df.same_content.iloc[0]
    return df


_IMPORT_METADATA = sa.MetaData()
#: Where CSV imports go: the orders' columns, no foreign key (so rows load in any order).
IMPORT_TABLE = sa.Table(
    "orders_import", _IMPORT_METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("total", sa.Numeric(10, 2), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)


def reset_import_table(engine: Engine) -> None:
    """Create :data:`IMPORT_TABLE` empty (dropping an earlier one)."""
    IMPORT_TABLE.drop(engine, checkfirst=True)
    IMPORT_TABLE.create(engine)


def _parse_order(record: dict[str, str]) -> dict[str, Any]:
    return {"id": int(record["id"]), "user_id": int(record["user_id"]),
            "status": record["status"], "total": Decimal(record["total"]),
            "created_at": datetime.fromisoformat(record["created_at"])}


def import_orders_csv_all(engine: Engine, path: str | Path) -> int:
    """Read the whole CSV into a list, then insert it with one ``executemany``."""
    with open(path, newline="") as handle:
        records = [_parse_order(r) for r in csv.DictReader(handle)]
    with engine.begin() as conn:
        conn.execute(IMPORT_TABLE.insert(), records)
    return len(records)


def import_orders_csv_chunked(engine: Engine, path: str | Path, chunk_rows: int = 5000) -> int:
    """Read the CSV ``chunk_rows`` lines at a time; each chunk is one ``executemany``.

    One transaction for the whole file (a failure leaves nothing half-imported); memory holds
    one chunk. Rails' counterpart: ``CSV.foreach`` plus ``insert_all`` per slice.
    """
    inserted = 0
    with open(path, newline="") as handle, engine.begin() as conn:
        records = csv.DictReader(handle)
        while True:
            chunk = [_parse_order(r) for _, r in zip(range(chunk_rows), records)]
            if not chunk:
                break
            conn.execute(IMPORT_TABLE.insert(), chunk)
            inserted += len(chunk)
    return inserted


def compare_csv_import(engine: Engine, path: str | Path, chunk_rows: int = 5000) -> pd.DataFrame:
    """Both imports of ``path`` into a fresh :data:`IMPORT_TABLE` of ``engine``:
    ``method, rows, statements, rows_in_table, peak_bytes``."""
    out = []
    for label, load in (("whole file, one executemany", import_orders_csv_all),
                        (f"chunks of {chunk_rows:,}",
                         lambda e, p: import_orders_csv_chunked(e, p, chunk_rows))):
        reset_import_table(engine)
        gc.collect()
        with count_queries(engine) as statements, track_memory() as memory:
            rows = load(engine, path)
        with engine.connect() as conn:
            in_table = conn.execute(select(func.count()).select_from(IMPORT_TABLE)).scalar_one()
        inserts = sum(1 for s in statements.statements if s.kind == "INSERT")
        out.append({"method": label, "rows": rows, "insert_statements": inserts,
                    "rows_in_table": in_table, "peak_bytes": memory.peak_bytes})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# Garbage collection
# ---------------------------------------------------------------------------------------------


def _traced_now() -> int:
    return tracemalloc.get_traced_memory()[0]


def gc_myth(rows: int = 200_000) -> pd.DataFrame:
    """What ``gc.collect()`` frees while a big list is still referenced: nothing of it.

    Builds ``rows`` small tuples, then records the Python memory still allocated after each step:
    built, after ``gc.collect()``, after ``del``. Columns ``step, rows_alive, allocated_bytes``.
    """
    out = []
    with track_memory():
        start = _traced_now()
        data = [(i, f"user{i}@example.com") for i in range(rows)]
        out.append({"step": "list built", "rows_alive": len(data),
                    "allocated_bytes": _traced_now() - start})
        gc.collect()
        out.append({"step": "after gc.collect()", "rows_alive": len(data),
                    "allocated_bytes": _traced_now() - start})
        del data
        out.append({"step": "after del data", "rows_alive": 0,
                    "allocated_bytes": _traced_now() - start})
    return pd.DataFrame(out)


class Node:
    """An object that can point at another one (and be watched with a weak reference)."""

    __slots__ = ("peer", "payload", "__weakref__")

    def __init__(self, payload_bytes: int = 0) -> None:
        self.peer: Node | None = None
        self.payload = bytearray(payload_bytes)


def reference_cycle_demo() -> pd.DataFrame:
    """Two pairs of objects, one pair pointing at each other: when is each freed?

    Reference counting frees an object the moment its last reference goes; objects in a cycle
    keep each other's count above zero and wait for the cycle collector. Automatic collection
    is paused during the demo so the answer is the same on every run.
    Columns ``objects, freed_by_del, freed_by_gc_collect``.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    out = []
    try:
        for label, cyclic in (("a -> b (no cycle)", False), ("a <-> b (a cycle)", True)):
            a, b = Node(1_000_000), Node(1_000_000)
            a.peer = b
            if cyclic:
                b.peer = a
            probe = weakref.ref(a)
            del a, b
            freed_by_del = probe() is None
            gc.collect()
            out.append({"objects": label, "freed_by_del": freed_by_del,
                        "freed_by_gc_collect": probe() is None})
    finally:
        if was_enabled:
            gc.enable()
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# CPU: the report profiled with pyinstrument
# ---------------------------------------------------------------------------------------------

_ITEM_ROWS = sa.text(
    "SELECT product_id, quantity, unit_price FROM order_items ORDER BY id LIMIT :limit"
)


def _load_item_rows(engine: Engine, limit: int) -> list[tuple[int, int, Decimal]]:
    with engine.connect() as conn:
        return [(p, q, Decimal(str(u))) for p, q, u in conn.execute(_ITEM_ROWS, {"limit": limit})]


def _product_names(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(Product.id, Product.name)).all())


def _revenue_per_product(rows: Sequence[tuple[int, int, Decimal]]) -> dict[int, Decimal]:
    # For every product, a pass over every row: products x rows steps.
    products = sorted({product_id for product_id, _, _ in rows})
    return {
        product_id: sum((q * u for p, q, u in rows if p == product_id), Decimal(0))
        for product_id in products
    }


def _top(revenue: dict[int, Decimal], names: dict[int, str], top: int) -> list[tuple[str, Decimal]]:
    ranked = sorted(revenue.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [(names[product_id], amount) for product_id, amount in ranked]


def slow_product_report(engine: Engine, items: int = 3000, top: int = 5) -> list[tuple[str, Decimal]]:
    """The ``top`` products by revenue over the first ``items`` order items. Correct and slow:
    profile it."""
    rows = _load_item_rows(engine, items)
    names = _product_names(engine)
    return _top(_revenue_per_product(rows), names, top)


def fast_product_report(engine: Engine, items: int = 3000, top: int = 5) -> list[tuple[str, Decimal]]:
    """:func:`slow_product_report` with one pass over the rows (a dict of running totals)."""
    rows = _load_item_rows(engine, items)
    names = _product_names(engine)
    revenue: dict[int, Decimal] = {}
    for product_id, quantity, unit_price in rows:
        revenue[product_id] = revenue.get(product_id, Decimal(0)) + quantity * unit_price
    return _top(revenue, names, top)


# ---------------------------------------------------------------------------------------------
# CPU: users with more than k orders, three ways
# ---------------------------------------------------------------------------------------------


def order_user_ids(engine: Engine, n: int | None = None) -> list[int]:
    """The ``user_id`` of the first ``n`` orders by id (all orders when ``n`` is None)."""
    statement = select(Order.user_id).order_by(Order.id)
    if n is not None:
        statement = statement.limit(n)
    with engine.connect() as conn:
        return list(conn.execute(statement).scalars())


def more_than_nested(user_ids: Sequence[int], k: int) -> list[int]:
    """Users appearing more than ``k`` times: for each distinct user, count it in the whole list.

    ``list.count`` is a loop in C, still a loop: distinct users x n comparisons, O(n^2).
    """
    user_ids = list(user_ids)
    return sorted(u for u in set(user_ids) if user_ids.count(u) > k)


def more_than_counter(user_ids: Sequence[int], k: int) -> list[int]:
    """The same with one pass and a dict of counts (``collections.Counter``): O(n)."""
    return sorted(u for u, count in Counter(user_ids).items() if count > k)


def more_than_statement(k: int, n: int | None = None):
    """``SELECT user_id ... GROUP BY user_id HAVING count(*) > k`` over the first ``n`` orders."""
    source = select(Order.id, Order.user_id).order_by(Order.id)
    if n is not None:
        source = source.limit(n)
    orders = source.subquery()
    return (select(orders.c.user_id).group_by(orders.c.user_id)
            .having(func.count() > k).order_by(orders.c.user_id))


def more_than_sql(engine: Engine, k: int, n: int | None = None) -> list[int]:
    """The same in one query: the database groups, Python receives only the answer."""
    with engine.connect() as conn:
        return list(conn.execute(more_than_statement(k, n)).scalars())


def comparisons(method: str, n: int, distinct: int) -> int | None:
    """Element comparisons a method makes on ``n`` ids of which ``distinct`` differ."""
    return {"nested loops": n * distinct, "Counter": n}.get(method)


def heavy_users_grid(engine: Engine, ns: Sequence[int], k: int, repeat: int = 3) -> pd.DataFrame:
    """Time the three ways for each ``n``: ``method, n, users, comparisons, queries, median_s``.

    The Python methods receive the ids already loaded (loading is not timed); the SQL method
    does the whole job in the database. ``users`` is the size of the answer, the same for all.
    """
    out = []
    for n in ns:
        ids = order_user_ids(engine, n)
        distinct = len(set(ids))
        cases = (("nested loops", lambda ids=ids: more_than_nested(ids, k)),
                 ("Counter", lambda ids=ids: more_than_counter(ids, k)),
                 ("GROUP BY ... HAVING", lambda n=n: more_than_sql(engine, k, n)))
        for method, run in cases:
            with count_queries(engine) as queries:
                users = run()
            timing = time_call(run, repeat=repeat, warmup=0)
            out.append({"method": method, "n": n, "users": len(users),
                        "comparisons": comparisons(method, n, distinct),
                        "queries": queries.count, "median_s": timing.median_s})
    df = pd.DataFrame(out)
    df["comparisons"] = df.comparisons.astype("Int64")
    return df


# ---------------------------------------------------------------------------------------------
# Analytics: the same GROUP BY on SQLite and on DuckDB over Parquet
# ---------------------------------------------------------------------------------------------

CATEGORY_SALES_SQL = (
    "SELECT p.category_id, count(*) AS lines, sum(oi.quantity) AS units, "
    "round(sum(oi.quantity * oi.unit_price), 2) AS revenue "
    "FROM {order_items} oi JOIN {products} p ON p.id = oi.product_id "
    "GROUP BY p.category_id ORDER BY p.category_id"
)


def category_sales_sqlite(engine: Engine) -> list[tuple]:
    """Lines, units and revenue per category, computed by the database of ``engine``."""
    sql = CATEGORY_SALES_SQL.format(order_items="order_items", products="products")
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql)]


def category_sales_duckdb(paths: dict[str, Path], connection=None) -> list[tuple]:
    """The same query run by DuckDB straight over the Parquet files of
    :func:`perfcourse.export.export_parquet` (a columnar engine: it reads only the 4 columns
    it needs). DuckDB 2.0 results have no ``fetchone()``: ``fetchall()`` or ``.df()``."""

    sql = CATEGORY_SALES_SQL.format(order_items=f"read_parquet('{paths['order_items']}')",
                                    products=f"read_parquet('{paths['products']}')")
    con = connection or duckdb.connect()
    try:
        return [tuple(row) for row in con.execute(sql).fetchall()]
    finally:
        if connection is None:
            con.close()


def same_sales(a: Sequence[tuple], b: Sequence[tuple]) -> bool:
    """Row by row equality, revenue to the cent (SQLite sums floats, DuckDB decimals)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if tuple(int(v) for v in x[:3]) != tuple(int(v) for v in y[:3]):
            return False
        if abs(Decimal(str(x[3])) - Decimal(str(y[3]))) > Decimal("0.011"):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Memoising an expensive calculation
# ---------------------------------------------------------------------------------------------


def category_revenue(engine: Engine, category_id: int) -> Decimal:
    """Revenue of one category over all order items: one aggregate query (the expensive part)."""
    statement = (select(func.coalesce(func.sum(OrderItem.quantity * OrderItem.unit_price), 0))
                 .join(Product, Product.id == OrderItem.product_id)
                 .where(Product.category_id == category_id))
    with engine.connect() as conn:
        value = conn.execute(statement).scalar_one()
    return Decimal(str(value)).quantize(Decimal("0.01"))


def cached_category_revenue(engine: Engine, maxsize: int | None = 128):
    """``category_revenue`` for one engine, memoised: a function ``revenue(category_id)``.

    ``functools.lru_cache`` keys on the arguments (here the category id), keeps at most
    ``maxsize`` results (least recently used go first; ``None``: unbounded) and counts
    ``cache_info()`` hits and misses. It never notices a change in the database: call
    ``revenue.cache_clear()`` when the data changes (or give the key a version).
    """
    @lru_cache(maxsize=maxsize)
    def revenue(category_id: int) -> Decimal:
        return category_revenue(engine, category_id)

    return revenue


def call_sequence(calls: int, keys: int, seed: int = 4) -> list[int]:
    """``calls`` keys out of ``1..keys``, skewed like real traffic (key k weighs 1/k)."""
    rng = random.Random(seed)
    population = list(range(1, keys + 1))
    return rng.choices(population, weights=[1 / k for k in population], k=calls)


def memo_table(engine: Engine, sequence: Sequence[int], maxsizes: Iterable[int | None]) -> pd.DataFrame:
    """Replay ``sequence`` through a fresh cache per ``maxsize``:
    ``maxsize, calls, hits, misses, queries, time_s`` (``maxsize`` 0 means no cache)."""
    out = []
    for maxsize in maxsizes:
        revenue = cached_category_revenue(engine, maxsize)
        with count_queries(engine) as queries:
            start = time.perf_counter()
            for key in sequence:
                revenue(key)
            elapsed = time.perf_counter() - start
        info = revenue.cache_info()
        out.append({"maxsize": "unbounded" if maxsize is None else str(maxsize),
                    "calls": len(sequence), "hits": info.hits, "misses": info.misses,
                    "queries": queries.count, "time_s": elapsed})
    return pd.DataFrame(out)


def lru_misses(sequence: Iterable[Any], maxsize: int | None) -> int:
    """How many misses an LRU cache of ``maxsize`` entries has on ``sequence`` (a simulation)."""

    cache: OrderedDict = OrderedDict()
    misses = 0
    for key in sequence:
        if key in cache:
            cache.move_to_end(key)
            continue
        misses += 1
        if maxsize == 0:
            continue
        cache[key] = True
        if maxsize is not None and len(cache) > maxsize:
            cache.popitem(last=False)
    return misses

