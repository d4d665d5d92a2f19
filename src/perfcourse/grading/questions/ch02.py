"""Chapter 02, query optimisation: N+1, loader strategies, indexes, plans, the slow report lab.

Practical questions are graded on a private in-memory copy of the ``tiny`` dataset (never the
learner's own database, so an index the learner added there changes nothing), on inputs the
learner has not seen, by query counts, result equality and query plans.
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import StaticPool

from perfcourse.chapters.query_optimization import explain_recorded, top_customers_report
from perfcourse.explain import explain
from perfcourse.models import Base, Order, User
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    ExplainCheck,
    Incorrect,
    MultiChoice,
    QueryCheck,
    call_learner,
    short_repr,
    type_name,
)
from ..datasets import private_dataset

__all__ = [
    "LAB_QUERY_BUDGET",
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# Private databases of the grader


def _empty_schema():
    """A fresh in-memory SQLite database with the shop schema and no rows: plans only."""


    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    Base.metadata.create_all(engine)
    return engine


# --------------------------------------------------------------------------------------------
# 02.q3: a loader that issues at most 2 queries


def _users_with_orders_reference(session, user_ids):


    return session.scalars(
        select(User).where(User.id.in_(user_ids)).order_by(User.id)
        .options(selectinload(User.orders))
    ).all()


def _orders_page(users):
    if not isinstance(users, (list, tuple)):
        try:
            users = list(users)
        except TypeError:
            raise Incorrect(f"Return a list of User objects (got a {type_name(users)}).") from None
    try:
        return [(u.id, u.email, sorted(o.id for o in u.orders)) for u in users]
    except AttributeError:
        raise Incorrect("Return User objects (with .orders), e.g. session.scalars(...).all().") \
            from None


def _q3_cases():
    rng = random.Random(2002)
    engine = private_dataset()
    yield QueryCheck(reference=_users_with_orders_reference, engine=engine, max_queries=2,
                     use=_orders_page, args=([3, 1, 2],),
                     hint="Add a loader option for User.orders to the users query.")
    for size in (1, 17, 60):
        ids = sorted(rng.sample(range(1, 201), size))
        yield QueryCheck(reference=_users_with_orders_reference, engine=engine, max_queries=2,
                         use=_orders_page, args=(ids,),
                         hint="Add a loader option for User.orders to the users query.")
    engine.dispose()


class _LoaderCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your loader function itself, e.g. check(\"02.q3\", "
                            f"load_users_with_orders) (got a {type_name(answer)}).")
        for checker in _q3_cases():
            checker.grade(answer)


# --------------------------------------------------------------------------------------------
# 02.q5: a predicate an index can serve


def _orders_on_reference(day):


    start = datetime(day.year, day.month, day.day)
    return select(Order.id).where(Order.created_at >= start,
                                  Order.created_at < start + timedelta(days=1)).order_by(Order.id)


class _SargableCheck(Checker):
    """The learner's ``orders_on(day)`` must return the right rows and search the index."""

    index = "ix_orders_created_at"

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"02.q5\", orders_on) "
                            f"(got a {type_name(answer)}).")
        engine = private_dataset((f"CREATE INDEX {self.index} ON orders (created_at)",))
        try:
            with engine.connect() as conn:
                days = [row[0] for row in conn.exec_driver_sql(
                    "SELECT DISTINCT substr(created_at, 1, 10) FROM orders ORDER BY 1")]
            rng = random.Random(2005)
            picked = [days[0], days[-1], *rng.sample(days, 4)]
            for text in picked:
                day = date.fromisoformat(text)
                statement = call_learner(answer, day)
                try:
                    with engine.connect() as conn:
                        got = sorted(conn.execute(statement).scalars())
                except Exception as exc:  # noqa: BLE001 - reported as the learner's error
                    raise Incorrect(
                        f"Running your statement for {day} failed: {type(exc).__name__}. Return "
                        "a select() of Order.id.") from None
                with engine.connect() as conn:
                    expected = sorted(conn.execute(_orders_on_reference(day)).scalars())
                if got != expected:
                    raise Incorrect(
                        f"For the day {day} your query returns {len(got)} order ids, the right "
                        f"answer has {len(expected)}: orders placed from midnight (included) to "
                        "the next midnight (excluded).")
                plan = explain(engine, statement)
                if plan.index != self.index or plan.verdict not in (
                        "index search", "covering index search"):
                    raise Incorrect(
                        f"Right rows, but the plan is a {plan.verdict} and does not search "
                        f"{self.index}: a function around the column hides it from the index. "
                        "Compare the bare column with a range instead.")
        finally:
            engine.dispose()

    def model_answer(self):
        return ("def orders_on(day):\n"
                "    start = datetime(day.year, day.month, day.day)\n"
                "    return (select(Order.id)\n"
                "            .where(Order.created_at >= start,\n"
                "                   Order.created_at < start + timedelta(days=1))\n"
                "            .order_by(Order.id))")


# --------------------------------------------------------------------------------------------
# The lab: 02.q8 (the report within a query budget), 02.q9 (index-served plans)


def _money_equal(a, b) -> bool:
    if isinstance(a, (Decimal, int, float)) and isinstance(b, (Decimal, int, float)):
        return abs(Decimal(str(a)) - Decimal(str(b))) < Decimal("0.005")
    return a == b


def _report_equal(got, expected) -> bool:
    if not isinstance(got, (list, tuple)) or len(got) != len(expected):
        return False
    for row, ref in zip(got, expected):
        if not isinstance(row, dict) or set(row) != set(ref):
            return False
        for key, value in ref.items():
            other = row[key]
            if key == "recent":
                other = list(other) if isinstance(other, (list, tuple)) else other
            if key == "spent":
                if not _money_equal(other, value):
                    return False
            elif other != value:
                return False
    return True


LAB_QUERY_BUDGET = 4
#: Tables whose full reads fail 02.q9 (categories has 40 rows; CTEs are read whole by design).
_BIG_TABLES = ("orders", "order_items", "users", "products")


def _lab_cases():
    yield (datetime(2025, 6, 1), 10, 3)
    yield (datetime(2025, 9, 15, 12, 30), 3, 2)
    yield (datetime(2024, 2, 29), 7, 5)
    yield (datetime(2023, 5, 1), 1, 1)


class _ReportCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"02.q8\", fast_report) "
                            f"(got a {type_name(answer)}).")
        engine = private_dataset()
        try:
            for since, top, recent in _lab_cases():
                checker = QueryCheck(
                    reference=top_customers_report, engine=engine,
                    max_queries=LAB_QUERY_BUDGET, args=(since, top, recent),
                    compare=_report_equal,
                    hint=f"(Parameters: since={since:%Y-%m-%d %H:%M}, top={top}, "
                    f"recent={recent}.) Aggregate in SQL and load the leaders' orders in one go.")
                try:
                    checker.grade(answer)
                except Incorrect as exc:
                    text = str(exc)
                    if text.startswith("Your loader returns other rows"):
                        raise Incorrect(
                            f"For since={since:%Y-%m-%d %H:%M}, top={top}, recent={recent} your "
                            "report differs from the slow one: compare both on these parameters "
                            "(ties, cancelled orders, the order of 'recent').") from None
                    raise
        finally:
            engine.dispose()


class _LabIndexCheck(Checker):
    """The learner's DDL must make every table access of the reference report an index access."""

    def grade(self, answer):


        changes = answer if isinstance(answer, (list, tuple)) else [answer]
        if not changes or not all(isinstance(c, str) for c in changes):
            raise Incorrect("Answer with a list of CREATE INDEX statements (strings), "
                            f"got {short_repr(answer, 60)}.")
        engine = private_dataset()
        try:
            def apply():
                with engine.begin() as conn:
                    for ddl in changes:
                        for part in (p.strip() for p in ddl.split(";")):
                            if part:
                                conn.exec_driver_sql(part)

            call_learner(apply)
            for since, top, recent in _lab_cases():
                with Session(engine) as session, count_queries(engine) as counted:
                    top_customers_report(session, since, top, recent)
                for record in counted.statements:
                    if record.kind not in ("SELECT", "WITH"):
                        continue
                    plan = explain_recorded(engine, record)
                    scanned = [a.table for a in plan.accesses
                               if a.verdict in ("full scan", "full index scan")
                               and a.table in _BIG_TABLES]
                    if scanned:
                        raise Incorrect(
                            f"A query of the report still reads {', '.join(scanned)} in full "
                            f"({plan.summary()}): which column does its WHERE filter on?")
        finally:
            engine.dispose()

    def model_answer(self):
        return '["CREATE INDEX ix_orders_created_at ON orders (created_at)"]'


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="02.q1",
        title="N+1: counting the queries (interview question 2)",
        checker=Choice(
            options={
                "a": "1, 1 and 1: SQLAlchemy batches lazy loads",
                "b": "51, 2 and 1",
                "c": "51, 51 and 1",
                "d": "50, 2 and 2",
            },
            correct="b",
            explanations={
                "a": "Lazy loading sends one SELECT per `user.orders` touched; count them with "
                "count_queries.",
                "c": "selectinload loads every user's orders with one extra `IN (...)` query, "
                "whatever the number of users.",
                "d": "Count the query that loads the users too; and joinedload needs no second "
                "query, it joins.",
            },
        ),
        explanation="Lazy: 1 query for the users + 1 per user (N+1). selectinload (Rails "
        "`preload`): 1 + 1 `IN` query. joinedload (Rails `eager_load`): 1 query with a LEFT OUTER "
        "JOIN. A counter cache (`users.orders_count`) would need only the first query.",
    ),
    Question(
        id="02.q2",
        title="Optimising database performance (interview question 6)",
        checker=MultiChoice(
            options={
                "a": "Index the columns queries filter, join and sort on",
                "b": "Eager-load associations a page touches (selectinload/joinedload)",
                "c": "Pool connections instead of connecting per request",
                "d": "Send reads to replicas when one server is saturated",
                "e": "Log and review slow queries and their EXPLAIN plans",
                "f": "Index every column, just in case",
                "g": "Wrap indexed columns in lower()/date() in WHERE clauses",
            },
            correct={"a", "b", "c", "d", "e"},
            explanations={
                "f": "Every index slows every INSERT and UPDATE down (this chapter measured it) "
                "and takes space: index what queries need.",
                "g": "A function around a column hides it from a plain index: the query scans. "
                "Rewrite the predicate, or index the expression.",
            },
        ),
        explanation="Indexes, fewer round trips (eager loading), pooling, replicas and query "
        "analysis are the guide's five answers; each is measured in chapters 02 and 03.",
    ),
    Question(
        id="02.q3",
        title="A loader with at most 2 queries",
        checker=_LoaderCheck(),
        answer="def load_users_with_orders(session, user_ids):\n"
        "    return session.scalars(\n"
        "        select(User).where(User.id.in_(user_ids)).order_by(User.id)\n"
        "        .options(selectinload(User.orders))\n"
        "    ).all()",
        explanation="selectinload adds one `SELECT ... WHERE user_id IN (...)` for all users; "
        "joinedload would do it in one query with a join. Either way the page's loop over "
        "`user.orders` sends nothing more.",
        hints=("Start from select(User).where(User.id.in_(user_ids)).order_by(User.id) and add "
               ".options(...) with a loader strategy for User.orders.",),
    ),
    Question(
        id="02.q4",
        title="An index the plan uses",
        checker=ExplainCheck(
            statement="SELECT id, total FROM orders WHERE status = 'pending' "
            "AND created_at >= '2025-01-01'",
            engine=_empty_schema,
            verdicts=("index search", "covering index search"),
            hint="Index the columns of the WHERE clause: equality column first, range last.",
        ),
        answer='"CREATE INDEX ix_orders_status_created_at ON orders (status, created_at)"',
        explanation="A composite index with the equality column first and the range column "
        "second serves both conditions with one search; (created_at, status) would search on "
        "the range only.",
    ),
    Question(
        id="02.q5",
        title="Rewrite a predicate so the index serves it",
        checker=_SargableCheck(),
        explanation="`date(created_at) = :day` computes a value per row, so the index on "
        "created_at cannot be searched. The same rows are `created_at >= midnight AND "
        "created_at < next midnight`: a range on the bare column, an index search.",
        hints=("One day is the half-open range [midnight, next midnight).",),
    ),
    Question(
        id="02.q6",
        title="Composite index column order",
        checker=Choice(
            options={
                "a": "WHERE user_id = 42",
                "b": "WHERE user_id = 42 AND created_at >= '2025-01-01'",
                "c": "WHERE created_at >= '2025-01-01'",
                "d": "WHERE user_id = 42 ORDER BY created_at",
            },
            correct="c",
            explanations={
                "a": "user_id is the index's first column: its prefix, a search.",
                "b": "Both columns, equality first: the best case for this index.",
                "d": "Equality on the first column, and rows come out ordered by the second: "
                "a search with no sort step.",
            },
        ),
        explanation="An index on (user_id, created_at) is sorted by user_id first: without a "
        "condition on user_id there is no prefix to search, only a full scan (of the table or "
        "the index).",
    ),
    Question(
        id="02.q7",
        title="Which strategy repeats parent rows",
        checker=Choice(
            options={
                "a": "selectinload",
                "b": "joinedload",
                "c": "subqueryload",
                "d": "lazy loading",
            },
            correct="b",
            explanations={
                "a": "selectinload sends the users once and the orders once (`IN` list).",
                "c": "subqueryload re-runs the users query inside the orders query, but the "
                "users' columns are not sent once per order.",
                "d": "Lazy loading sends each user's row once (and one query per user).",
            },
        ),
        explanation="A LEFT OUTER JOIN returns one row per (user, order): every user column is "
        "repeated for each of the user's orders. Fine for many-to-one, costly for big "
        "collections; selectinload sends each row once.",
    ),
    Question(
        id="02.q8",
        title="Lab: the report within the query budget",
        checker=_ReportCheck(),
        answer="See perfcourse.chapters.query_optimization.top_customers_report: 3 queries (GROUP BY in SQL, the "
        "leaders' orders, units per category with joins).",
        explanation="Aggregating in the database and loading only the leaders' rows turns "
        "hundreds of round trips into a handful, whatever the number of customers.",
        time_limit=30.0,
    ),
    Question(
        id="02.q9",
        title="Lab: index-served plans",
        checker=_LabIndexCheck(),
        explanation="The report filters orders on created_at: an index on it turns the full "
        "scan into a search. Every other access already has an index (primary keys, foreign "
        "keys).",
        time_limit=30.0,
    ),
]
