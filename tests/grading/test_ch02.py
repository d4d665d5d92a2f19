"""Graders of chapter 02 (query optimisation): right answers written other ways pass, the
mistakes learners make fail with a hint that names them, the hidden data holds the ties the lab
report's rules break (that the notebook words each option as the bank grades it is
tests/grading/test_question_bank.py's job, for every chapter).

Everything runs on the grader's private in-memory copies of the tiny dataset: nothing here
writes to a course database. An ``sa.Index`` built on the models' tables attaches itself to
their metadata; the fixture ``detached`` takes it off again.
"""

from __future__ import annotations

import calendar
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, joinedload, selectinload, subqueryload

from perfcourse.chapters import query_optimization as queries
from perfcourse.grading.bank import question
from perfcourse.grading.questions import ch02
from perfcourse.models import Category, Order, OrderItem, Product, User

from .kit import fails, passes

ROOT = Path(__file__).resolve().parents[2]
LESSON = ROOT / "solutions" / "02-query-optimization.ipynb"
LAB = ROOT / "solutions" / "02-query-optimization-lab.ipynb"


@pytest.fixture
def detached():
    """Indexes a test builds on the models' tables, taken off their metadata afterwards."""
    built: list[sa.Index] = []
    yield built
    for index in built:
        index.table.indexes.discard(index)


# --- choice questions ---------------------------------------------------------------------

RIGHT_KEYS = {"02.q1": "d", "02.q6": "b", "02.q7": "c"}


@pytest.mark.parametrize("qid, key", RIGHT_KEYS.items(), ids=list(RIGHT_KEYS))
@pytest.mark.parametrize("shape", [str.upper, lambda k: f" {k} "], ids=["upper", "spaced"])
def test_right_key_passes_in_any_form(qid, key, shape):
    passes(qid, shape(key))


CHOICE_WRONG = [
    ("02.q1", "a", ("one extra `IN (...)` query",)),
    ("02.q1", "b", ("1 + 50",)),
    ("02.q1", "c", ("no second query",)),
    ("02.q6", "a", ("no sort step",)),
    ("02.q6", "c", ("order of conditions in WHERE does not matter",)),
    ("02.q6", "d", ("prefix",)),
    ("02.q7", "a", ("orders once",)),
    ("02.q7", "b", ("re-runs the users query",)),
    ("02.q7", "d", ("each user's row once",)),
]


@pytest.mark.parametrize("qid, key, hint", CHOICE_WRONG,
                         ids=[f"{q}-{k}" for q, k, _ in CHOICE_WRONG])
def test_wrong_key_fails_with_its_explanation(qid, key, hint):
    fails(qid, key, *hint)


Q2_RIGHT = {"b", "d", "e", "g", "h"}


@pytest.mark.parametrize("form", [Q2_RIGHT, sorted(k.upper() for k in Q2_RIGHT),
                                  " b, d, e, g, h ", "BDEGH"],
                         ids=["set", "upper-list", "spaced-string", "letters"])
def test_q2_right_set_passes_in_any_form(form):
    passes("02.q2", form)


def test_q2_right_options_are_interleaved_with_at_least_two_wrong_ones():
    checker = question("02.q2").checker
    letters = sorted(checker.options)
    assert set(checker.correct) != set(letters[:len(checker.correct)])
    assert len(set(letters) - set(checker.correct)) >= 2


Q2_WRONG = [
    ("a", ("repeats every parent row",)),
    ("c", ("same semi-join",)),
    ("f", ("throws away every skipped row", "keyset")),
]


@pytest.mark.parametrize("key, hint", Q2_WRONG, ids=[k for k, _ in Q2_WRONG])
def test_q2_each_wrong_option_fails_with_its_explanation(key, hint):
    fails("02.q2", Q2_RIGHT | {key}, *hint)


def test_q2_a_partial_set_is_told_how_many_are_missing():
    fails("02.q2", {"b", "d", "e"}, "2 more options")


# --- 02.q3: orders, their items and each item's product, in at most 2 queries ---------------


def q3_selectin_then_joined(session, order_ids):
    """The model answer's shape, as a reference for the tests."""
    return session.scalars(
        select(Order).where(Order.id.in_(order_ids)).order_by(Order.id)
        .options(selectinload(Order.items).joinedload(OrderItem.product))).all()


def q3_joined_twice(session, order_ids):
    """One query: both levels joined; a joined collection needs unique()."""
    statement = (select(Order).filter(Order.id.in_(list(order_ids))).order_by(Order.id.asc())
                 .options(joinedload(Order.items).joinedload(OrderItem.product)))
    return list(session.scalars(statement).unique())


def q3_subquery_then_joined(session, order_ids):
    return session.scalars(
        select(Order).where(Order.id.in_(order_ids)).order_by(Order.id)
        .options(subqueryload(Order.items).joinedload(OrderItem.product))).all()


def q3_options_nested(session, order_ids):
    """The same plan spelled with Load.options() and sorted in Python."""
    orders = session.scalars(
        select(Order).where(Order.id.in_(set(order_ids)))
        .options(selectinload(Order.items).options(joinedload(OrderItem.product)))).all()
    return sorted(orders, key=lambda order: order.id)


@pytest.mark.parametrize("loader", [q3_selectin_then_joined, q3_joined_twice,
                                    q3_subquery_then_joined, q3_options_nested],
                         ids=["selectin-joined", "joined-joined-unique", "subquery-joined",
                              "nested-options-sorted-in-python"])
def test_q3_right_loaders_pass(loader):
    passes("02.q3", loader)


def q3_lazy(session, order_ids):
    """The N+1: right rows, one query per order and per product."""
    return session.scalars(select(Order).where(Order.id.in_(order_ids))
                           .order_by(Order.id)).all()


def q3_items_only(session, order_ids):
    """The lesson's fix copied: the items in one go, each product still lazy."""
    return session.scalars(select(Order).where(Order.id.in_(order_ids)).order_by(Order.id)
                           .options(selectinload(Order.items))).all()


def q3_selectin_twice(session, order_ids):
    return session.scalars(
        select(Order).where(Order.id.in_(order_ids)).order_by(Order.id)
        .options(selectinload(Order.items).selectinload(OrderItem.product))).all()


def q3_newest_first(session, order_ids):
    return session.scalars(
        select(Order).where(Order.id.in_(order_ids)).order_by(Order.id.desc())
        .options(selectinload(Order.items).joinedload(OrderItem.product))).all()


def q3_off_by_one(session, order_ids):
    """Every order from the smallest id up to (but not including) the largest."""
    if not order_ids:
        return []
    return session.scalars(
        select(Order).where(Order.id >= min(order_ids), Order.id < max(order_ids))
        .order_by(Order.id)
        .options(selectinload(Order.items).joinedload(OrderItem.product))).all()


def q3_visible_example(session, order_ids):
    """The notebook's visible example, hard-coded."""
    return session.scalars(
        select(Order).where(Order.id.in_([7, 3, 5])).order_by(Order.id)
        .options(selectinload(Order.items).joinedload(OrderItem.product))).all()


def q3_ids_only(session, order_ids):
    return sorted(order_ids)


Q3_WRONG = [
    (q3_lazy, ("N+1", "products")),
    (q3_items_only, ("N+1", "SELECT products")),
    (q3_selectin_twice, ("3 queries", "many-to-one")),
    (q3_newest_first, ("ordered by id",)),
    (q3_off_by_one, ("other orders than asked for",)),
    (q3_visible_example, ("other orders than asked for",)),
    (q3_ids_only, ("Order objects",)),
]


@pytest.mark.parametrize("loader, hint", Q3_WRONG, ids=[f.__name__ for f, _ in Q3_WRONG])
def test_q3_wrong_loaders_fail_with_a_hint(loader, hint):
    fails("02.q3", loader, *hint)


# --- 02.q4: a composite index the plan searches on both conditions ------------------------


def q4_as_function(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_cp ON products (category_id, price)")


@pytest.mark.parametrize("answer", [
    "CREATE INDEX ix_products_category_price ON products (category_id, price)",
    "create index ix_cover on products (category_id, price, name)",
    ["CREATE INDEX ix_name ON products (name)",
     "CREATE INDEX ix_cp ON products (category_id, price)"],
    q4_as_function,
], ids=["composite", "covering-lowercase", "list-with-an-extra-index", "function"])
def test_q4_right_indexes_pass(answer):
    passes("02.q4", answer)


def test_q4_an_index_built_on_the_models_table_passes_and_leaves_no_trace(detached):
    table = Product.__table__
    index = sa.Index("ix_x", table.c.category_id, table.c.price)
    detached.append(index)
    passes("02.q4", index)
    # the index is now on the models' metadata: the grader's schema must not inherit it
    fails("02.q4", "CREATE INDEX ix_name ON products (name)", "category_id only")


def q4_drops_a_table(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE products")


Q4_WRONG = [
    ("CREATE INDEX ix_price ON products (price)", ("category_id only",)),
    ("CREATE INDEX ix_pc ON products (price, category_id)", ("equality column first",)),
    ("CREATE INDEX ix_c ON products (category_id)", ("category_id only", "price")),
    ("CREATE INDEX ix_orders_user_created ON orders (user_id, created_at)",
     ("category_id only",)),
    ("DROP TABLE orders", ("CREATE INDEX",)),
    (q4_drops_a_table, ("no longer runs", "do not drop")),
]


@pytest.mark.parametrize("answer, hint", Q4_WRONG,
                         ids=["price-only", "range-first", "the-foreign-key-again",
                              "lesson-copy-on-orders", "drop-table-ddl", "drop-table-function"])
def test_q4_wrong_indexes_fail_with_a_hint(answer, hint):
    fails("02.q4", answer, *hint)


# --- 02.q5: a month of sign-ups, index-friendly --------------------------------------------


def q5_timedelta(year, month):
    start = datetime(year, month, 1)
    end = (start + timedelta(days=32)).replace(day=1)
    return select(User.id).where(User.created_at >= start).where(User.created_at < end)


def q5_strings(year, month):
    next_year, next_month = divmod(year * 12 + month, 12)
    return select(User.id).where(User.created_at >= f"{year:04d}-{month:02d}-01",
                                 User.created_at < f"{next_year:04d}-{next_month + 1:02d}-01")


def q5_between_last_microsecond(year, month):
    last = calendar.monthrange(year, month)[1]
    return (select(User.id).where(User.created_at.between(
        datetime(year, month, 1), datetime(year, month, last, 23, 59, 59, 999999)))
        .order_by(User.id.desc()))


@pytest.mark.parametrize("fn", [q5_timedelta, q5_strings, q5_between_last_microsecond],
                         ids=["timedelta-rollover", "iso-strings", "between-last-microsecond"])
def test_q5_right_functions_pass(fn):
    passes("02.q5", fn)


def q5_strftime(year, month):
    return select(User.id).where(
        func.strftime("%Y-%m", User.created_at) == f"{year:04d}-{month:02d}")


def q5_month_plus_one(year, month):
    return select(User.id).where(User.created_at >= datetime(year, month, 1),
                                 User.created_at < datetime(year, month + 1, 1))


def q5_inclusive_end(year, month):
    start = datetime(year, month, 1)
    return select(User.id).where(User.created_at >= start,
                                 User.created_at <= (start + timedelta(days=32)).replace(day=1))


def q5_last_day_lost(year, month):
    last = calendar.monthrange(year, month)[1]
    return select(User.id).where(User.created_at >= datetime(year, month, 1),
                                 User.created_at < datetime(year, month, last))


def q5_first_midnight_lost(year, month):
    start = datetime(year, month, 1)
    return select(User.id).where(User.created_at > start,
                                 User.created_at < (start + timedelta(days=32)).replace(day=1))


def q5_visible_example(year, month):
    """The notebook's visible example (March 2024), whatever the month asked."""
    return select(User.id).where(User.created_at >= datetime(2024, 3, 1),
                                 User.created_at < datetime(2024, 4, 1))


def q5_runs_it(year, month):
    return [1, 2, 3]


Q5_WRONG = [
    (q5_strftime, ("function around the column",)),
    (q5_month_plus_one, ("month=12", "ValueError")),
    (q5_inclusive_end, ("too many", "excluded")),
    (q5_last_day_lost, ("missing", "last second")),
    (q5_first_midnight_lost, ("1 missing", "first midnight (included)")),
    (q5_visible_example, ("missing",)),
    (q5_runs_it, ("select()",)),
]


@pytest.mark.parametrize("fn, hint", Q5_WRONG, ids=[f.__name__ for f, _ in Q5_WRONG])
def test_q5_wrong_functions_fail_with_a_hint(fn, hint):
    fails("02.q5", fn, *hint)


def test_q5_hidden_data_has_users_on_each_months_edges():
    engine = ch02._signups_dataset()
    try:
        with engine.connect() as conn:
            for year, month in ch02._Q5_MONTHS:
                ids = set(conn.execute(ch02._signups_reference(year, month)).scalars())
                edges = set(conn.execute(select(User.id).where(User.id > 100_000, User.created_at.in_(
                    [datetime(year, month, 1)]))).scalars())
                assert edges and edges <= ids, (year, month)
    finally:
        engine.dispose()


# --- 02.q8: the lab report within the query budget -----------------------------------------


def q8_sql_with_window(session, since, top=10, recent=3):
    """Rank in SQL, then the leaders' recent orders with a window function, then units."""
    live = (Order.created_at >= since) & (Order.status != "cancelled")
    spent = func.sum(Order.total)
    leaders = session.execute(
        select(Order.user_id, User.email, spent.label("spent"), func.count(Order.id))
        .join(User, User.id == Order.user_id).where(live)
        .group_by(Order.user_id, User.email).order_by(spent.desc(), Order.user_id).limit(top)
    ).all()
    ids = [row[0] for row in leaders]
    rank = func.row_number().over(partition_by=Order.user_id,
                                  order_by=(Order.created_at.desc(), Order.id.desc()))
    ranked = select(Order.user_id, Order.id, rank.label("n")).where(
        live, Order.user_id.in_(ids)).subquery()
    newest = defaultdict(list)
    for user_id, order_id in session.execute(
            select(ranked.c.user_id, ranked.c.id).where(ranked.c.n <= recent)
            .order_by(ranked.c.user_id, ranked.c.n)):
        newest[user_id].append(order_id)
    units = defaultdict(Counter)
    for user_id, name, quantity in session.execute(
        select(Order.user_id, Category.name, func.sum(OrderItem.quantity))
        .select_from(Order).join(Order.items).join(OrderItem.product).join(Product.category)
        .where(live, Order.user_id.in_(ids)).group_by(Order.user_id, Category.id)
    ):
        units[user_id][name] += quantity
    report = []
    for user_id, email, total, count in leaders:
        counts = units[user_id]
        favourite = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        report.append({"user_id": user_id, "email": email,
                       "spent": Decimal(str(total)).quantize(Decimal("0.01")), "orders": count,
                       "recent": newest[user_id],
                       "favourite_category": favourite[0][0] if favourite else None})
    return report


def q8_python_ranking(session, since, top=10, recent=3):
    """One query for every live order, exact Decimal sums in Python, then two batched loads."""
    rows = session.execute(select(Order.id, Order.user_id, Order.total, Order.created_at).where(
        Order.created_at >= since, Order.status != "cancelled")).all()
    spent, mine = defaultdict(Decimal), defaultdict(list)
    for order_id, user_id, total, created_at in rows:
        spent[user_id] += total
        mine[user_id].append((created_at, order_id))
    leaders = sorted(spent, key=lambda u: (-spent[u], u))[:top]
    if not leaders:
        return []
    emails = dict(session.execute(select(User.id, User.email).where(User.id.in_(leaders))).all())
    order_ids = [order_id for u in leaders for _, order_id in mine[u]]
    owner = {order_id: u for u in leaders for _, order_id in mine[u]}
    units = defaultdict(Counter)
    for order_id, name, quantity in session.execute(
        select(OrderItem.order_id, Category.name, OrderItem.quantity)
        .join(Product, Product.id == OrderItem.product_id)
        .join(Category, Category.id == Product.category_id)
        .where(OrderItem.order_id.in_(order_ids))
    ):
        units[owner[order_id]][name] += quantity
    return [{
        "user_id": u, "email": emails[u], "spent": spent[u], "orders": len(mine[u]),
        "recent": [order_id for _, order_id in sorted(mine[u], reverse=True)[:recent]],
        "favourite_category": min(units[u], key=lambda n: (-units[u][n], n)) if units[u] else None,
    } for u in leaders]


@pytest.mark.parametrize("fn", [ch02._top_customers_reference, q8_sql_with_window,
                                q8_python_ranking],
                         ids=["reference", "sql-window-function", "python-decimal-ranking"])
def test_q8_right_reports_pass(fn):
    passes("02.q8", fn)


def _broken(**change):
    """q8_python_ranking with one rule of the docstring broken."""

    def report(session, since, top=10, recent=3):
        rows = session.execute(select(Order.id, Order.user_id, Order.total, Order.created_at,
                                      Order.status).where(Order.created_at >= since)).all()
        if not change.get("cancelled"):
            rows = [r for r in rows if r.status != "cancelled"]
        spent, mine = defaultdict(Decimal), defaultdict(list)
        for order_id, user_id, total, created_at, _ in rows:
            spent[user_id] += total
            mine[user_id].append((created_at, order_id))
        key = (lambda u: -spent[u]) if change.get("no_user_tiebreak") else (
            lambda u: (-spent[u], u))
        leaders = sorted(spent, key=key)[:top + change.get("extra", 0)]
        if not leaders:
            return []
        emails = dict(session.execute(select(User.id, User.email)
                                      .where(User.id.in_(leaders))).all())
        owner = {order_id: u for u in leaders for _, order_id in mine[u]}
        units = defaultdict(Counter)
        for order_id, name, quantity in session.execute(
            select(OrderItem.order_id, Category.name, OrderItem.quantity)
            .join(Product, Product.id == OrderItem.product_id)
            .join(Category, Category.id == Product.category_id)
            .where(OrderItem.order_id.in_(list(owner))).order_by(OrderItem.id)
        ):
            units[owner[order_id]][name] += quantity

        def newest(u):
            if change.get("no_id_tiebreak"):
                return [i for _, i in sorted(mine[u], key=lambda t: t[0], reverse=True)[:recent]]
            return [i for _, i in sorted(mine[u], reverse=True)[:recent]]

        def favourite(u):
            if not units[u]:
                return None
            if change.get("no_name_tiebreak"):
                return units[u].most_common(1)[0][0]
            return min(units[u], key=lambda n: (-units[u][n], n))

        money = float if change.get("float") else (lambda d: d)
        return [{"user_id": u, "email": emails[u], "spent": money(spent[u]),
                 "orders": len(mine[u]), "recent": newest(u), "favourite_category": favourite(u)}
                for u in leaders]

    return report


def q8_visible_example(session, since, top=10, recent=3):
    """A copy of what the notebook showed, whatever the parameters."""
    return [{"user_id": 5577, "email": "user5577@example.com", "spent": Decimal("7645.85"),
             "orders": 27, "recent": [18651, 55841, 78830], "favourite_category": "cycling"}]


Q8_WRONG = [
    (queries.top_customers_report_slow, ("queries and at most 4", "N+1")),
    (_broken(no_user_tiebreak=True), ("another order", "lower user_id first")),
    (_broken(no_id_tiebreak=True), ("'recent'", "higher id first")),
    (_broken(no_name_tiebreak=True), ("favourite_category", "alphabetically")),
    (_broken(float=True), ("float", "Decimal")),
    (_broken(cancelled=True), ("not cancelled",)),
    (_broken(extra=1), ("customers",)),
    (q8_visible_example, ("not the same ones",)),
]


@pytest.mark.parametrize("fn, hint", Q8_WRONG,
                         ids=["slow-n-plus-1", "no-user-id-tiebreak", "no-order-id-tiebreak",
                              "no-name-tiebreak", "float-money", "counts-cancelled",
                              "top-plus-one", "visible-example"])
def test_q8_wrong_reports_fail_with_a_hint(fn, hint):
    fails("02.q8", fn, *hint)


@pytest.mark.parametrize("case", list(ch02._lab_cases()), ids=lambda c: f"{c[0]:%Y-%m-%d}")
def test_q8_hidden_data_matches_the_slow_reports_rules_and_has_ties(case):
    engine = ch02._lab_dataset()
    try:
        with Session(engine) as session:
            slow = queries.top_customers_report_slow(session, *case)
        with Session(engine) as session:
            assert ch02._top_customers_reference(session, *case) == slow
    finally:
        engine.dispose()
    if case[0] < datetime(2025, 10, 1):
        top = {row["user_id"]: row for row in slow[:2]}
        assert list(top) == [201, 202][:case[1]]
        assert top[201]["spent"] == Decimal("20000.00")


# --- 02.q9: index-served plans for the slow report -----------------------------------------


def q9_as_function(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_when ON orders (created_at)")


@pytest.mark.parametrize("answer", [
    ["CREATE INDEX ix_orders_created_at ON orders (created_at)"],
    "create index ix_orders_created_status on orders (created_at, status)",
    q9_as_function,
], ids=["model", "composite-string", "function"])
def test_q9_right_indexes_pass(answer):
    passes("02.q9", answer)


def test_q9_an_index_built_on_the_models_table_passes(detached):
    index = sa.Index("ix_x", Order.__table__.c.created_at)
    detached.append(index)
    passes("02.q9", index)


def q9_drops_a_table(engine):
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE order_items")


Q9_WRONG = [
    (["CREATE INDEX ix_status ON orders (status)"], ("orders: full scan", "WHERE filter")),
    (["CREATE INDEX ix_sc ON orders (status, created_at)"], ("orders: full scan",)),
    (["CREATE INDEX ix_uc ON orders (user_id, created_at)"], ("orders: full scan",)),
    (["CREATE INDEX ix_email ON users (email)"], ("orders: full scan",)),
    ([], ("empty",)),
    ("DROP TABLE orders", ("CREATE INDEX",)),
    (q9_drops_a_table, ("no longer runs",)),
]


@pytest.mark.parametrize("answer, hint", Q9_WRONG,
                         ids=["status", "status-then-created", "user-then-created",
                              "other-table", "empty-list", "drop-table-ddl",
                              "drop-table-function"])
def test_q9_wrong_indexes_fail_with_a_hint(answer, hint):
    fails("02.q9", answer, *hint)


def test_q9_success_never_reads_as_failure():
    printed = passes("02.q9", ["CREATE INDEX ix_orders_created_at ON orders (created_at)"])
    assert "full scan" not in printed and "every table access" in printed


# --- no reference answer in the chapter module ---------------------------------------------


def test_the_chapter_module_ships_no_reference_answer():
    assert not hasattr(queries, "top_customers_report")
    assert not hasattr(queries, "LAB_INDEXES")
