"""Chapter 04, memory and CPU: memory growth, streaming exports, aggregates in SQL, memoising.

Practical questions run on the grader's own data: a private in-memory copy of the ``tiny``
dataset (queries and results, on hidden parameters), or an in-memory table of generated orders
(the streaming export, graded by the rows written and by the peak of Python allocations on that
fixed workload: a count of bytes, never a time).
"""

from __future__ import annotations

import gc
import random
from datetime import datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from perfcourse.chapters.memory_and_cpu import (
    ORDER_CSV_COLUMNS,
    CountingSink,
    lru_misses,
    more_than_statement,
    status_counts_filter,
)
from perfcourse.memory import track_memory
from perfcourse.models import ORDER_STATUSES, Order
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
    short_repr,
    type_name,
)
from ..datasets import private_dataset

__all__ = [
    "EXPORT_PEAK_LIMIT_BYTES",
    "EXPORT_ROWS",
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# 04.q3: a streaming CSV export

#: Orders in the grader's export workload, and the peak of Python memory an export may reach.
EXPORT_ROWS = 30_000
EXPORT_PEAK_LIMIT_BYTES = 4_000_000


def _generated_orders():
    """An in-memory SQLite database whose ``orders`` table holds EXPORT_ROWS generated orders."""


    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    Order.__table__.create(engine)
    rng = random.Random(2004)
    start = datetime(2024, 1, 1)
    rows = [{"id": i, "user_id": rng.randint(1, 5000), "status": rng.choice(ORDER_STATUSES),
             "total": Decimal(rng.randint(100, 99_999)) / 100,
             "created_at": start + timedelta(minutes=7 * i)} for i in range(1, EXPORT_ROWS + 1)]
    with engine.begin() as conn:
        conn.execute(Order.__table__.insert(), rows)
    engine.perfcourse_namespace = "grader_export"
    return engine


class _ExportCheck(Checker):
    def grade(self, answer):


        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q3\", export_orders_csv) "
                            f"(got a {type_name(answer)}).")
        engine = _generated_orders()
        try:
            sink = CountingSink()
            gc.collect()
            with track_memory() as memory:
                call_learner(answer, engine, sink)
        finally:
            engine.dispose()
        header = ",".join(ORDER_CSV_COLUMNS)
        if sink.header is None:
            raise Incorrect("Nothing was written to the sink: create csv.writer(sink) and write "
                            "the header, then the rows.")
        if sink.header != header:
            raise Incorrect(f"The first line should be the header {header!r}, "
                            f"not {short_repr(sink.header, 60)}.")
        if sink.rows != EXPORT_ROWS:
            raise Incorrect(f"The grader's table has {EXPORT_ROWS:,} orders and your export wrote "
                            f"{sink.rows:,} data lines: every order, one line each.")
        expected_ids = EXPORT_ROWS * (EXPORT_ROWS + 1) // 2
        if sink.id_sum != expected_ids:
            raise Incorrect("Every order has a line, but the first column is not always the "
                            "order id: write the columns in the order of the header.")
        if memory.peak_bytes > EXPORT_PEAK_LIMIT_BYTES:
            raise Incorrect(
                f"Right rows, but Python memory peaked at {format_bytes(memory.peak_bytes)} "
                f"during the export (limit {format_bytes(EXPORT_PEAK_LIMIT_BYTES)} for "
                f"{EXPORT_ROWS:,} orders): the rows were held all at once. Stream them with "
                "execution_options(yield_per=...) and write each batch as it arrives.")

    def model_answer(self):
        return ("def export_orders_csv(engine, sink):\n"
                "    writer = csv.writer(sink)\n"
                "    writer.writerow(ORDER_CSV_COLUMNS)\n"
                "    statement = (select(Order.id, Order.user_id, Order.status, Order.total,\n"
                "                        Order.created_at).order_by(Order.id)\n"
                "                 .execution_options(yield_per=1000))\n"
                "    with engine.connect() as conn:\n"
                "        for rows in conn.execute(statement).partitions():\n"
                "            writer.writerows(rows)")


# --------------------------------------------------------------------------------------------
# 04.q4: users with more than k orders, in one query


def _more_than_reference(session, k):
    return list(session.execute(more_than_statement(k)).scalars())


def _as_sorted_ids(result):
    try:
        ids = [int(getattr(r, "id", r)) for r in result]
    except (TypeError, ValueError):
        raise Incorrect("Return a list of user ids (integers), e.g. "
                        f"list(conn.execute(...).scalars()) (got {short_repr(result, 60)}).") \
            from None
    return sorted(ids)


class _HeavyUsersCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q4\", users_with_more_than) "
                            f"(got a {type_name(answer)}).")
        engine = private_dataset()
        try:
            rng = random.Random(2044)
            for k in (0, 7, rng.randint(2, 5), rng.randint(8, 11), 1000):
                checker = QueryCheck(
                    reference=lambda session, k: _more_than_reference(session, k),
                    engine=engine, max_queries=1, args=(k,),
                    use=_as_sorted_ids,
                    hint="GROUP BY the user and keep the groups with HAVING count(*) > k.")
                try:
                    checker.grade(lambda session, k: answer(engine, k))
                except NoAnswer:
                    raise
                except Incorrect as exc:
                    if str(exc).startswith("Your loader returns other rows"):
                        raise Incorrect(
                            f"For k={k} your function returns other users than expected: the "
                            "users with MORE than k orders (every status counts), as ids.") \
                            from None
                    raise

            with count_queries(engine) as counted:
                call_learner(answer, engine, 3)
            if not any("GROUP BY" in s.sql.upper() for s in counted.statements):
                raise Incorrect("Right users in one query, but the query sends every order to "
                                "Python to be counted there: let the database count with "
                                "GROUP BY ... HAVING, so only the answer crosses the wire.")
        finally:
            engine.dispose()

    def model_answer(self):
        return ("def users_with_more_than(engine, k):\n"
                "    statement = (select(Order.user_id).group_by(Order.user_id)\n"
                "                 .having(func.count() > k).order_by(Order.user_id))\n"
                "    with engine.connect() as conn:\n"
                "        return list(conn.execute(statement).scalars())")


# --------------------------------------------------------------------------------------------
# 04.q5: a memoised calculation, graded by how often the expensive function runs


def _memo_sequences():
    rng = random.Random(2045)
    keys = [(product, currency) for product in range(1, 9) for currency in ("EUR", "USD")]
    weights = [1 / (i + 1) for i in range(len(keys))]
    yield [(1, "EUR"), (1, "EUR"), (2, "EUR"), (1, "USD"), (1, "EUR")], 2, ()
    yield rng.choices(keys, weights=weights, k=80), 4, (40,)
    yield rng.choices(keys, weights=weights, k=120), 16, (30, 90)


def _price(product_id, currency):
    return Decimal(product_id * 100 + len(currency)) / 7


class _MemoCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q5\", make_cached) "
                            f"(got a {type_name(answer)}).")
        for sequence, maxsize, clear_at in _memo_sequences():
            calls = []

            def expensive(product_id, currency, calls=calls):
                calls.append((product_id, currency))
                return _price(product_id, currency)

            cached = call_learner(answer, expensive, maxsize)
            if not callable(cached):
                raise Incorrect("make_cached must return a function (the cached version of "
                                f"`compute`), not a {type_name(cached)}.")
            if not callable(getattr(cached, "cache_clear", None)):
                raise Incorrect("The cached function needs a cache_clear() method, so callers "
                                "can invalidate it (functools.lru_cache gives one).")
            expected_misses = 0
            start = 0
            for stop in (*clear_at, len(sequence)):
                expected_misses += lru_misses(sequence[start:stop], maxsize)
                for product_id, currency in sequence[start:stop]:
                    got = call_learner(cached, product_id, currency)
                    if got != _price(product_id, currency):
                        raise Incorrect(f"cached({product_id}, {currency!r}) returned "
                                        f"{short_repr(got, 40)}, not what compute returns.")
                if stop != len(sequence):
                    call_learner(cached.cache_clear)
                start = stop
            if len(calls) != expected_misses:
                more = "more" if len(calls) > expected_misses else "fewer"
                raise Incorrect(
                    f"On a hidden sequence of {len(sequence)} calls with maxsize={maxsize}"
                    f"{' and cache_clear() in the middle' if clear_at else ''}, the expensive "
                    f"function ran {len(calls)} times, {more} than an LRU cache of that size "
                    f"would ({expected_misses}). Keep at most maxsize results, dropping the least "
                    "recently used; cache_clear() must empty the cache.")

    def model_answer(self):
        return ("def make_cached(compute, maxsize):\n"
                "    return functools.lru_cache(maxsize=maxsize)(compute)")


# --------------------------------------------------------------------------------------------
# 04.q6: five COUNTs in one query


def _status_counts_reference(session):
    return status_counts_filter(session.get_bind())


def _as_counts(result):
    if not isinstance(result, dict):
        raise Incorrect(f"Return a dict status -> count, not a {type_name(result)}.")
    try:
        return {str(k): int(v) for k, v in result.items()}
    except (TypeError, ValueError):
        raise Incorrect("Every count should be an integer.") from None


class _StatusCountsCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"04.q6\", status_counts) "
                            f"(got a {type_name(answer)}).")
        engine = private_dataset()
        try:
            with engine.begin() as conn:  # hidden data: move some orders to another status
                conn.exec_driver_sql("UPDATE orders SET status = 'cancelled' WHERE id % 11 = 3")
            QueryCheck(reference=_status_counts_reference, engine=engine, max_queries=1,
                       use=_as_counts,
                       hint="One SELECT with one aggregate per status: count(*) FILTER (WHERE "
                       "...) or sum(CASE WHEN ... THEN 1 ELSE 0 END).").grade(
                lambda session: answer(engine))
        finally:
            engine.dispose()


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="04.q1",
        title="Memory that keeps growing (interview question 7)",
        checker=MultiChoice(
            options={
                "a": "Walk big tables in batches or stream them (yield_per, server-side "
                "cursors) instead of loading every row",
                "b": "Select only the columns you need (ids instead of whole ORM objects)",
                "c": "Bound every cache and registry that lives longer than a request "
                "(lru_cache(maxsize=...), TTLs) and drop references you no longer need",
                "d": "Compare tracemalloc snapshots (or RSS over time) to find what grows",
                "e": "Call gc.collect() after every request: it shrinks the lists you still hold",
                "f": "Set the loop variable to None at the end of each iteration over a list",
                "g": "Avoid reference cycles that hold big objects, or break them (weakref)",
            },
            correct={"a", "b", "c", "d", "g"},
            explanations={
                "e": "gc.collect() only frees unreachable objects (cycles): a list you still "
                "reference stays whole; this chapter measured it.",
                "f": "The list still references every element: rebinding the loop variable "
                "frees nothing. Drop the list, or never build it (stream).",
            },
        ),
        explanation="Memory grows when a process holds more than it needs at once (whole "
        "tables, all columns) or keeps what it no longer needs (unbounded caches, globals, "
        "cycles). Stream and batch, select less, bound caches, break cycles, and measure what "
        "grows with tracemalloc snapshots or RSS over time; chapter 09 hunts real leaks. A "
        "forced gc.collect() frees only garbage that already was unreachable.",
    ),
    Question(
        id="04.q2",
        title="What gc.collect() frees",
        checker=Choice(
            options={
                "a": "Most of the memory of `orders`: a collection frees what is not in use",
                "b": "Nothing of `orders`: it is still referenced; `del orders` (the last "
                "reference) frees it at once",
                "c": "Nothing, ever: Python returns memory only when the process ends",
                "d": "Only the ORM objects, not the list",
            },
            correct="b",
            explanations={
                "a": "The collector frees unreachable objects only. `orders` is reachable from "
                "your variable: every element stays.",
                "c": "Reference counting frees an object the moment its last reference goes: "
                "`del orders` freed almost everything in the experiment.",
                "d": "The list references every object: they stay as long as the list does.",
            },
        ),
        explanation="CPython frees by reference counting, immediately; the cycle collector "
        "(gc) only finds groups of objects that reference each other and nothing else does. "
        "While `orders` is referenced, gc.collect() frees none of it.",
    ),
    Question(
        id="04.q3",
        title="A streaming CSV export",
        checker=_ExportCheck(),
        explanation="yield_per keeps one batch of rows in memory (a server-side cursor on "
        "PostgreSQL), csv.writer writes each batch as it arrives: the peak stays flat however "
        "many orders there are; .all() holds every row before the first line is written.",
        hints=("Start from select(Order.id, Order.user_id, Order.status, Order.total, "
               "Order.created_at).order_by(Order.id).",),
        time_limit=60.0,
    ),
    Question(
        id="04.q4",
        title="Users with more than k orders, in one query",
        checker=_HeavyUsersCheck(),
        explanation="GROUP BY user_id HAVING count(*) > k makes the database count and filter: "
        "one round trip, and only the answer crosses the wire. A Python loop over every order "
        "is O(n) at best (a dict), O(n^2) with nested loops.",
        time_limit=30.0,
    ),
    Question(
        id="04.q5",
        title="Memoise an expensive function",
        checker=_MemoCheck(),
        explanation="functools.lru_cache keys on the arguments, keeps at most maxsize results "
        "(least recently used out first), counts hits and misses in cache_info() and forgets "
        "everything on cache_clear(): the invalidation you must call when the data changes.",
    ),
    Question(
        id="04.q6",
        title="Five counts in one query",
        checker=_StatusCountsCheck(),
        answer="def status_counts(engine):\n"
        "    columns = [func.count().filter(Order.status == s).label(s)\n"
        "               for s in ORDER_STATUSES]\n"
        "    with engine.connect() as conn:\n"
        "        return dict(conn.execute(select(*columns)).one()._mapping)",
        explanation="One pass over orders computes every count: `count(*) FILTER (WHERE ...)` "
        "(PostgreSQL, SQLite 3.30+) or the portable `sum(CASE WHEN ... THEN 1 ELSE 0 END)`. "
        "Five COUNT queries scan the table five times and pay five round trips.",
        time_limit=30.0,
    ),
]
