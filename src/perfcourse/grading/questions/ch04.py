"""Chapter 04, memory and CPU: memory growth, streaming exports, aggregates in SQL, memoising.

Practical questions run on the grader's own data and never on the case the lesson shows:

* 04.q3 streams orders *joined with their user's email* (the lesson streams orders alone) from
  an in-memory table of generated orders; graded by every line written, by the peak of Python
  allocations compared with a load-everything export of the same table (a count of bytes, never
  a time) and by how the rows were fetched (``stream_results``/``yield_per`` or keyset batches).
* 04.q4 finds *products* in more than ``k`` different orders (the lesson: users with more than
  ``k`` orders) on a private copy of the ``tiny`` dataset, for hidden ``k``.
* 04.q5 memoises a function whose results depend on a data *version* (the lesson: an
  ``lru_cache`` cleared by hand), graded by how often the expensive function runs.
* 04.q6 counts orders per *total band* in one query (the lesson: per status), on hidden data
  with orders on the band boundaries.

The lab's questions:

* 04.q7 streams the nightly export of *order lines* (joined with products, in a date window,
  cancelled orders left out) from a hidden shop built here; graded by every line, by the
  statements sent (no N+1), by how rows were fetched, and by the tracemalloc peak on two hidden
  windows, one five times the other: a bounded export peaks about the same on both.
* 04.q8 builds the category report in one aggregate statement on the tiny copy with hidden
  rows (an empty category, one sold only in cancelled orders, an order at ``since`` exactly).
* 04.q9 names the hot function of the lab's :class:`NightlyJob`, drawn from a seed the
  notebook does not show; the grader reads it from the job made last in the kernel.

The reference answers live here, private; no function of the chapter module solves them.
"""

from __future__ import annotations

import csv
import functools
import gc
import random
import re
import sqlite3
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

import sqlalchemy as sa
from sqlalchemy import case, event, func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from perfcourse.chapters.memory_and_cpu import JOB_STEPS, current_job, lru_misses
from perfcourse.memory import track_memory
from perfcourse.models import ORDER_STATUSES, Base, Category, Order, OrderItem, Product, User
from perfcourse.statements import count_queries
from perfcourse.units import format_bytes

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    NoAnswer,
    QueryCheck,
    call_learner,
    made_in_this_kernel,
    need_function,
    short_repr,
    shorten,
    type_name,
)
from ..datasets import private_dataset

__all__ = [
    "EXPORT_COLUMNS",
    "EXPORT_ROWS",
    "LINE_COLUMNS",
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# 04.q3: a streaming CSV export of orders joined with their user's email

#: The header of the export, and the orders in the grader's table.
EXPORT_COLUMNS = ("order_id", "email", "status", "total")
EXPORT_ROWS = 10_000
_EXPORT_USERS = 1_200
#: A streaming export may peak at most at this share of the load-everything export's peak.
_PEAK_SHARE = 0.5


def _export_rows():
    """The grader's hidden orders: ``(id, user_id, status, total)`` and the users' emails."""
    rng = random.Random(2043)
    emails = {u: f"{rng.choice(['ana', 'bo', 'cy', 'dee', 'eli'])}.{u * 7 % 1009}@shop{u % 13}.test"
              for u in range(1, _EXPORT_USERS + 1)}
    ids = rng.sample(range(1, EXPORT_ROWS * 3), EXPORT_ROWS)  # gaps: ids are not line numbers
    orders = [(order_id, rng.randint(1, _EXPORT_USERS), rng.choice(ORDER_STATUSES),
               Decimal(rng.randint(100, 99_999)) / 100) for order_id in ids]
    return orders, emails


def _export_engine():
    """An in-memory SQLite database with the hidden users and orders (inserted out of order)."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    User.__table__.create(engine)
    Order.__table__.create(engine)
    orders, emails = _export_rows()
    created = datetime(2024, 1, 1)
    with engine.begin() as conn:
        conn.execute(User.__table__.insert(), [
            {"id": u, "email": e, "first_name": "x", "last_name": "y", "active": True,
             "premium": False, "created_at": created} for u, e in emails.items()])
        conn.execute(Order.__table__.insert(), [
            {"id": i, "user_id": u, "status": s, "total": t,
             "created_at": created + timedelta(minutes=i)} for i, u, s, t in orders])
    engine.perfcourse_namespace = "grader_export"
    return engine


def _expected_lines():
    orders, emails = _export_rows()
    return [(i, emails[u], s, t) for i, u, s, t in sorted(orders)]


class _StreamingSink:
    """A write-only sink that compares each CSV line with the expected one as it arrives.

    It keeps counters and the first problem only, so its own memory stays flat. Subclasses say
    what a line should be (``_compare`` returns the problem with line ``index``, or None).
    """

    def __init__(self, expected):
        self.expected = expected
        self.header = None
        self.rows = 0
        self.problem = None
        self.extra = None  # the first field of the first line past the expected ones
        self.most_lines_per_write = 0
        self._partial = ""

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() takes text (str), not {type_name(text)}")
        self.most_lines_per_write = max(self.most_lines_per_write, text.count("\n"))
        pieces = (self._partial + text).split("\n")
        self._partial = pieces.pop()
        for line in pieces:
            self._line(line.rstrip("\r"))
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def close(self):  # a learner may close what they write to
        pass

    def finish(self):
        if self._partial:
            self._line(self._partial.rstrip("\r"))
            self._partial = ""

    def _line(self, line):
        if self.header is None:
            self.header = line
            return
        index = self.rows
        self.rows += 1
        if self.problem is None and index < len(self.expected):
            self.problem = self._compare(index, line)
        elif index == len(self.expected):
            self.extra = line.split(",", 1)[0]

    def _compare(self, index, line):
        raise NotImplementedError


class _CheckingSink(_StreamingSink):
    """The sink of 04.q3: one line per order."""

    def _compare(self, index, line):
        want = self.expected[index]
        fields = next(csv.reader([line]), [])
        if len(fields) != len(EXPORT_COLUMNS):
            return (f"Data line {index + 1} has {len(fields)} fields ({short_repr(line, 60)}); each "
                    f"line has the {len(EXPORT_COLUMNS)} columns of the header: {','.join(EXPORT_COLUMNS)}.")
        order_id, email, status, total = fields
        if order_id != str(want[0]):
            return (f"Data line {index + 1} should be order {want[0]}, not {short_repr(order_id, 30)}: "
                    "one line per order, sorted by order id (ORDER BY orders.id), starting with the first.")
        if email != want[1]:
            return (f"Order {want[0]} should have the email of the user who placed it ({want[1]!r}), not "
                    f"{short_repr(email, 40)}: join users on users.id = orders.user_id and write users.email.")
        if status != want[2]:
            return f"Order {want[0]} should have the status {want[2]!r}, not {short_repr(status, 30)}."
        try:
            same = abs(Decimal(total) - want[3]) <= Decimal("0.005")
        except (InvalidOperation, ValueError):
            same = False
        if not same:
            return (f"Order {want[0]} should have the total {want[3]}, not {short_repr(total, 30)}: "
                    "write orders.total as it is.")
        return None


def _export_loading_all(engine, sink):
    """The reference's opposite: every row loaded, then written (the peak to compare with)."""
    statement = (select(Order.id, User.email, Order.status, Order.total)
                 .join(User, User.id == Order.user_id).order_by(Order.id))
    writer = csv.writer(sink)
    writer.writerow(EXPORT_COLUMNS)
    with engine.connect() as conn:
        rows = conn.execute(statement).all()
    writer.writerows(rows)


def _export_streaming(engine, sink):
    """The model answer of 04.q3."""
    statement = (select(Order.id, User.email, Order.status, Order.total)
                 .join(User, User.id == Order.user_id).order_by(Order.id)
                 .execution_options(yield_per=1000))
    writer = csv.writer(sink)
    writer.writerow(EXPORT_COLUMNS)
    with engine.connect() as conn:
        for rows in conn.execute(statement).partitions():
            writer.writerows(rows)


@functools.lru_cache(maxsize=1)
def _loading_all_peak() -> int:
    """Peak Python memory of the load-everything export of the hidden table (measured once)."""
    engine = _export_engine()
    try:
        sink = _CheckingSink(_expected_lines())
        gc.collect()
        with track_memory() as memory:
            _export_loading_all(engine, sink)
    finally:
        engine.dispose()
    return memory.peak_bytes


def _watch_fetching(engine):
    """Record, per SELECT, whether it streamed and whether it was a LIMITed batch."""
    seen = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            options = context.execution_options if context is not None else {}
            seen.append((bool(options.get("stream_results") or options.get("yield_per")),
                         bool(re.search(r"\bLIMIT\b", statement, re.I))))

    event.listen(engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(engine, "before_cursor_execute", before)


class _ExportCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q3\", export_orders_with_email) "
                            f"(got a {type_name(answer)}).")
        limit = int(_loading_all_peak() * _PEAK_SHARE)
        engine = _export_engine()
        sink = _CheckingSink(_expected_lines())
        seen, stop_watching = _watch_fetching(engine)
        try:
            gc.collect()
            with track_memory() as memory:
                call_learner(answer, engine, sink)
        finally:
            stop_watching()
            engine.dispose()
        sink.finish()
        header = ",".join(EXPORT_COLUMNS)
        if sink.header is None:
            raise Incorrect("Nothing was written to the sink: create csv.writer(sink), write the "
                            "header, then one line per order.")
        if sink.header != header:
            raise Incorrect(f"The first line should be the header {header!r}, "
                            f"not {short_repr(sink.header, 60)}.")
        if sink.problem:
            raise Incorrect(sink.problem)
        if sink.rows != EXPORT_ROWS:
            raise Incorrect(f"The grader's table has {EXPORT_ROWS:,} orders and your export wrote "
                            f"{sink.rows:,} data lines: every order, one line each.")
        if memory.peak_bytes > limit:
            raise Incorrect(
                f"Right lines, but Python memory peaked at {format_bytes(memory.peak_bytes)} "
                f"during the export, against {format_bytes(_loading_all_peak())} for loading "
                f"every row first: the rows were held (nearly) all at once. Stream them with "
                "execution_options(yield_per=1000) and write each batch as it arrives.")
        streamed = any(stream for stream, _ in seen)
        batched = len(seen) > 1 and all(limited for _, limited in seen)
        if not (streamed or batched):
            raise Incorrect(
                "Right lines and flat memory on SQLite, which hands rows over one by one, but "
                "this query uses a client-side cursor: on PostgreSQL the driver receives the "
                "whole result before your first row (the memory tracemalloc cannot see). Ask "
                "for a server-side cursor with execution_options(yield_per=...) (or "
                "stream_results=True), or fetch keyset batches (WHERE id > :last ... LIMIT).")

    def model_answer(self):
        return ("def export_orders_with_email(engine, sink):\n"
                "    writer = csv.writer(sink)\n"
                "    writer.writerow([\"order_id\", \"email\", \"status\", \"total\"])\n"
                "    statement = (select(Order.id, User.email, Order.status, Order.total)\n"
                "                 .join(User, User.id == Order.user_id).order_by(Order.id)\n"
                "                 .execution_options(yield_per=1000))\n"
                "    with engine.connect() as conn:\n"
                "        for rows in conn.execute(statement).partitions():\n"
                "            writer.writerows(rows)")


# --------------------------------------------------------------------------------------------
# 04.q4: products in more than k different orders, in one query


def _products_statement(k, at_least=False, distinct=True):
    orders = func.count(OrderItem.order_id.distinct()) if distinct else func.count()
    return (select(OrderItem.product_id).group_by(OrderItem.product_id)
            .having(orders >= k if at_least else orders > k).order_by(OrderItem.product_id))


def _products_reference(session, k):
    """The model answer of 04.q4, as a loader on a session."""
    return list(session.execute(_products_statement(k)).scalars())


def _as_sorted_ids(result):
    try:
        ids = [int(r[0] if isinstance(r, (tuple, sa.Row)) and len(r) == 1 else r)
               for r in result]
    except (TypeError, ValueError, IndexError):
        raise Incorrect("Return a list of product ids (integers), e.g. "
                        f"list(conn.execute(...).scalars()) (got {short_repr(result, 60)}).") \
            from None
    return sorted(ids)


#: Hidden values of k: 0, counts some products have exactly (so >= and > differ), and none.
_HIDDEN_K = (0, 12, 4, 21, 35, 5000)


class _PopularProductsCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q4\", products_in_more_than) "
                            f"(got a {type_name(answer)}).")
        engine = private_dataset()
        try:
            with engine.begin() as conn:  # hidden data: some products twice in the same orders
                conn.exec_driver_sql(
                    "INSERT INTO order_items (order_id, product_id, quantity, unit_price) "
                    "SELECT order_id, product_id, 1, unit_price FROM order_items "
                    "WHERE product_id % 7 = 3")
            for k in _HIDDEN_K:
                checker = QueryCheck(
                    reference=_products_reference, engine=engine, max_queries=1, args=(k,),
                    use=_as_sorted_ids,
                    hint="GROUP BY the product and keep the groups with HAVING "
                    "count(DISTINCT order_id) > k.")
                try:
                    checker.grade(lambda session, k: answer(engine, k))
                except NoAnswer:
                    raise
                except Incorrect as exc:
                    if str(exc).startswith("Your loader returns other rows"):
                        raise Incorrect(self._why(engine, answer, k)) from None
                    raise
            with count_queries(engine) as counted:
                call_learner(answer, engine, 3)
            if not any("GROUP BY" in s.sql.upper() for s in counted.statements):
                raise Incorrect("Right products in one query, but the query sends every order "
                                "line to Python to be counted there: let the database count with "
                                "GROUP BY ... HAVING, so only the answer crosses the wire.")
        finally:
            engine.dispose()

    @staticmethod
    def _why(engine, answer, k):
        got = _as_sorted_ids(call_learner(answer, engine, k))
        with engine.connect() as conn:
            def ids(**variant):
                return list(conn.execute(_products_statement(k, **variant)).scalars())
            at_least, every_line = ids(at_least=True), ids(distinct=False)
        if got == at_least:
            return (f"For k={k} your function also returns products in exactly {k} orders: "
                    "MORE than k, so > k, not >= k.")
        if got == every_line:
            return (f"For k={k} your function counts order lines, not orders: a product "
                    "listed twice in the same order counts once. Count DISTINCT order ids.")
        return (f"For k={k} your function returns other products than expected "
                f"(got {short_repr(got, 50)}): the products that appear in more than k "
                "different orders (any status), as sorted ids.")

    def model_answer(self):
        return ("def products_in_more_than(engine, k):\n"
                "    orders = func.count(OrderItem.order_id.distinct())\n"
                "    statement = (select(OrderItem.product_id).group_by(OrderItem.product_id)\n"
                "                 .having(orders > k).order_by(OrderItem.product_id))\n"
                "    with engine.connect() as conn:\n"
                "        return list(conn.execute(statement).scalars())")


# --------------------------------------------------------------------------------------------
# 04.q5: a memoised calculation whose results depend on a data version


def _memo_scenarios():
    """``(events, maxsize)``: an event is ``(product_id, currency)`` (a call) or ``"bump"``.

    Product ids are above 256 and currencies are built afresh for every call, so equal
    arguments are never the same objects (a cache keyed by ``id()`` shows).
    """
    rng = random.Random(2045)
    keys = [(1000 + product, currency) for product in range(1, 9) for currency in ("EUR", "USD")]
    weights = [1 / (i + 1) for i in range(len(keys))]
    yield [(1001, "EUR"), (1001, "EUR"), (1002, "EUR"), (1001, "USD"), (1001, "EUR"),
           "bump", (1001, "EUR"), (1002, "EUR"), (1001, "EUR")], 2
    events = rng.choices(keys, weights=weights, k=90)
    events[30:30] = ["bump"]
    events[70:70] = ["bump"]
    yield events, 4
    yield rng.choices(keys, weights=weights, k=60) + ["bump"] + \
        rng.choices(keys, weights=weights, k=60), 16


def _price(product_id, currency, version):
    return Decimal(product_id * 100 + len(currency) * 10 + version) / 7


def _fresh(value):
    """An equal value that is a new object (ints above 256 and strings built at run time)."""
    return int(str(value)) if isinstance(value, int) else "".join(list(value))


class _MemoCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q5\", make_cached) "
                            f"(got a {type_name(answer)}).")
        for events, maxsize in _memo_scenarios():
            self._scenario(answer, events, maxsize)

    @staticmethod
    def _scenario(answer, events, maxsize):
        state = {"version": 1}
        calls = []

        def compute(product_id, currency):
            calls.append((product_id, currency))
            return _price(product_id, currency, state["version"])

        def version():
            return state["version"]

        cached = call_learner(answer, compute, maxsize, version)
        if not callable(cached):
            raise Incorrect("make_cached must return a function (the cached version of "
                            f"`compute`), not a {type_name(cached)}.")
        keys = []
        bumped = False
        for event_ in events:
            if event_ == "bump":
                state["version"] += 1
                bumped = True
                continue
            product_id, currency = event_
            keys.append((state["version"], product_id, currency))
            got = call_learner(cached, _fresh(product_id), _fresh(currency))
            want = _price(product_id, currency, state["version"])
            if got == want:
                continue
            if any(got == _price(product_id, currency, v) for v in range(1, state["version"])):
                raise Incorrect(
                    f"After the data changed (version() went to {state['version']}), "
                    f"cached({product_id}, {currency!r}) returned the result computed under an "
                    "older version: a stale price. Put version() in the key (or drop the "
                    "entries when it changes).")
            if any(got == _price(p, c, v) for p in range(1001, 1009) for c in ("EUR", "USD")
                   for v in range(1, state["version"] + 1)):
                raise Incorrect(
                    f"cached({product_id}, {currency!r}) returned the result of compute for "
                    "other arguments: the key must hold every argument (and the version).")
            raise Incorrect(f"cached({product_id}, {currency!r}) returned {short_repr(got, 40)}, "
                            "not what compute returns.")
        expected = lru_misses(keys, maxsize)
        if len(calls) > expected:
            raise Incorrect(
                f"On a hidden sequence of {len(keys)} calls with maxsize={maxsize}"
                f"{' and a version change' if bumped else ''}, compute ran {len(calls)} times, "
                f"more than an LRU cache of that size would ({expected}): equal arguments must "
                "hit even when they are different objects (key on the values, not id()), and "
                "up to maxsize results stay cached.")
        if len(calls) < expected:
            raise Incorrect(
                f"On a hidden sequence of {len(keys)} calls with maxsize={maxsize}, compute ran "
                f"{len(calls)} times, fewer than an LRU cache of that size would ({expected}): "
                "the cache keeps more than maxsize results. Bound it (least recently used out "
                "first): an unbounded cache grows for ever.")

    def model_answer(self):
        return ("def make_cached(compute, maxsize, version):\n"
                "    @functools.lru_cache(maxsize=maxsize)\n"
                "    def at_version(data_version, product_id, currency):\n"
                "        return compute(product_id, currency)\n"
                "\n"
                "    def cached(product_id, currency):\n"
                "        return at_version(version(), product_id, currency)\n"
                "\n"
                "    return cached")


# --------------------------------------------------------------------------------------------
# 04.q6: orders per total band, in one query

#: Band -> (lowest total included, lowest total of the next band).
BANDS = {"small": (None, 50), "medium": (50, 200), "large": (200, None)}


def _band_columns(shift_bounds=False):
    columns = []
    for band, (low, high) in BANDS.items():
        conditions = []
        if low is not None:
            conditions.append(Order.total > low if shift_bounds else Order.total >= low)
        if high is not None:
            conditions.append(Order.total <= high if shift_bounds else Order.total < high)
        columns.append(func.coalesce(func.sum(case((sa.and_(*conditions), 1), else_=0)), 0)
                       .label(band))
    return columns


def _bands_reference(session, shift_bounds=False):
    row = session.execute(select(*_band_columns(shift_bounds))).one()
    return {band: int(value) for band, value in row._mapping.items()}


def _as_band_counts(result):
    if not isinstance(result, dict):
        raise Incorrect("Return a dict band -> count, e.g. {\"small\": 3, \"medium\": 5, "
                        f"\"large\": 2}}, not a {type_name(result)}.")
    missing = [band for band in BANDS if band not in result]
    if missing:
        raise Incorrect(f"Your dict has no {', '.join(map(repr, missing))}: every band must be "
                        "there, with 0 when no order falls in it (a GROUP BY leaves empty "
                        "groups out).")
    extra = [k for k in result if k not in BANDS]
    if extra:
        raise Incorrect(f"Your dict has other keys ({short_repr(extra, 40)}): only "
                        f"{', '.join(map(repr, BANDS))}.")
    try:
        return {band: int(result[band]) for band in BANDS}
    except (TypeError, ValueError):
        raise Incorrect("Every count should be an integer.") from None


def _hidden_band_rounds(engine):
    """Two rounds of hidden data: orders on both boundaries, then no small order at all."""
    with engine.begin() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM orders").scalar_one()
        conn.execute(Order.__table__.insert(), [
            {"id": top + i, "user_id": 1 + i, "status": ORDER_STATUSES[i % 5], "total": total,
             "created_at": datetime(2024, 6, 1)}
            for i, total in enumerate([50, 50, 200, 200, 200, Decimal("49.99"),
                                       Decimal("199.99")], start=1)])
        conn.exec_driver_sql("UPDATE orders SET status = 'cancelled' WHERE id % 11 = 3")
    yield "orders on the band boundaries"
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM orders WHERE total < 50")
    yield "no order under 50"


class _BandCountsCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q6\", order_bands) "
                            f"(got a {type_name(answer)}).")
        engine = private_dataset()
        try:
            for situation in _hidden_band_rounds(engine):
                try:
                    QueryCheck(reference=_bands_reference, engine=engine, max_queries=1,
                               use=_as_band_counts,
                               hint="One SELECT with one aggregate per band: count(*) FILTER "
                               "(WHERE ...) or sum(CASE WHEN ... THEN 1 ELSE 0 END).").grade(
                        lambda session: answer(engine))
                except NoAnswer:
                    raise
                except Incorrect as exc:
                    if str(exc).startswith("Your loader returns other rows"):
                        raise Incorrect(self._why(engine, answer, situation)) from None
                    raise
            with count_queries(engine) as counted:
                call_learner(answer, engine)
            if not any(re.search(r"\b(count|sum|total)\s*\(", s.sql, re.I)
                       for s in counted.statements):
                raise Incorrect("Right counts in one query, but the query sends every order's "
                                "total to Python to be counted there: let the database count "
                                "(count(*) FILTER (WHERE ...) or sum(CASE ...)), so only three "
                                "numbers cross the wire.")
        finally:
            engine.dispose()

    @staticmethod
    def _why(engine, answer, situation):
        got = _as_band_counts(call_learner(answer, engine))
        with Session(engine) as session:
            shifted = _bands_reference(session, shift_bounds=True)
            expected = _bands_reference(session)
        if got == shifted:
            return ("An order of exactly 50.00 is medium and one of exactly 200.00 is large: "
                    "each band includes its lower bound (total >= 50) and excludes its upper "
                    "one (total < 200).")
        if sum(got.values()) != sum(expected.values()):
            return (f"With {situation}, your counts add up to {sum(got.values())}, not to the "
                    f"{sum(expected.values())} orders of the table: every order is in exactly "
                    "one band, whatever its status.")
        return (f"With {situation}, your function returns {short_repr(got, 60)}: small is "
                "total < 50, medium 50 <= total < 200, large total >= 200 (every status).")

    def model_answer(self):
        return ("def order_bands(engine):\n"
                "    columns = [func.count().filter(Order.total < 50).label(\"small\"),\n"
                "               func.count().filter(Order.total >= 50, Order.total < 200)"
                ".label(\"medium\"),\n"
                "               func.count().filter(Order.total >= 200).label(\"large\")]\n"
                "    with engine.connect() as conn:\n"
                "        return dict(conn.execute(select(*columns)).one()._mapping)")


# --------------------------------------------------------------------------------------------
# The lab (04.q7-04.q9): the nightly export, the nightly report, the nightly job's hot function

#: The header of the nightly export of order lines.
LINE_COLUMNS = ("order_id", "ordered_on", "product", "quantity", "unit_price", "line_total")
_LAB_START = datetime(2025, 3, 3)
_LAB_DAYS = 60
_LAB_ORDERS_PER_DAY = 230
_LAB_PRODUCTS = 1_000
#: The two hidden windows (first day, days): about 1,500 and 8,000 lines.
_SMALL_WINDOW = (10, 3)
_LARGE_WINDOW = (40, 15)
#: A write of more lines than this means the export built its text in memory first.
_MOST_LINES_PER_WRITE = 1_000
#: A bounded export may peak at most this much higher on the large window than on the small one
#: (five times the lines). No absolute bound: streamed ORM objects weigh more than rows loaded
#: all at once at this scale; the growth is what tells.
_GROWTH = 2.0
_GROWTH_SLACK = 512 * 1024
#: At most one statement per this many lines written (plus a few).
_LINES_PER_STATEMENT = 100


def _repeated(statements):
    """A hint naming the statement that ran again and again, if one did."""
    shapes = Counter(" ".join(s.sql.split()) for s in statements)
    if not shapes:
        return ""
    text, times = shapes.most_common(1)[0]
    return (f" The same statement ran {times:,} times ({shorten(text, 70)}): the N+1 pattern."
            if times > 2 else "")


def _window(window):
    first, days = window
    since = _LAB_START + timedelta(days=first)
    return since, since + timedelta(days=days)


@functools.lru_cache(maxsize=1)
def _lab_data():
    """The hidden shop of the export: ``(products, orders, items)`` as plain tuples.

    Product names with commas and quotes (only csv.writer quotes them right); orders at the
    exact start and end of each window; cancelled orders in every window.
    """
    rng = random.Random(4077)
    words = ["mug", "lamp", "desk", "chair", "pan", "kettle", "rug", "clock", "vase", "shelf"]
    products = []
    for pid in range(1, _LAB_PRODUCTS + 1):
        name = f"{rng.choice(words)} {pid}"
        if pid % 9 == 0:
            name = f"{name}, set of {pid % 4 + 2}"
        elif pid % 13 == 0:
            name = f'{name} "deluxe"'
        products.append((pid, 1 + pid % 7, name, Decimal(rng.randint(100, 20_000)) / 100))
    orders, items = [], []
    order_id = item_id = 0
    boundaries = {_window(w)[0] for w in (_SMALL_WINDOW, _LARGE_WINDOW)} | \
        {_window(w)[1] for w in (_SMALL_WINDOW, _LARGE_WINDOW)}
    for day in range(_LAB_DAYS):
        start = _LAB_START + timedelta(days=day)
        stamps = sorted(start + timedelta(seconds=rng.randrange(86_400))
                        for _ in range(_LAB_ORDERS_PER_DAY))
        if start in boundaries:
            stamps[0] = start  # an order at midnight sharp: in the window it starts
        for stamp in stamps:
            order_id += rng.randint(1, 3)  # gaps: ids are not line numbers
            status = "cancelled" if rng.random() < 0.08 else rng.choice(ORDER_STATUSES[:4])
            if stamp in boundaries:
                status = "paid"  # the boundary orders count: only the window's rule decides
            orders.append((order_id, 1 + order_id % 500, status, stamp))
            for _ in range(rng.choice((1, 2, 2, 3, 3, 4))):
                item_id += 1
                product = products[rng.randrange(_LAB_PRODUCTS)]
                items.append((item_id, order_id, product[0], rng.randint(1, 5), product[3]))
    return products, orders, items


@functools.lru_cache(maxsize=1)
def _lab_database_bytes() -> bytes:
    """The hidden shop, built once in SQLite and kept serialised (a fresh copy per check)."""
    products, orders, items = _lab_data()
    engine = sa.create_engine("sqlite://", poolclass=StaticPool)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(User.__table__.insert(), [
                {"id": u, "email": f"u{u}@lab.test", "first_name": "x", "last_name": "y",
                 "active": True, "premium": False, "created_at": _LAB_START} for u in range(1, 501)])
            conn.execute(Category.__table__.insert(), [{"id": c, "name": f"c{c}"} for c in range(1, 8)])
            conn.execute(Product.__table__.insert(), [
                {"id": p, "category_id": c, "name": n, "price": price, "active": True}
                for p, c, n, price in products])
            conn.execute(Order.__table__.insert(), [
                {"id": i, "user_id": u, "status": s, "total": Decimal(0), "created_at": t}
                for i, u, s, t in orders])
            conn.execute(OrderItem.__table__.insert(), [
                {"id": i, "order_id": o, "product_id": p, "quantity": q, "unit_price": price}
                for i, o, p, q, price in items])
        with engine.connect() as conn:
            return conn.connection.dbapi_connection.serialize()
    finally:
        engine.dispose()


def _lab_engine():
    """A fresh in-memory copy of the hidden shop of the export."""
    memory = sqlite3.connect(":memory:", check_same_thread=False)
    memory.deserialize(_lab_database_bytes())
    engine = sa.create_engine("sqlite://", creator=lambda: memory, poolclass=StaticPool)
    engine.perfcourse_namespace = "grader_lab04"
    return engine


def _expected_export(window):
    """The lines of the export of ``window``: ``(order_id, date, product, quantity, unit_price,
    line_total)``, and the ids the diagnosis needs."""
    products, orders, items = _lab_data()
    since, until = _window(window)
    names = {p: n for p, _, n, _ in products}
    wanted = {i: t for i, _, s, t in orders if since <= t < until and s != "cancelled"}
    lines = [(o, wanted[o].date().isoformat(), names[p], q, price, q * price)
             for _, o, p, q, price in sorted(items, key=lambda item: (item[1], item[0]))
             if o in wanted]
    near = {
        "cancelled": {i for i, _, s, t in orders if since <= t < until and s == "cancelled"},
        "at_until": {i for i, _, s, t in orders if t == until and s != "cancelled"},
        "at_since": {i for i, _, s, t in orders if t == since and s != "cancelled"},
        "wanted": set(wanted),
    }
    return lines, near


class _LineSink(_StreamingSink):
    """The sink of 04.q7: one line per order item, with the orders near the window's edges."""

    def __init__(self, expected, near):
        super().__init__(expected)
        self.near = near

    def _compare(self, index, line):
        want = self.expected[index]
        fields = next(csv.reader([line]), [])
        if len(fields) != len(LINE_COLUMNS):
            return (f"Data line {index + 1} has {len(fields)} fields ({short_repr(line, 70)}), "
                    f"not {len(LINE_COLUMNS)}: some product names hold commas or quotes, so write "
                    "with csv.writer, which quotes them, not by joining strings.")
        order_id, ordered_on, product, quantity, unit_price, line_total = fields
        if order_id != str(want[0]):
            return self._wrong_order(index, order_id, want[0])
        if ordered_on.strip()[:10] != want[1]:
            return (f"Order {want[0]} was placed on {want[1]}, not {short_repr(ordered_on, 30)}: "
                    "write the date of orders.created_at (YYYY-MM-DD).")
        if product != want[2]:
            return (f"Line {index + 1} (order {want[0]}) should name the product {want[2]!r}, not "
                    f"{short_repr(product, 40)}: join products on products.id = "
                    "order_items.product_id and write products.name.")
        if quantity.strip() != str(want[3]):
            return (f"Line {index + 1} (order {want[0]}) should have the quantity {want[3]}, not "
                    f"{short_repr(quantity, 20)}; lines of one order come by item id.")
        for label, text, value in (("unit_price", unit_price, want[4]),
                                   ("line_total", line_total, want[5])):
            try:
                same = abs(Decimal(text.strip()) - value) <= Decimal("0.005")
            except (InvalidOperation, ValueError):
                same = False
            if not same:
                rule = " (quantity x unit_price)" if label == "line_total" else ""
                return (f"Line {index + 1} (order {want[0]}) should have the {label} {value}"
                        f"{rule}, not {short_repr(text, 30)}.")
        return None

    def _wrong_order(self, index, got, want):
        try:
            got_id = int(got)
        except ValueError:
            return (f"Data line {index + 1} starts with {short_repr(got, 30)}, not an order id: "
                    f"the columns are {','.join(LINE_COLUMNS)}.")
        if got_id in self.near["cancelled"]:
            return (f"Order {got_id} is cancelled: the export leaves cancelled orders out "
                    "(status != 'cancelled').")
        if got_id in self.near["at_until"]:
            return (f"Order {got_id} was placed at until exactly: the window includes since and "
                    "excludes until (since <= created_at < until).")
        if want in self.near["at_since"]:
            return (f"Order {want} was placed at since exactly and belongs in the export: "
                    "since <= created_at < until.")
        if got_id in self.near["wanted"]:
            return (f"Data line {index + 1} should belong to order {want}, not {got_id}: sort the "
                    "lines by order id, then by item id (ORDER BY orders.id, order_items.id).")
        return (f"Data line {index + 1} should belong to order {want}, not {got_id}: one line per "
                "item of the orders placed in the window (since <= created_at < until), cancelled "
                "ones left out, by order id.")


def _export_window(answer, window):
    """Run the learner's export on a fresh copy for ``window``: ``(sink, peak, statements, seen)``."""
    expected, near = _expected_export(window)
    engine = _lab_engine()
    sink = _LineSink(expected, near)
    seen, stop_watching = _watch_fetching(engine)
    since, until = _window(window)
    try:
        gc.collect()
        with count_queries(engine) as counted, track_memory() as memory:
            call_learner(answer, engine, sink, since, until)
    finally:
        stop_watching()
        engine.dispose()
    sink.finish()
    return sink, memory.peak_bytes, counted, seen


class _NightlyExportCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("04.q7", export_order_lines)')
        runs = {}
        for label, window in (("small", _SMALL_WINDOW), ("large", _LARGE_WINDOW)):
            sink, peak, counted, seen = _export_window(answer, window)
            self._judge_lines(sink, len(_expected_export(window)[0]))
            allowed = 3 + sink.rows // _LINES_PER_STATEMENT
            if counted.count > allowed:
                raise Incorrect(
                    f"Right lines, but {counted.count:,} statements for {sink.rows:,} lines: more "
                    f"than one per {_LINES_PER_STATEMENT} lines." + _repeated(counted.statements)
                    + " Fetch the lines with their product names in one joined query (streamed), "
                    "or in keyset batches of hundreds of lines.")
            runs[label] = (sink.rows, peak, seen)
        (small_rows, small, _), (large_rows, large, seen) = runs["small"], runs["large"]
        if large > _GROWTH * small + _GROWTH_SLACK:
            raise Incorrect(
                f"Right lines, but memory grows with the window: Python allocations peaked at "
                f"{format_bytes(small)} for {small_rows:,} lines and {format_bytes(large)} for "
                f"{large_rows:,}, five times the lines. Something holds every row: the result "
                "(.all()), a list of lines or the whole text (a StringIO). Stream the rows "
                "(yield_per) and write each batch as it arrives.")
        if not (any(stream for stream, _ in seen)
                or (len(seen) > 1 and all(limited for _, limited in seen))):
            raise Incorrect(
                "Right lines and flat memory on SQLite, which hands rows over one by one, but the "
                "query uses a client-side cursor: on PostgreSQL the driver receives the whole "
                "result before your first row (memory tracemalloc cannot see). Ask for a "
                "server-side cursor with execution_options(yield_per=...) (or stream_results=True), "
                "or fetch keyset batches (WHERE ... > :last ... LIMIT).")

    @staticmethod
    def _judge_lines(sink, expected_rows):
        if sink.most_lines_per_write > _MOST_LINES_PER_WRITE:
            raise Incorrect(
                f"Your export handed out {sink.most_lines_per_write:,} lines in one write: it built "
                "the text in memory first (a StringIO, a joined string, a list of lines). Write "
                "each batch as it arrives: csv.writer(out) straight on out.")
        header = ",".join(LINE_COLUMNS)
        if sink.header is None:
            raise Incorrect("Nothing was written to out: create csv.writer(out), write the header, "
                            "then one line per order item.")
        if sink.header != header:
            raise Incorrect(f"The first line should be the header {header!r}, not "
                            f"{short_repr(sink.header, 70)}.")
        if sink.problem:
            raise Incorrect(sink.problem)
        extra = int(sink.extra) if sink.extra and sink.extra.isdigit() else None
        if sink.rows > expected_rows and extra in sink.near["at_until"]:
            raise Incorrect(f"Order {extra} was placed at until exactly: the window includes "
                            "since and excludes until (since <= created_at < until).")
        if sink.rows > expected_rows and extra in sink.near["cancelled"]:
            raise Incorrect(f"Order {extra} is cancelled: the export leaves cancelled orders out "
                            "(status != 'cancelled').")
        if sink.rows != expected_rows:
            raise Incorrect(
                f"The hidden window has {expected_rows:,} order lines to export and your function "
                f"wrote {sink.rows:,}: every item of every order placed at or after since and "
                "before until, cancelled orders left out (an order placed at since exactly is in).")

    def model_answer(self):
        return ("def export_order_lines(engine, out, since, until):\n"
                "    statement = (\n"
                "        select(Order.id, Order.created_at, Product.name, OrderItem.quantity,\n"
                "               OrderItem.unit_price)\n"
                "        .join(OrderItem, OrderItem.order_id == Order.id)\n"
                "        .join(Product, Product.id == OrderItem.product_id)\n"
                "        .where(Order.created_at >= since, Order.created_at < until,\n"
                "               Order.status != \"cancelled\")\n"
                "        .order_by(Order.id, OrderItem.id)\n"
                "        .execution_options(yield_per=1000))\n"
                "    writer = csv.writer(out)\n"
                "    writer.writerow(LINE_COLUMNS)\n"
                "    with engine.connect() as conn:\n"
                "        for rows in conn.execute(statement).partitions():\n"
                "            writer.writerows((o, t.date().isoformat(), name, q, price, q * price)\n"
                "                             for o, t, name, q, price in rows)")


# 04.q8: the category report in one aggregate statement

#: Hidden values of since: one at an order's exact time (it is included), one earlier.
_REPORT_SINCES = (datetime(2025, 1, 1), datetime(2024, 6, 15, 10, 30))


def _report_rounds(engine):
    """Hidden data on the tiny copy: an empty category, one sold only in cancelled orders and one
    sold only before since; an order at since exactly with two lines of one category."""
    with engine.begin() as conn:
        top_order = conn.exec_driver_sql("SELECT max(id) FROM orders").scalar_one()
        top_product = conn.exec_driver_sql("SELECT max(id) FROM products").scalar_one()
        top_category = conn.exec_driver_sql("SELECT max(id) FROM categories").scalar_one()
        conn.execute(Category.__table__.insert(), [
            {"id": top_category + 1, "name": "aa gift cards"},     # no product at all
            {"id": top_category + 2, "name": "mm refurbished"},    # sold in cancelled orders only
            {"id": top_category + 3, "name": "zz vintage"}])       # sold before since only
        conn.execute(Product.__table__.insert(), [
            {"id": top_product + 1, "category_id": top_category + 2, "name": "old phone",
             "price": Decimal("40.00"), "active": True},
            {"id": top_product + 2, "category_id": top_category + 3, "name": "old lamp",
             "price": Decimal("25.50"), "active": True}])
        conn.execute(Order.__table__.insert(), [
            {"id": top_order + 1, "user_id": 1, "status": "cancelled", "total": Decimal("80.00"),
             "created_at": datetime(2025, 2, 1)},
            {"id": top_order + 2, "user_id": 2, "status": "delivered", "total": Decimal("25.50"),
             "created_at": datetime(2023, 3, 1)},
            {"id": top_order + 3, "user_id": 3, "status": "paid", "total": Decimal("51.00"),
             "created_at": _REPORT_SINCES[1]}])
        conn.execute(OrderItem.__table__.insert(), [
            {"order_id": top_order + 1, "product_id": top_product + 1, "quantity": 2,
             "unit_price": Decimal("40.00")},
            {"order_id": top_order + 2, "product_id": top_product + 2, "quantity": 1,
             "unit_price": Decimal("25.50")},
            {"order_id": top_order + 3, "product_id": 1, "quantity": 1, "unit_price": Decimal("19.99")},
            {"order_id": top_order + 3, "product_id": 1, "quantity": 2, "unit_price": Decimal("19.99")}])
    yield from _REPORT_SINCES


def _report_reference(engine, since, *, strict=False, every_line=False, cancelled=False,
                      drop_empty=False):
    """The report computed in Python from every line (the grader's reference and its variants)."""
    with engine.connect() as conn:
        names = dict(conn.execute(select(Category.id, Category.name)).all())
        lines = conn.execute(
            select(Product.category_id, Order.id, Order.status, Order.created_at,
                   OrderItem.quantity, OrderItem.unit_price)
            .join(Order, Order.id == OrderItem.order_id)
            .join(Product, Product.id == OrderItem.product_id)).all()
    orders, units, revenue, lines_counted = {}, Counter(), {}, Counter()
    for category, order_id, status, created_at, quantity, unit_price in lines:
        if (created_at <= since if strict else created_at < since):
            continue
        if status == "cancelled" and not cancelled:
            continue
        orders.setdefault(category, set()).add(order_id)
        lines_counted[category] += 1
        units[category] += quantity
        revenue[category] = revenue.get(category, Decimal(0)) + quantity * Decimal(str(unit_price))
    rows = []
    for category, name in sorted(names.items(), key=lambda item: item[1]):
        if drop_empty and category not in orders:
            continue
        count = lines_counted[category] if every_line else len(orders.get(category, ()))
        rows.append((name, count, units[category],
                     revenue.get(category, Decimal(0)).quantize(Decimal("0.01"))))
    return rows


def _as_report(result):
    if not isinstance(result, (list, tuple)) or isinstance(result, str):
        raise Incorrect("Return a list of tuples (category, orders, units, revenue), one per "
                        f"category in name order, not a {type_name(result)}.")
    rows = []
    for row in result:
        try:
            name, orders, units, revenue = tuple(row)
            rows.append((str(name), int(orders), int(units),
                         Decimal(str(revenue)).quantize(Decimal("0.01"))))
        except (TypeError, ValueError, InvalidOperation):
            raise Incorrect(f"Each row should be (category, orders, units, revenue), not "
                            f"{short_repr(row, 60)}.") from None
    return rows


def _same_report(got, want):
    return len(got) == len(want) and all(
        g[:3] == w[:3] and abs(g[3] - w[3]) <= Decimal("0.011") for g, w in zip(got, want))


class _CategoryReportCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("04.q8", category_report)')
        engine = private_dataset()
        try:
            for since in _report_rounds(engine):
                expected = _report_reference(engine, since)
                with count_queries(engine) as counted:
                    got = _as_report(call_learner(answer, engine, since))
                if not _same_report(got, expected):
                    raise Incorrect(self._why(engine, since, got, expected))
                if counted.count > 1:
                    raise Incorrect(
                        f"Right report, but {counted.count} statements and 1 is needed."
                        + _repeated(counted.statements)
                        + " Join categories to the period's lines and GROUP BY the category: "
                        "one pass, every count at once.")
                sql = " ".join(s.sql for s in counted.statements)
                if not (re.search(r"\b(count|sum)\s*\(", sql, re.I)
                        and re.search(r"\bgroup\s+by\b", sql, re.I)):
                    raise Incorrect(
                        "Right report in one statement, but the statement sends every line to "
                        "Python to be added up there: let the database aggregate (count(DISTINCT "
                        "...), sum(...) ... GROUP BY the category), so one row per category "
                        "crosses the wire.")
        finally:
            engine.dispose()

    @staticmethod
    def _why(engine, since, got, expected):
        when = f"With since = {since:%Y-%m-%d %H:%M}"
        if [r[0] for r in got] != [r[0] for r in expected]:
            missing = [r[0] for r in expected if r[0] not in {g[0] for g in got}]
            if missing:
                return (f"{when}, the categories {', '.join(map(repr, missing[:3]))} are missing: "
                        "every category is in the report, with zeros when nothing of it sold. "
                        "Start from categories with a LEFT JOIN, and keep the period's "
                        "conditions out of WHERE (in the ON clause, or in a subquery of the "
                        "period's lines), where they would drop the empty ones.")
            return (f"{when}, your categories are {short_repr([g[0] for g in got], 60)}: one row "
                    "per category, sorted by name.")
        variants = [
            (dict(every_line=True), "counts order lines, not orders: an order with two lines in a "
             "category is one order there. count(DISTINCT order id)."),
            (dict(cancelled=True), "counts cancelled orders too: leave them out "
             "(status != 'cancelled')."),
            (dict(strict=True), "leaves out the order placed at since exactly: the period starts "
             "at since, included (created_at >= since)."),
        ]
        for variant, text in variants:
            if _same_report(got, _report_reference(engine, since, **variant)):
                return f"{when}, your report {text}"
        for g, w in zip(got, expected):
            if g != w:
                if w[1] == 0 and g[1] == 0 and g[2:] != w[2:]:
                    return (f"{when}, {w[0]!r} sold nothing in the period yet shows units or "
                            "revenue: its lines outside the period (cancelled, or earlier) must "
                            "not count. Filter the lines before you join them to categories.")
                return (f"{when}, the row of {w[0]!r} should be {w}, not {g}: the lines of orders "
                        "placed at or after since, cancelled ones left out; revenue is quantity x "
                        "unit_price summed.")
        return f"{when}, your report differs from the expected one."

    def model_answer(self):
        return ("def category_report(engine, since):\n"
                "    per_category = (\n"
                "        select(Product.category_id.label(\"category_id\"),\n"
                "               func.count(OrderItem.order_id.distinct()).label(\"orders\"),\n"
                "               func.sum(OrderItem.quantity).label(\"units\"),\n"
                "               func.sum(OrderItem.quantity * OrderItem.unit_price).label(\"revenue\"))\n"
                "        .join(Order, Order.id == OrderItem.order_id)\n"
                "        .join(Product, Product.id == OrderItem.product_id)\n"
                "        .where(Order.created_at >= since, Order.status != \"cancelled\")\n"
                "        .group_by(Product.category_id).subquery())\n"
                "    statement = (\n"
                "        select(Category.name, func.coalesce(per_category.c.orders, 0),\n"
                "               func.coalesce(per_category.c.units, 0),\n"
                "               func.coalesce(per_category.c.revenue, 0))\n"
                "        .outerjoin(per_category, per_category.c.category_id == Category.id)\n"
                "        .order_by(Category.name))\n"
                "    with engine.connect() as conn:\n"
                "        return [(name, orders, units, Decimal(str(revenue)).quantize(Decimal(\"0.01\")))\n"
                "                for name, orders, units, revenue in conn.execute(statement)]")


# 04.q9: the hot function of the nightly job


def _function_name(text):
    name = text.strip().strip("`'\"").strip()
    name = re.sub(r"\(.*\)$", "", name).strip()
    return name.rsplit(".", 1)[-1]


class _HotFunctionCheck(Checker):
    def grade(self, answer):
        if not isinstance(answer, str) or not answer.strip():
            raise Incorrect("Answer with the function's name as a string, as the profile shows it, "
                            f'e.g. "load_job_data" (got {short_repr(answer, 30)}).')
        job = made_in_this_kernel(current_job(), "nightly job", "run the lab's cells that make it "
                                  "(NightlyJob(...)) and profile job.run() first.")
        name = _function_name(answer)
        if name == job._hot:
            return
        if name in ("run", "NightlyJob", "<module>"):
            raise Incorrect(f"{name} is where you entered: it holds the whole run. Look one level "
                            "below it in the tree: which function it calls holds most of the time?")
        if name in JOB_STEPS:
            raise Incorrect(f"{name} is a step of the job, but a quick one in this run: compare the "
                            "times of the functions run() calls and take the largest.")
        raise Incorrect(f"{short_repr(answer, 40)} is no function the job calls directly: name the "
                        "function of memory_and_cpu.py, called by run(), whose frame holds most of "
                        "the time (the frames under it are the code inside it).")

    def model_answer(self):
        return ("the function called by run() whose frame holds most of the profile's time "
                "(it depends on the hidden seed)")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="04.q1",
        title="Memory that keeps growing (interview question 7)",
        checker=MultiChoice(
            options={
                "a": "Call gc.collect() after every request, so the big lists and query "
                "results the worker still holds are given back",
                "b": "Walk big tables in batches or stream them (yield_per, server-side "
                "cursors) instead of loading every row",
                "c": "Select only the columns you need (ids instead of whole ORM objects)",
                "d": "Memoise the loaders with lru_cache(maxsize=None), so each row is built "
                "once and shared instead of copied",
                "e": "Bound every cache and registry that outlives a request "
                "(lru_cache(maxsize=...), TTLs) and drop references you no longer need",
                "f": "Watch the tracemalloc peak alone: if Python allocations stay flat, the "
                "process is not growing",
                "g": "Compare tracemalloc snapshots and the RSS over time to find what grows",
                "h": "Avoid reference cycles that hold big objects, or break them (weakref)",
                "i": "Set the loop variable to None at the end of each iteration, so each row "
                "is freed while the list is walked",
            },
            correct={"b", "c", "e", "g", "h"},
            explanations={
                "a": "gc.collect() only frees unreachable objects (cycles): a list the worker "
                "still references stays whole, as the chapter measured.",
                "d": "An unbounded cache keeps every argument and result alive for the life of "
                "the process: that is a leak in slow motion, not a saving. Bound it.",
                "f": "tracemalloc sees only Python's allocator: a driver's buffer (the "
                "client-side cursor on PostgreSQL) grew the RSS while tracemalloc stayed flat.",
                "i": "The list still references every element: rebinding the loop variable "
                "frees nothing. Drop the list, or never build it (stream).",
            },
        ),
        explanation="Memory grows when a process holds more than it needs at once (whole "
        "tables, all columns) or keeps what it no longer needs (unbounded caches, globals, "
        "cycles). Stream and batch, select less, bound caches, break cycles, and measure what "
        "grows with tracemalloc snapshots and RSS over time (tracemalloc alone misses C "
        "memory); chapter 09 hunts real leaks. A forced gc.collect() frees only garbage that "
        "already was unreachable.",
    ),
    Question(
        id="04.q2",
        title="What gc.collect() frees",
        checker=Choice(
            options={
                "a": "Most of the memory of orders: a collection frees the objects the code "
                "is not using at that moment",
                "b": "Nothing yet: the objects become collectable once the loop over orders "
                "ends, at the next automatic collection",
                "c": "Nothing, ever: CPython gives memory back to the system only when the "
                "worker process exits",
                "d": "Nothing of orders: it is still referenced; del orders (the last "
                "reference) frees it at once",
            },
            correct="d",
            explanations={
                "a": "The collector frees unreachable objects only. orders is reachable from "
                "your variable: every element stays.",
                "b": "Finishing a loop drops no reference: the variable orders still holds the "
                "list, and the list every object. No collection frees them until it goes.",
                "c": "Reference counting frees an object the moment its last reference goes: "
                "del orders freed almost everything in the experiment.",
            },
        ),
        explanation="CPython frees by reference counting, immediately; the cycle collector "
        "(gc) only finds groups of objects that reference each other and nothing else does. "
        "While orders is referenced, gc.collect() frees none of it.",
    ),
    Question(
        id="04.q3",
        title="A streaming CSV export with a join",
        checker=_ExportCheck(),
        explanation="yield_per opens a server-side cursor (stream_results) and keeps one batch "
        "of rows in memory, csv.writer writes each batch as it arrives: the peak stays flat "
        "however many orders there are, and the join runs in the database. .all() holds every "
        "row before the first line is written.",
        hints=("Start from select(Order.id, User.email, Order.status, Order.total)"
               ".join(User, User.id == Order.user_id).order_by(Order.id).",),
        time_limit=15.0,
    ),
    Question(
        id="04.q4",
        title="Products in more than k orders, in one query",
        checker=_PopularProductsCheck(),
        explanation="GROUP BY product_id HAVING count(DISTINCT order_id) > k makes the database "
        "count and filter: one round trip, and only the answer crosses the wire. DISTINCT "
        "because one order may list a product on two lines.",
        time_limit=15.0,
    ),
    Question(
        id="04.q5",
        title="Memoise a function of versioned data",
        checker=_MemoCheck(),
        explanation="Putting the data version in the key makes stale entries unreachable: a "
        "change of version turns every lookup into a miss, and the LRU bound pushes the old "
        "entries out first, since nothing uses them any more. functools.lru_cache keys on the "
        "arguments and keeps at most maxsize results.",
    ),
    Question(
        id="04.q6",
        title="Three band counts in one query",
        checker=_BandCountsCheck(),
        explanation="One pass over orders computes every count: `count(*) FILTER (WHERE ...)` "
        "(PostgreSQL, SQLite 3.30+) or the portable `sum(CASE WHEN ... THEN 1 ELSE 0 END)`. "
        "Three COUNT queries scan the table three times and pay three round trips; a GROUP BY "
        "on a CASE leaves empty bands out.",
        time_limit=15.0,
    ),
    Question(
        id="04.q7",
        title="Lab: the nightly export in bounded memory",
        checker=_NightlyExportCheck(),
        explanation="One joined query streamed with yield_per (a server-side cursor on "
        "PostgreSQL), each batch written as it arrives: the process holds one batch, whatever "
        "the window, where the app's export held the ORM objects, a list of lines and the whole "
        "text, each as big as the window. csv.writer quotes names with commas and quotes.",
        time_limit=15.0,
    ),
    Question(
        id="04.q8",
        title="Lab: the category report in one query",
        checker=_CategoryReportCheck(),
        explanation="Aggregate the period's lines per category (count(DISTINCT order), sums, "
        "GROUP BY) and LEFT JOIN the categories to that, so the empty ones stay with zeros "
        "(conditions on a left-joined table in WHERE would drop them): one statement and one "
        "pass, where the app sent one COUNT per category and held every line in Python.",
        time_limit=15.0,
    ),
    Question(
        id="04.q9",
        title="Lab: the hot function of the nightly job",
        checker=_HotFunctionCheck(),
        explanation="A profile is read from the top down: under the function you ran, the child "
        "holding most of the time is where to look; its source says why: a pass over a list "
        "for each element, a quadratic loop.",
    ),
]
