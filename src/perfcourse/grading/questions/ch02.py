"""Chapter 02, query optimisation: N+1, loader strategies, indexes, plans, the slow report lab.

Practical questions are graded on private in-memory copies of the ``tiny`` dataset (never the
learner's own database, so an index the learner added there changes nothing), on inputs the
learner has not seen, by query counts, result equality and query plans. The lesson demonstrates
each technique on one case (``User.orders``, one day of orders, ``orders (user_id,
created_at)``); the exercises ask for it on another (an order's items and their products, a
month of sign-ups, products of a category under a price). The lab's hidden data adds customers
with equal spend, orders with equal timestamps and categories with equal units, so every
tie-break of the report's docstring is tested. The reference answers live here, private.
"""

from __future__ import annotations

import inspect
import random
import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.pool import StaticPool

from perfcourse.chapters.query_optimization import explain_recorded, top_customers_report_slow
from perfcourse.explain import Plan
from perfcourse.models import Base, Category, Order, OrderItem, Product, User
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    ExplainCheck,
    Incorrect,
    MultiChoice,
    NoAnswer,
    QueryCheck,
    call_learner,
    explain_or_hint,
    shorten,
    type_name,
)
from ..datasets import private_dataset

__all__ = [
    "LAB_QUERY_BUDGET",
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# Private databases of the grader


def _models_schema() -> sa.MetaData:
    """The shop schema as the models declare it, in a MetaData of its own.

    An ``sa.Index`` a learner builds on ``Order.__table__`` attaches itself to the models'
    metadata: a schema created from that metadata would already hold the learner's index, and
    the next check (of a wrong answer) would pass. Only the foreign-key indexes the models
    declare (``ix_<table>_<column>``) are kept.
    """
    metadata = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        copy = table.to_metadata(metadata)
        declared = {f"ix_{table.name}_{c.name}" for c in table.columns if c.index}
        for index in list(copy.indexes):
            if index.name not in declared:
                copy.indexes.discard(index)
    return metadata


def _empty_schema():
    """A fresh in-memory SQLite database with the shop schema and no rows: plans only."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    _models_schema().create_all(engine)
    return engine


# --------------------------------------------------------------------------------------------
# 02.q3: a loader for two levels of relationships in at most 2 queries
# (the lesson loads User.orders; here Order.items, and each item's product)


def _orders_with_items_reference(session, order_ids):
    return session.scalars(
        select(Order).where(Order.id.in_(order_ids)).order_by(Order.id)
        .options(selectinload(Order.items).joinedload(OrderItem.product))
    ).all()


def _items_page(orders):
    """What the page does with the result: every order's items, and each item's product."""
    if isinstance(orders, (str, bytes, dict, Order)) or not hasattr(orders, "__iter__"):
        raise Incorrect(f"Return a list of Order objects (got a {type_name(orders)}).")
    page = []
    for order in orders:
        try:
            items = sorted(order.items, key=lambda item: item.id)
            page.append((order.id, order.user_id,
                         [(item.id, item.product.name, item.quantity) for item in items]))
        except AttributeError:
            raise Incorrect("Return Order objects (with .items), e.g. "
                            "session.scalars(select(Order)...).all().") from None
    return page


def _compare_items_page(got, expected) -> bool:
    if got == expected:
        return True
    got_ids, expected_ids = [row[0] for row in got], [row[0] for row in expected]
    if got_ids != expected_ids and sorted(got_ids) == sorted(expected_ids):
        raise Incorrect("Right orders in the wrong order: return them ordered by id.")
    if len(got_ids) != len(set(got_ids)):
        raise Incorrect("Your loader returned an order twice: return each order once "
                        "(a joined collection needs .unique()).")
    if set(got_ids) != set(expected_ids):
        missing, extra = set(expected_ids) - set(got_ids), set(got_ids) - set(expected_ids)
        raise Incorrect(
            f"Your loader returned other orders than asked for ({len(missing)} missing, "
            f"{len(extra)} not in order_ids): return exactly the orders whose id is in "
            "order_ids.")
    raise Incorrect("Right orders, but their items or products differ from the database's.")


_Q3_HINT = ("Load Order.items and, chained on that option, each item's product: a many-to-one "
            "can ride along in the query that loads the items.")


class _LoaderCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your loader function itself, e.g. check(\"02.q3\", "
                            f"load_orders_with_items) (got a {type_name(answer)}).")
        rng = random.Random(2003)
        cases = [[12, 4, 9], *(sorted(rng.sample(range(1, 1001), size)) for size in (1, 25, 80)),
                 []]
        engine = private_dataset()
        try:
            for ids in cases:
                QueryCheck(reference=_orders_with_items_reference, engine=engine, max_queries=2,
                           use=_items_page, args=(ids,), compare=_compare_items_page,
                           hint=_Q3_HINT).grade(answer)
        finally:
            engine.dispose()

    def model_answer(self):
        return ("def load_orders_with_items(session, order_ids):\n"
                "    return session.scalars(\n"
                "        select(Order).where(Order.id.in_(order_ids)).order_by(Order.id)\n"
                "        .options(selectinload(Order.items).joinedload(OrderItem.product))\n"
                "    ).all()")


# --------------------------------------------------------------------------------------------
# 02.q4: a composite index that serves both conditions (the lesson: orders (user_id, created_at))


_Q4_SQL = ("SELECT id, name, price FROM products "
           "WHERE category_id = :category_id AND price <= :max_price")
_Q4_PARAMS = {"category_id": 7, "max_price": 40}
_SEARCH = re.compile(r"^SEARCH (?:TABLE )?products\b.*?USING (?:COVERING )?INDEX (\S+) \((.*)\)$")


def _searched_columns(plan) -> tuple[str | None, set[str]]:
    for line in plan.plan_text:
        found = _SEARCH.search(line.strip())
        if found:
            return found.group(1), set(re.findall(r"(\w+)\s*[<>=]", found.group(2)))
    return None, set()


class _BothConditionsCheck(Checker):
    """The plan must search one index on both conditions (equality and range)."""

    def grade(self, answer):
        seen = {}

        def explain_and_keep(engine, statement, params=None):
            seen["plan"] = explain_or_hint(engine, statement, params)
            return seen["plan"]

        ExplainCheck(statement=_Q4_SQL, engine=_empty_schema, params=_Q4_PARAMS,
                     verdicts=("index search", "covering index search"),
                     explain=explain_and_keep).grade(answer)
        index, columns = _searched_columns(seen["plan"])
        if {"category_id", "price"} <= columns:
            return
        if columns == {"category_id"}:
            raise Incorrect(
                f"The plan searches {index} on category_id only, then reads every product of the "
                "category to test the price: one index must serve both conditions, the "
                "equality column first.")
        if columns == {"price"}:
            raise Incorrect(
                f"The plan searches {index} on price only: a range first in the index leaves "
                "category_id to be tested row by row. Put the equality column first, the range "
                "column second.")
        raise Incorrect(f"The plan does not search one index on both conditions "
                        f"({seen['plan'].summary()}).")

    def model_answer(self):
        return '"CREATE INDEX ix_products_category_price ON products (category_id, price)"'


# --------------------------------------------------------------------------------------------
# 02.q5: a predicate an index can serve (the lesson: one day of orders; here a month of users)

#: Hidden months: the first and last of the data, a December (the year rolls over), a leap
#: February.
_Q5_MONTHS = ((2023, 12), (2024, 2), (2023, 1), (2024, 6), (2023, 9))
_Q5_INDEX = "ix_users_created_at"


def _next_month(year: int, month: int) -> datetime:
    return datetime(year + month // 12, month % 12 + 1, 1)


def _signups_reference(year, month):
    start = datetime(year, month, 1)
    return (select(User.id).where(User.created_at >= start,
                                  User.created_at < _next_month(year, month))
            .order_by(User.id))


def _signups_dataset():
    """The tiny dataset with the index, plus users signed up on each month's boundaries."""
    engine = private_dataset((f"CREATE INDEX {_Q5_INDEX} ON users (created_at)",))
    rows, user_id = [], 100_000
    for year, month in _Q5_MONTHS:
        first, following = datetime(year, month, 1), _next_month(year, month)
        for moment in (first, following - timedelta(microseconds=1), following):
            user_id += 1
            rows.append({"id": user_id, "email": f"edge{user_id}@example.com",
                         "first_name": "Edge", "last_name": "Case", "active": True,
                         "premium": False, "created_at": moment})
    with engine.begin() as conn:
        conn.execute(sa.insert(User.__table__), rows)
    return engine


class _SargableCheck(Checker):
    """The learner's ``users_signed_up_in(year, month)`` must return the right rows and search
    the index on ``users.created_at``."""

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"02.q5\", users_signed_up_in) "
                            f"(got a {type_name(answer)}).")
        engine = _signups_dataset()
        try:
            for year, month in _Q5_MONTHS:
                where = f"For year={year}, month={month}"
                try:
                    statement = call_learner(answer, year, month)
                except NoAnswer:
                    raise
                except Incorrect as exc:
                    raise Incorrect(f"{where}: {exc}") from None
                if not isinstance(statement, sa.Select):
                    raise Incorrect(f"{where} your function returned a {type_name(statement)}: "
                                    "return a select() of User.id, without running it.")
                try:
                    with engine.connect() as conn:
                        got = sorted(conn.execute(statement).scalars())
                except Exception as exc:  # noqa: BLE001 - reported as the learner's error
                    raise Incorrect(f"{where} running your statement failed "
                                    f"({type(exc).__name__}): return a select() of User.id.") \
                        from None
                with engine.connect() as conn:
                    expected = sorted(conn.execute(_signups_reference(year, month)).scalars())
                if got != expected:
                    missing, extra = len(set(expected) - set(got)), len(set(got) - set(expected))
                    raise Incorrect(
                        f"{where} your query returns {len(got)} user ids, the right answer has "
                        f"{len(expected)} ({missing} missing, {extra} too many): a month runs "
                        "from its first midnight (included) to the first midnight of the next "
                        "month (excluded); mind the last second of the month and December.")
                plan = explain_or_hint(engine, statement)
                if _Q5_INDEX not in plan.indexes or plan.verdict not in (
                        "index search", "covering index search"):
                    raise Incorrect(
                        f"Right rows, but the plan is a {plan.verdict} and does not search "
                        f"{_Q5_INDEX}: a function around the column hides it from the index. "
                        "Compare the bare column with a range instead.")
        finally:
            engine.dispose()

    def model_answer(self):
        return ("def users_signed_up_in(year, month):\n"
                "    start = datetime(year, month, 1)\n"
                "    end = datetime(year + month // 12, month % 12 + 1, 1)\n"
                "    return select(User.id).where(User.created_at >= start,\n"
                "                                 User.created_at < end)")


# --------------------------------------------------------------------------------------------
# The lab: 02.q8 (the report within a query budget), 02.q9 (index-served plans)

LAB_QUERY_BUDGET = 4
#: Tables whose full reads fail 02.q9 (categories has a few rows; a CTE is read whole by design).
_BIG_TABLES = ("orders", "order_items", "users", "products")


def _top_customers_reference(session, since, top=10, recent=3):
    """The slow report's result in 3 queries (private: the model answer of 02.q8)."""
    live = (Order.created_at >= since) & (Order.status != "cancelled")
    recent_orders = (select(Order.user_id, Order.total, Order.id).where(live)
                     .cte("recent_orders").prefix_with("MATERIALIZED"))
    spent = func.sum(recent_orders.c.total).label("spent")
    leaders = session.execute(
        select(recent_orders.c.user_id, spent, func.count(recent_orders.c.id).label("orders"))
        .group_by(recent_orders.c.user_id)
        .order_by(spent.desc(), recent_orders.c.user_id).limit(top)
    ).all()
    ids = [row.user_id for row in leaders]
    if not ids:
        return []
    orders_by_user, emails = defaultdict(list), {}
    for order_id, user_id, created_at, email in session.execute(
        select(Order.id, Order.user_id, Order.created_at, User.email)
        .join(User, User.id == Order.user_id).where(live, Order.user_id.in_(ids))
    ):
        orders_by_user[user_id].append((created_at, order_id))
        emails[user_id] = email
    units = defaultdict(Counter)
    for user_id, name, quantity in session.execute(
        select(Order.user_id, Category.name, func.sum(OrderItem.quantity))
        .join(OrderItem, OrderItem.order_id == Order.id)
        .join(Product, Product.id == OrderItem.product_id)
        .join(Category, Category.id == Product.category_id)
        .where(live, Order.user_id.in_(ids)).group_by(Order.user_id, Category.name)
    ):
        units[user_id][name] += int(quantity)
    return [{
        "user_id": row.user_id,
        "email": emails[row.user_id],
        "spent": Decimal(row.spent).quantize(Decimal("0.01")),
        "orders": row.orders,
        "recent": [i for _, i in sorted(orders_by_user[row.user_id], reverse=True)[:recent]],
        "favourite_category": min(units[row.user_id],
                                  key=lambda name: (-units[row.user_id][name], name))
        if units[row.user_id] else None,
    } for row in leaders]


def _lab_cases():
    yield (datetime(2025, 5, 20), 10, 3)
    yield (datetime(2025, 9, 15, 12, 30), 3, 2)
    yield (datetime(2024, 2, 29), 7, 5)
    yield (datetime(2023, 5, 1), 1, 1)
    yield (datetime(2025, 11, 20), 4, 2)
    yield (datetime(2026, 1, 1), 5, 3)  # nobody: an empty report


def _lab_dataset():
    """The tiny dataset plus ties the report's rules must break.

    Users 201 and 202 spend exactly as much (and more than anyone): lower user_id first. 202
    placed the first of their orders, so a ranking in Python that keeps the order the rows came
    in ties them the wrong way. (A SQL ``ORDER BY spent DESC`` without ``user_id`` cannot be
    caught on SQLite: its GROUP BY emits user ids in ascending order and its sort is stable.)
    201's three orders share one timestamp: higher id first. Each has two categories with equal
    units, the alphabetically later one with the lower id and bought first: first name
    alphabetically. 202's big cancelled order (and its items) counts for nothing.
    """
    engine = private_dataset()
    moment = "2025-10-03 10:00:00"
    with engine.begin() as conn:
        product = dict(conn.exec_driver_sql(
            "SELECT c.name, min(p.id) FROM categories c JOIN products p ON p.category_id = c.id "
            "GROUP BY c.name").all())
        statements = (
            "INSERT INTO users (id, email, first_name, last_name, active, premium, created_at) "
            "VALUES (201, 'tie.first@example.com', 'Tie', 'First', 1, 0, '2024-01-05 10:00:00'), "
            "(202, 'tie.second@example.com', 'Tie', 'Second', 1, 0, '2023-03-01 09:00:00')",
            "INSERT INTO orders (id, user_id, status, total, created_at) VALUES "
            "(1001, 202, 'paid', 20000.00, '2025-10-02 09:00:00'), "
            f"(1002, 201, 'paid', 8000.00, '{moment}'), "
            f"(1003, 201, 'delivered', 6000.00, '{moment}'), "
            f"(1004, 201, 'shipped', 6000.00, '{moment}'), "
            "(1005, 202, 'cancelled', 9000.00, '2025-10-04 08:00:00')",
            "INSERT INTO order_items (id, order_id, product_id, quantity, unit_price) VALUES "
            f"(5001, 1002, {product['music']}, 2, 10.00), "
            f"(5002, 1003, {product['garden']}, 2, 10.00), "
            f"(5003, 1001, {product['toys']}, 3, 10.00), "
            f"(5004, 1001, {product['tools']}, 3, 10.00), "
            f"(5005, 1005, {product['garden']}, 9, 10.00)",
        )
        for statement in statements:
            conn.exec_driver_sql(statement)
    return engine


_REPORT_KEYS = ("user_id", "email", "spent", "orders", "recent", "favourite_category")


def _check_report(got, expected, where: str) -> bool:
    """Compare the learner's report with the reference; raise a hint naming the broken rule."""
    if not isinstance(got, (list, tuple)):
        raise Incorrect(f"{where}: return a list of dicts, one per customer "
                        f"(got a {type_name(got)}).")
    for row in got:
        if not isinstance(row, dict) or set(row) != set(_REPORT_KEYS):
            keys = sorted(row) if isinstance(row, dict) else type_name(row)
            raise Incorrect(f"{where}: each customer is a dict with the keys "
                            f"{', '.join(_REPORT_KEYS)} (got {shorten(str(keys), 80)}).")
        if isinstance(row["spent"], float):
            raise Incorrect(
                "'spent' is a float: money stays exact as a Decimal with 2 places, as the "
                "docstring says (Numeric column, Decimal in Python); a float rounds in binary.")
        if not isinstance(row["spent"], Decimal):
            raise Incorrect(f"'spent' must be a Decimal with 2 places, not a "
                            f"{type_name(row['spent'])}.")
    ids, expected_ids = [r["user_id"] for r in got], [r["user_id"] for r in expected]
    if ids != expected_ids:
        if sorted(ids, key=str) == sorted(expected_ids, key=str):
            raise Incorrect(f"{where}: the right customers in another order: best spend first, "
                            "equal spend: lower user_id first.")
        raise Incorrect(
            f"{where}: your report has {len(ids)} customers, not the expected {len(expected_ids)} "
            "or not the same ones: spend is the total of orders not cancelled placed at or after "
            "`since`, best first, equal spend: lower user_id first.")
    for row, ref in zip(got, expected):
        who = f"{where}, user_id {ref['user_id']}"
        if row["spent"] != ref["spent"]:
            if abs(row["spent"] - ref["spent"]) < Decimal("0.01"):
                raise Incorrect(f"{who}: 'spent' is {row['spent']}, off in the last places: "
                                "quantize it to 2 places (Decimal('0.01')); SQLite sums Numeric "
                                "columns in floating point.")
            raise Incorrect(f"{who}: 'spent' differs: the total of orders not cancelled placed "
                            "at or after `since`.")
        if row["email"] != ref["email"]:
            raise Incorrect(f"{who}: 'email' is not that customer's email.")
        if row["orders"] != ref["orders"]:
            raise Incorrect(f"{who}: 'orders' counts the same orders as 'spent' (not cancelled, "
                            "at or after `since`).")
        recent = list(row["recent"]) if isinstance(row["recent"], (list, tuple)) else None
        if recent != ref["recent"]:
            if recent is not None and sorted(recent) == sorted(ref["recent"]):
                raise Incorrect(f"{who}: 'recent' has the right orders in the wrong order: "
                                "newest first; equal timestamps: higher id first.")
            raise Incorrect(f"{who}: 'recent' lists the ids of the newest qualifying orders "
                            "(at most `recent` of them), newest first; equal timestamps: higher "
                            "id first.")
        if row["favourite_category"] != ref["favourite_category"]:
            raise Incorrect(f"{who}: 'favourite_category' differs: the category with most units "
                            "bought in those orders; equal units: first name alphabetically.")
    return True


class _ReportCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"02.q8\", fast_report) "
                            f"(got a {type_name(answer)}).")
        engine = _lab_dataset()
        try:
            for since, top, recent in _lab_cases():
                where = f"For since={since:%Y-%m-%d %H:%M}, top={top}, recent={recent}"
                QueryCheck(
                    reference=_top_customers_reference, engine=engine,
                    max_queries=LAB_QUERY_BUDGET, args=(since, top, recent),
                    compare=lambda got, expected, where=where: _check_report(got, expected, where),
                    hint=f"({where}.) Aggregate in SQL and load the leaders' orders in one go.",
                ).grade(answer)
        finally:
            engine.dispose()

    def model_answer(self):
        try:
            return inspect.getsource(_top_customers_reference)
        except (OSError, TypeError):
            return ""


def _describe_access(access) -> str:
    return f"{access.table}: {access.verdict}" + (f" in {access.index}" if access.index else "")


def _slow_report_plans(engine, statement=None, params=None) -> Plan:
    """Explain every distinct query the slow report sends, on every hidden parameter set.

    Raises :class:`Incorrect` naming the first query that still reads a big table whole; else
    returns one plan gathering every table access (what :class:`ExplainCheck` then judges).
    """
    accesses, lines, seen = [], [], set()
    for since, top, recent in _lab_cases():
        try:
            with Session(engine) as session, count_queries(engine) as counted:
                top_customers_report_slow(session, since, top, recent)
        except sa.exc.DBAPIError as exc:
            raise Incorrect(
                f"After your change the report no longer runs ({shorten(str(exc.orig), 90)}): "
                "add indexes, do not drop or alter tables.") from None
        for record in counted.statements:
            shape = " ".join(record.sql.split())
            if record.kind not in ("SELECT", "WITH") or shape in seen:
                continue
            seen.add(shape)
            plan = explain_recorded(engine, record)
            for access in plan.accesses:
                if access.table not in _BIG_TABLES:
                    continue  # a small lookup table, or a CTE read whole by design
                if access.verdict in ("full scan", "full index scan"):
                    how = ("reads the table row by row" if access.verdict == "full scan"
                           else f"walks all of {access.index} without searching it")
                    raise Incorrect(
                        f"The report's query `{shorten(shape, 90)}` still {how} "
                        f"({_describe_access(access)}): which column does its WHERE filter on?")
                accesses.append(access)
                lines.append(f"{shorten(shape, 60)} -> {_describe_access(access)}")
    return Plan(backend="sqlite", sql="(the slow report's queries)", plan_text=lines,
                accesses=accesses)


class _LabIndexCheck(Checker):
    """The learner's indexes must make every access of the slow report's queries a search."""

    def grade(self, answer):
        if isinstance(answer, (list, tuple)) and not answer:
            raise Incorrect("Your list is empty: give the CREATE INDEX statements the report "
                            "needs, e.g. [\"CREATE INDEX ix_name ON table (column)\"].")
        ExplainCheck(statement="(the slow report's queries)", engine=private_dataset,
                     explain=_slow_report_plans).grade(answer)

    def model_answer(self):
        return '["CREATE INDEX ix_orders_created_at ON orders (created_at)"]'


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="02.q1",
        title="N+1: counting the queries (interview question 2)",
        checker=Choice(
            options={
                "a": "51, 51 and 1",
                "b": "50, 2 and 1",
                "c": "51, 2 and 2",
                "d": "51, 2 and 1",
            },
            correct="d",
            explanations={
                "a": "selectinload does not load per user: it loads every user's orders with one "
                "extra `IN (...)` query, whatever the number of users.",
                "b": "Count the query that loads the 50 users too: lazy loading is 1 + 50.",
                "c": "joinedload needs no second query: it fetches users and orders in one "
                "LEFT OUTER JOIN.",
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
                "a": "load every relationship with joinedload, so each page is one query",
                "b": "index the columns queries filter, join and sort on",
                "c": "rewrite every IN (subquery) as EXISTS, which planners run faster",
                "d": "eager-load the collections a page touches (selectinload)",
                "e": "pool connections instead of opening one per request",
                "f": "page deep lists with OFFSET, which skips rows without reading them",
                "g": "send reads to replicas when one server is saturated",
                "h": "log slow queries and review their EXPLAIN plans",
            },
            correct={"b", "d", "e", "g", "h"},
            explanations={
                "a": "joinedload repeats every parent row once per child: for collections the "
                "rows and values sent grow fast (the chapter's table). It suits many-to-one.",
                "c": "Modern planners turn IN and EXISTS into the same semi-join: the chapter's "
                "plans show it. Read the plan instead of the folklore (NOT IN is the real trap).",
                "f": "OFFSET reads and throws away every skipped row: deep pages get slower and "
                "slower. A keyset (WHERE id > last_seen) seeks the index instead.",
            },
        ),
        explanation="Indexes, fewer round trips (eager loading), pooling, replicas and query "
        "analysis are the guide's five answers; each is measured in chapters 02 and 03.",
    ),
    Question(
        id="02.q3",
        title="A loader for orders, items and products in at most 2 queries",
        checker=_LoaderCheck(),
        explanation="selectinload(Order.items) adds one `SELECT ... WHERE order_id IN (...)` "
        "for all orders, and joinedload(OrderItem.product) chained on it joins each item's "
        "product into that same query (a many-to-one: no rows repeated). Two queries, whatever "
        "the number of orders; a chained selectinload would add a third.",
        hints=("Chain loader options: .options(selectinload(Order.items).<strategy>("
               "OrderItem.product)).",),
    ),
    Question(
        id="02.q4",
        title="A composite index the plan searches on both conditions",
        checker=_BothConditionsCheck(),
        explanation="The foreign-key index on category_id finds the category's products, then "
        "every one is read to test the price. A composite index with the equality column first "
        "and the range column second serves both conditions with one search; an index led by the range column "
        "(price, category_id) cannot.",
    ),
    Question(
        id="02.q5",
        title="Rewrite a predicate so the index serves it",
        checker=_SargableCheck(),
        explanation="`strftime('%Y-%m', created_at) = :month` computes a value per row, so the "
        "index on created_at cannot be searched. The same rows are `created_at >= first "
        "midnight AND created_at < next month's first midnight`: a range on the bare column, "
        "an index search.",
        hints=("A month is the half-open range [its first midnight, the next month's first "
               "midnight); December's next month is January of the next year.",),
    ),
    Question(
        id="02.q6",
        title="Composite index column order",
        checker=Choice(
            options={
                "a": "`WHERE user_id = 42 ORDER BY created_at`",
                "b": "`WHERE created_at >= '2025-01-01'`",
                "c": "`WHERE created_at >= '2025-01-01' AND user_id = 42`",
                "d": "`WHERE user_id = 42`",
            },
            correct="b",
            explanations={
                "a": "Equality on the first column, and rows come out ordered by the second: "
                "a search with no sort step.",
                "c": "The order of conditions in WHERE does not matter: the planner matches "
                "user_id = 42 to the index's first column and the range to the second.",
                "d": "user_id is the index's first column: its prefix, a search.",
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
                "b": "subqueryload",
                "c": "joinedload",
                "d": "lazy loading",
            },
            correct="c",
            explanations={
                "a": "selectinload sends the users once and the orders once (`IN` list).",
                "b": "subqueryload re-runs the users query inside the orders query, but the "
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
        explanation="Aggregating in the database and loading only the leaders' rows turns "
        "hundreds of round trips into a handful, whatever the number of customers. Every "
        "tie-break is part of the result: ORDER BY spent DESC, user_id; newest first, then "
        "higher id; most units, then name.",
        time_limit=15.0,
    ),
    Question(
        id="02.q9",
        title="Lab: index-served plans",
        checker=_LabIndexCheck(),
        explanation="The report's first query filters orders on created_at: with an index on "
        "it, every table access of the report is an index search (the others already had "
        "primary-key and foreign-key indexes).",
        time_limit=15.0,
    ),
]
