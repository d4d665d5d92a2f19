"""Chapter 02 helpers: loader strategies, counter cache, index experiments, the lab report."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from perfcourse import db, queries
from perfcourse.measure import count_queries, explain
from perfcourse.seed import seed_dataset


@pytest.fixture(scope="module")
def tiny():
    eng = db.engine("sqlite", scale="tiny")
    seed_dataset(eng, "tiny", progress=False)
    yield eng
    eng.dispose()


@pytest.fixture
def scratch(tiny):
    namespace = "t_ch02_scratch"
    eng = queries.scratch_copy(tiny, namespace)
    yield eng
    eng.dispose()
    db.drop_namespace("sqlite", namespace)


@pytest.mark.parametrize("strategy,expected", [
    ("lazy", 21), ("selectinload", 2), ("subqueryload", 2), ("joinedload", 1),
    ("immediateload", 21),
])
def test_strategies_issue_the_textbook_number_of_queries(tiny, strategy, expected):
    with Session(tiny) as session, count_queries(tiny) as counted:
        page = queries.order_counts_page(session, 20, strategy)
    assert counted.count == expected
    with Session(tiny) as session:
        assert page == queries.order_counts_page(session, 20, "lazy")


def test_raiseload_guards_against_lazy_loads(tiny):
    with Session(tiny) as session:
        with pytest.raises(InvalidRequestError):
            queries.order_counts_page(session, 5, "raiseload")


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(ValueError, match="selectinload"):
        queries.loader_option("eager")


def test_joinedload_repeats_parent_rows(tiny):
    df = queries.compare_loaders(tiny, 30, ("selectinload", "joinedload"), repeat=1,
                                 memory=False)
    select_in, joined = df.set_index("strategy").loc[["selectinload", "joinedload"]].itertuples()
    assert joined.values > select_in.values  # user columns sent once per order
    assert joined.queries == 1 and select_in.queries == 2


def test_grid_shape_and_caps(tiny):
    df = queries.nplus1_grid({"a": tiny}, [1, 10, 50], max_n={"a": 10})
    assert sorted(df.n.unique()) == [1, 10]
    assert set(df.strategy) == {"lazy", "selectinload"}
    assert df[(df.n == 10) & (df.strategy == "lazy")].queries.item() == 11


def test_counter_cache_events_and_reset(scratch):
    from decimal import Decimal

    from perfcourse.models import Order

    queries.add_orders_count_column(scratch)
    assert queries.counter_drift(scratch) == 0
    with queries.counter_cache(), Session(scratch) as session:
        session.add(Order(user_id=1, status="pending", total=Decimal("1.00"),
                          created_at=datetime(2025, 1, 1)))
        session.commit()
    assert queries.counter_drift(scratch) == 0
    lost = queries.lost_update(scratch, 2, atomic=False)
    assert lost["after"] == lost["before"] + 1  # one increment lost
    assert queries.counter_drift(scratch) == 1
    queries.reset_orders_count(scratch, [2])
    assert queries.counter_drift(scratch) == 0
    safe = queries.lost_update(scratch, 3, atomic=True)
    assert safe["after"] == safe["before"] + 2
    with Session(scratch) as session:
        stats = session.scalars(select(queries.UserOrderStats).where(
            queries.UserOrderStats.id == 3)).one()
        assert stats.orders_count == safe["after"]


def test_point_lookup_turns_scan_into_search_and_cleans_up(scratch):
    df = queries.point_lookup(scratch, "orders", "created_at", lookups=3, repeat=1)
    assert list(df.verdict) == ["full scan", "index search"]
    assert queries.list_indexes(scratch, "orders") == ["ix_orders_user_id"]


def test_prefix_plans(scratch):
    df = queries.prefix_plans(scratch, "CREATE INDEX ix_uc ON orders (user_id, created_at)", {
        "first": "user_id = 5", "second": "created_at > '2024-01-01'"})
    assert list(df.verdict) == ["covering index search", "full index scan"]
    assert queries.list_indexes(scratch, "orders") == ["ix_orders_user_id"]


def test_write_cost_drops_its_indexes(scratch):
    df = queries.index_write_cost(scratch, (0, 1), rows=50, repeat=1)
    assert list(df.extra_indexes) == [0, 1]
    assert queries.list_indexes(scratch, "orders") == ["ix_orders_user_id"]


def test_alembic_migration_up_and_down(scratch):
    ran = queries.alembic_add_index(scratch)
    assert any("CREATE UNIQUE INDEX ix_users_email" in sql for sql in ran)
    assert explain(scratch, "SELECT id FROM users WHERE email = 'x'").index == "ix_users_email"
    queries.alembic_add_index(scratch, target="base")
    assert "ix_users_email" not in queries.list_indexes(scratch, "users")


def test_keyset_and_money():
    assert queries.money_sums(1000)["float_error"] > 0
    assert queries.money_sums(1000)["decimal"] == queries.money_sums(1000)["expected"]


def test_keyset_vs_offset(tiny):
    df = queries.keyset_vs_offset(tiny, 10, page_size=5, repeat=1)
    assert list(df.rows_skipped) == [50, 0]


@pytest.mark.parametrize("since,top,recent", [
    (datetime(2025, 6, 1), 10, 3), (datetime(2024, 1, 1), 3, 1), (datetime(2030, 1, 1), 5, 3)])
def test_lab_reference_matches_slow_report_in_3_queries(tiny, since, top, recent):
    with Session(tiny) as session:
        slow = queries.top_customers_report_slow(session, since, top, recent)
    with Session(tiny) as session, count_queries(tiny) as counted:
        fast = queries.top_customers_report(session, since, top, recent)
    assert fast == slow
    assert counted.count <= 3


def test_lab_questions_grade_reference_and_reject_slow():
    from perfcourse.grading import check

    check("02.q8", queries.top_customers_report)
    check("02.q9", list(queries.LAB_INDEXES))
    with pytest.raises(AssertionError, match="queries"):
        check("02.q8", queries.top_customers_report_slow)
    with pytest.raises(AssertionError, match="full"):
        check("02.q9", ["CREATE INDEX ix_status ON orders (status)"])


def test_lesson_practical_questions_reject_the_naive_answers():
    from datetime import date, timedelta

    from sqlalchemy import func

    from perfcourse.grading import check
    from perfcourse.models import Order, User

    def lazy(session, ids):
        return session.scalars(select(User).where(User.id.in_(ids)).order_by(User.id)).all()

    def on_day(day: date):
        return select(Order.id).where(func.date(Order.created_at) == day.isoformat())

    def on_range(day: date):
        start = datetime(day.year, day.month, day.day)
        return select(Order.id).where(Order.created_at >= start,
                                      Order.created_at < start + timedelta(days=1))

    with pytest.raises(AssertionError, match="N\\+1"):
        check("02.q3", lazy)
    with pytest.raises(AssertionError, match="index"):
        check("02.q5", on_day)
    check("02.q5", on_range)
    with pytest.raises(AssertionError):
        check("02.q4", "CREATE INDEX ix_total ON orders (total)")
    check("02.q4", "CREATE INDEX ix_sc ON orders (status, created_at)")


def test_prefix_plans_drops_expression_indexes(scratch):
    df = queries.prefix_plans(scratch, "CREATE INDEX ix_lower ON users (lower(email))",
                              {"lower": "lower(email) = 'a'"}, table="users")
    assert df.verdict.item() == "index search"
    assert "ix_lower" not in queries.explain(scratch, "SELECT id FROM users WHERE lower(email) = 'a'").indexes
