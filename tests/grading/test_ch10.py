"""Grader tests of chapter 10 (the ten interview questions): right answers written other ways
than the model answers pass, the usual mistakes fail with a hint that names them, choice keys are
accepted in any case and spacing.

Everything runs on private in-memory copies of the tiny dataset: no server, nothing timed.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select, text
from sqlalchemy.orm import selectinload

from perfcourse.chapters import interview_questions as interview
from perfcourse.grading import question
from perfcourse.models import Order, User

from .kit import fails, passes

# --------------------------------------------------------------------------------------------
# Choice questions


@pytest.mark.parametrize("qid, key", [("10.q3", "a"), ("10.q4", "b"), ("10.q8", "c"), ("10.q10", "d")])
def test_choice_keys_follow_the_bank_wide_order(qid, key):
    assert question(qid).checker.correct == key
    passes(qid, f" ({key.upper()}) ")


@pytest.mark.parametrize("qid, right", [("10.q5", {"b", "c", "e", "h"}), ("10.q9", {"a", "b", "e", "g"})])
def test_multiselects_have_the_assigned_right_sets(qid, right):
    assert question(qid).checker.correct == right
    passes(qid, " ".join(sorted(right)).upper())


@pytest.mark.parametrize("qid", [f"10.q{n}" for n in range(1, 11)])
def test_every_question_shows_a_model_answer_and_where_it_was_taught(qid):
    q = question(qid)
    assert len(q.model_answer()) > 40
    assert "Taught in" in q.explanation


# --------------------------------------------------------------------------------------------
# 10.q1: the bottleneck of a trace, by self time


def bottleneck_by_tree(spans):
    """Builds the tree, then walks it recursively."""
    kids = defaultdict(list)
    for span in spans:
        kids[span["parent"]].append(span)
    own = defaultdict(float)

    def visit(span):
        inside = sum(child["end"] - child["start"] for child in kids[span["id"]])
        own[span["name"]] += span["end"] - span["start"] - inside
        for child in kids[span["id"]]:
            visit(child)

    for root in kids[None]:
        visit(root)
    return sorted(own.items(), key=lambda item: -item[1])[0][0]


def bottleneck_with_pandas(spans):
    import pandas as pd

    df = pd.DataFrame(spans)
    df["duration"] = df["end"] - df["start"]
    inside = df.groupby("parent")["duration"].sum()
    df["own"] = df["duration"] - df["id"].map(inside).fillna(0)
    return str(df.groupby("name")["own"].sum().idxmax())


def inclusive(spans):
    return max(spans, key=lambda s: s["end"] - s["start"])["name"]


def single_span_self(spans):
    inside = defaultdict(float)
    for span in spans:
        if span["parent"]:
            inside[span["parent"]] += span["end"] - span["start"]
    return max(spans, key=lambda s: s["end"] - s["start"] - inside[s["id"]])["name"]


def leaves_only(spans):
    parents = {s["parent"] for s in spans}
    total = defaultdict(float)
    for span in spans:
        if span["id"] not in parents:
            total[span["name"]] += span["end"] - span["start"]
    return max(total, key=total.get)


def non_root_inclusive_by_name(spans):
    total = defaultdict(float)
    for span in spans:
        if span["parent"] is not None:
            total[span["name"]] += span["end"] - span["start"]
    return max(total, key=total.get)


def all_descendants_subtracted(spans):
    by_id = {s["id"]: s for s in spans}
    inside = defaultdict(float)
    for span in spans:
        parent = span["parent"]
        while parent is not None:  # every ancestor, not only the parent
            inside[parent] += span["end"] - span["start"]
            parent = by_id[parent]["parent"]
    own = defaultdict(float)
    for span in spans:
        own[span["name"]] += span["end"] - span["start"] - inside[span["id"]]
    return max(own, key=own.get)


@pytest.mark.parametrize("answer", [bottleneck_by_tree, bottleneck_with_pandas],
                         ids=["recursive-tree", "pandas-groupby"])
def test_q1_right_answers_pass(answer):
    passes("10.q1", answer)


@pytest.mark.parametrize("answer, hints", [
    (inclusive, ("includes the time of the spans inside it",)),
    (single_span_self, ("single span", "add up self time per name")),
    (leaves_only, ("own code", "direct")),
    (non_root_inclusive_by_name, ("root",)),
    (all_descendants_subtracted, ("direct", "grandchildren")),
    (lambda spans: "render", ("self time",)),
    (lambda spans: spans[0], ("a str",)),
    (lambda spans: "slowest", ("not the name of any span",)),
], ids=["largest-duration", "largest-single-span", "leaves-only", "root-left-out",
        "every-descendant-subtracted", "hard-coded-name", "returns-a-span", "unknown-name"])
def test_q1_wrong_answers_fail_with_the_reason(answer, hints):
    fails("10.q1", answer, *hints)


def test_q1_the_lessons_tracer_gives_the_graders_shape():
    tracer = interview.Tracer(clock=iter(range(100)).__next__)
    with tracer.span("root"):
        with tracer.span("child"):
            pass
    assert bottleneck_by_tree(tracer.spans) in {"root", "child"}
    assert set(tracer.spans[0]) == {"id", "parent", "name", "start", "end"}


# --------------------------------------------------------------------------------------------
# 10.q2: orders per user in one query


def counts_by_correlated_subquery(session, user_ids):
    orders = (select(func.count(Order.id)).where(Order.user_id == User.id)
              .correlate(User).scalar_subquery())
    rows = session.execute(select(User.id, orders).where(User.id.in_(user_ids))).all()
    found = dict(rows)
    return {i: found.get(i, 0) for i in user_ids}


def counts_by_raw_sql(session, user_ids):
    if not user_ids:
        return {}
    statement = text("SELECT user_id, COUNT(*) FROM orders WHERE user_id IN :ids GROUP BY user_id") \
        .bindparams(sa.bindparam("ids", expanding=True))
    counts = dict.fromkeys(user_ids, 0)
    counts.update(dict(session.execute(statement, {"ids": list(user_ids)}).all()))
    return counts


def lazy_loop(session, user_ids):
    return {i: len(session.get(User, i).orders) for i in user_ids}


def selectin(session, user_ids):
    users = session.scalars(select(User).where(User.id.in_(user_ids))
                            .options(selectinload(User.orders))).all()
    return {u.id: len(u.orders) for u in users}


def joined_then_len(session, user_ids):
    users = session.scalars(select(User).where(User.id.in_(user_ids))
                            .options(sa.orm.joinedload(User.orders))).unique().all()
    return {u.id: len(u.orders) for u in users}


def inner_join(session, user_ids):
    return dict(session.execute(select(User.id, func.count(Order.id)).join(Order)
                                .where(User.id.in_(user_ids)).group_by(User.id)).all())


def count_star_outer(session, user_ids):
    return dict(session.execute(select(User.id, func.count()).outerjoin(Order)
                                .where(User.id.in_(user_ids)).group_by(User.id)).all())


def all_users(session, user_ids):
    return dict(session.execute(select(User.id, func.count(Order.id)).outerjoin(Order)
                                .group_by(User.id)).all())


@pytest.mark.parametrize("answer", [counts_by_correlated_subquery, counts_by_raw_sql],
                         ids=["correlated-subquery", "raw-sql-expanding-in"])
def test_q2_right_answers_pass(answer):
    passes("10.q2", answer)


@pytest.mark.parametrize("answer, hints", [
    (lazy_loop, ("queries", "N+1")),
    (selectin, ("2 queries",)),
    (joined_then_len, ("loaded", "Order objects")),
    (inner_join, ("without orders", "inner join")),
    (count_star_outer, ("count(Order.id)",)),
    (all_users, ("not asked for",)),
    (lambda session, ids: [(i, 0) for i in ids], ("dict",)),
], ids=["lazy-loop", "selectinload", "joinedload-len", "inner-join", "count-star", "every-user",
        "list-of-pairs"])
def test_q2_wrong_answers_fail_with_the_reason(answer, hints):
    fails("10.q2", answer, *hints)


# --------------------------------------------------------------------------------------------
# 10.q6: an index for a filter and a sort


@pytest.mark.parametrize("answer", [
    "CREATE INDEX ix_recent ON orders (status, user_id, created_at)",
    "create index ix_recent_desc on orders (user_id, status, created_at desc);",
    ["CREATE INDEX ix_a ON orders (total)",
     "CREATE INDEX ix_b ON orders (user_id, status, created_at, total)"],
    lambda engine: sa.Index("ix_fn", Order.__table__.c.user_id, Order.__table__.c.status,
                            Order.__table__.c.created_at).create(engine),
], ids=["status-first", "descending", "two-statements-covering", "sqlalchemy-index-by-function"])
def test_q6_right_answers_pass(answer):
    passes("10.q6", answer)


@pytest.mark.parametrize("answer, hints", [
    ("CREATE INDEX ix_us ON orders (user_id, status)", ("TEMP B-TREE", "ORDER BY column")),
    ("CREATE INDEX ix_uc ON orders (user_id, created_at)", ("user_id=? only",)),
    ("CREATE INDEX ix_c ON orders (created_at)", ("only",)),
    ("CREATE INDEX ix_s ON orders (status)", ("only",)),
    ("CREATE INDEX ix_cus ON orders (created_at, user_id, status)", ("only",)),
    ("DROP INDEX ix_orders_user_id", ("CREATE INDEX statements only",)),
    ("", ("CREATE INDEX statement",)),
], ids=["no-sort-column", "skips-status", "sort-column-only", "status-only", "sort-column-first",
        "drop", "empty"])
def test_q6_wrong_answers_fail_with_the_reason(answer, hints):
    fails("10.q6", answer, *hints)


# --------------------------------------------------------------------------------------------
# 10.q7: keyset batches on a column with ties


def batches_with_tuple_and_fresh_lists(session, batch_size):
    last = (sa.literal("0"), sa.literal(0))
    first = True
    while True:
        query = select(Order).order_by(Order.created_at, Order.id).limit(batch_size)
        if not first:
            query = query.where(sa.tuple_(Order.created_at, Order.id) > sa.tuple_(*last))
        rows = session.scalars(query).all()
        if not rows:
            break
        first = False
        yield list(rows)
        last = (rows[-1].created_at, rows[-1].id)


def batches_by_islice(session, batch_size):
    """Builds the keyset condition by hand and stops on a short batch."""
    cursor = None
    while True:
        query = select(Order)
        if cursor:
            query = query.where((Order.created_at > cursor[0])
                                | ((Order.created_at == cursor[0]) & (Order.id > cursor[1])))
        batch = list(itertools.islice(
            session.scalars(query.order_by(Order.created_at.asc(), Order.id.asc()).limit(batch_size)),
            batch_size))
        if not batch:
            return
        yield batch
        if len(batch) < batch_size:
            return
        cursor = (batch[-1].created_at, batch[-1].id)
        session.expunge_all()


def created_at_only(session, batch_size):
    last = None
    while True:
        query = select(Order).order_by(Order.created_at, Order.id).limit(batch_size)
        if last is not None:
            query = query.where(Order.created_at > last)
        batch = session.scalars(query).all()
        if not batch:
            return
        yield batch
        last = batch[-1].created_at


def created_at_at_least(session, batch_size):
    last, seen = None, 0
    while seen < 5000:
        query = select(Order).order_by(Order.created_at, Order.id).limit(batch_size)
        if last is not None:
            query = query.where(Order.created_at >= last)
        batch = session.scalars(query).all()
        if not batch or (last is not None and batch[-1].created_at == last and len(batch) < batch_size):
            return
        seen += 1
        yield batch
        last = batch[-1].created_at


def by_offset(session, batch_size):
    offset = 0
    while True:
        batch = session.scalars(select(Order).order_by(Order.created_at, Order.id)
                                .limit(batch_size).offset(offset)).all()
        if not batch:
            return
        yield batch
        offset += batch_size


def load_then_chunk(session, batch_size):
    orders = session.scalars(select(Order).order_by(Order.created_at, Order.id)).all()
    for start in range(0, len(orders), batch_size):
        yield orders[start:start + batch_size]


def ordered_by_id(session, batch_size):
    last = 0
    while True:
        batch = session.scalars(select(Order).where(Order.id > last).order_by(Order.id)
                                .limit(batch_size)).all()
        if not batch:
            return
        yield batch
        last = batch[-1].id


def one_batch(session, batch_size):
    return [session.scalars(select(Order).order_by(Order.created_at, Order.id)).all()]


def counts_again(session, batch_size):
    """Right rows, but a COUNT before every batch."""
    for batch in batches_by_islice(session, batch_size):
        session.execute(select(func.count()).select_from(Order)).scalar()
        session.execute(select(func.count()).select_from(Order)).scalar()
        yield batch


@pytest.mark.parametrize("answer", [batches_with_tuple_and_fresh_lists, batches_by_islice],
                         ids=["tuple-comparison", "or-and-short-batch-stop"])
def test_q7_right_answers_pass(answer):
    passes("10.q7", answer)


@pytest.mark.parametrize("answer, hints", [
    (created_at_only, ("never came", "(created_at, id)")),
    (created_at_at_least, ("came twice",)),
    (by_offset, ("OFFSET",)),
    (load_then_chunk, ("one short keyset query per batch",)),
    (ordered_by_id, ("not in (created_at, id) order",)),
    (one_batch, ("batch_size",)),
    (counts_again, ("queries for",)),
    (lambda session, batch_size: [1, 2, 3], ("list of orders",)),
], ids=["created-at-only", "created-at-at-least", "offset", "load-all-then-chunk", "by-id",
        "everything-in-one-batch", "extra-queries", "ints"])
def test_q7_wrong_answers_fail_with_the_reason(answer, hints):
    fails("10.q7", answer, *hints)
