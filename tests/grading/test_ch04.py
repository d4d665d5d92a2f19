"""Graders of chapter 04 (memory and CPU): right answers written other ways pass, the mistakes
learners make fail with a hint that names them.

The practical checks run on the grader's own in-memory databases (nothing to clean up); no test
asserts on time. Memory is judged by tracemalloc byte counts inside the grader.
"""

from __future__ import annotations

import csv
import functools
from collections import Counter, OrderedDict

import pytest
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session

from perfcourse.models import Order, OrderItem, User

from .kit import fails, passes

HEADER = ["order_id", "email", "status", "total"]

# --- 04.q1: multi-select ------------------------------------------------------------------

Q1_RIGHT = {"b", "c", "e", "g", "h"}


@pytest.mark.parametrize("form", [
    Q1_RIGHT,
    sorted(k.upper() for k in Q1_RIGHT),
    " b, c, e, g, h ",
    "BCEGH",
], ids=["set", "upper-list", "spaced-string", "letters"])
def test_q1_right_set_passes_in_any_form(form):
    passes("04.q1", form)


Q1_WRONG = [
    ("a", ("unreachable", "still references")),
    ("d", ("unbounded cache", "leak")),
    ("f", ("tracemalloc sees only", "RSS")),
    ("i", ("loop variable", "frees nothing")),
]


@pytest.mark.parametrize("key, hint", Q1_WRONG, ids=[k for k, _ in Q1_WRONG])
def test_q1_each_wrong_option_fails_with_its_explanation(key, hint):
    fails("04.q1", Q1_RIGHT | {key}, *hint)


def test_q1_a_missing_right_option_is_named_as_missing():
    fails("04.q1", Q1_RIGHT - {"h"}, "1 more option")


# --- 04.q2: one choice --------------------------------------------------------------------


@pytest.mark.parametrize("form", ["D", " d "], ids=["upper", "spaced"])
def test_q2_right_key_passes_in_any_form(form):
    passes("04.q2", form)


Q2_WRONG = [
    ("a", ("unreachable objects only",)),
    ("b", ("drops no reference",)),
    ("c", ("reference counting frees",)),
]


@pytest.mark.parametrize("key, hint", Q2_WRONG, ids=[k for k, _ in Q2_WRONG])
def test_q2_wrong_key_fails_with_its_explanation(key, hint):
    fails("04.q2", key, *hint)


# --- 04.q3: streaming export with a join --------------------------------------------------


def export_orm_yield_per(engine, sink):
    """ORM entities streamed with yield_per, the email through the relationship's join."""
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    statement = (select(Order, User.email).join(Order.user).order_by(Order.id)
                 .execution_options(yield_per=500))
    with Session(engine) as session:
        for order, email in session.execute(statement):
            writer.writerow([order.id, email, order.status, order.total])


def export_keyset_batches(engine, sink):
    """Keyset batches, one short query each (find_in_batches)."""
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    last = 0
    with engine.connect() as conn:
        while True:
            rows = conn.execute(
                select(Order.id, User.email, Order.status, Order.total)
                .join(User, User.id == Order.user_id).where(Order.id > last)
                .order_by(Order.id).limit(700)).all()
            if not rows:
                return
            writer.writerows(rows)
            last = rows[-1].id


def export_text_sql_stream_results(engine, sink):
    """Raw SQL on a streaming connection, row by row (floats: 12.5 for 12.50)."""
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    sql = text("SELECT o.id, u.email, o.status, o.total FROM orders o "
               "JOIN users u ON u.id = o.user_id ORDER BY o.id")
    with engine.connect() as conn:
        conn = conn.execution_options(stream_results=True, max_row_buffer=250)
        for row in conn.execute(sql):
            sink.write(f"{row[0]},{row[1]},{row[2]},{row[3]}\r\n")


@pytest.mark.parametrize("export", [export_orm_yield_per, export_keyset_batches,
                                    export_text_sql_stream_results],
                         ids=["orm-yield-per", "keyset-batches", "text-sql-stream-results"])
def test_q3_streaming_exports_written_other_ways_pass(export):
    passes("04.q3", export)


def _joined(statement_options=None):
    statement = (select(Order.id, User.email, Order.status, Order.total)
                 .join(User, User.id == Order.user_id).order_by(Order.id))
    return statement.execution_options(**statement_options) if statement_options else statement


def export_loading_all(engine, sink):
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    with engine.connect() as conn:
        writer.writerows(conn.execute(_joined()).all())


def export_client_side_cursor(engine, sink):
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    with engine.connect() as conn:
        result = conn.execute(_joined())
        while rows := result.fetchmany(500):  # batches of a result the driver already holds
            writer.writerows(rows)


def export_without_join(engine, sink):
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    statement = (select(Order.id, Order.user_id, Order.status, Order.total).order_by(Order.id)
                 .execution_options(yield_per=1000))
    with engine.connect() as conn:
        for rows in conn.execute(statement).partitions():
            writer.writerows(rows)


def export_sorted_by_user(engine, sink):
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    statement = (select(Order.id, User.email, Order.status, Order.total)
                 .join(User, User.id == Order.user_id).order_by(Order.user_id, Order.id)
                 .execution_options(yield_per=1000))
    with engine.connect() as conn:
        for rows in conn.execute(statement).partitions():
            writer.writerows(rows)


def export_pages_from_one(engine, sink):
    """OFFSET pages numbered from 1: the first page is never written."""
    writer = csv.writer(sink)
    writer.writerow(HEADER)
    page = 1
    with engine.connect() as conn:
        while rows := conn.execute(_joined().limit(1000).offset(page * 1000)).all():
            writer.writerows(rows)
            page += 1


def export_without_header(engine, sink):
    writer = csv.writer(sink)
    with engine.connect() as conn:
        for rows in conn.execute(_joined({"yield_per": 1000})).partitions():
            writer.writerows(rows)


def export_visible_example_only(engine, sink):
    sink.write("order_id,email,status,total\r\n7,ana@shop.test,delivered,12.50\r\n")


Q3_WRONG = [
    (export_loading_all, ("peaked", "loading every row first", "yield_per")),
    (export_client_side_cursor, ("client-side cursor", "PostgreSQL", "stream_results")),
    (export_without_join, ("email of the user", "join users")),
    (export_sorted_by_user, ("sorted by order id",)),
    (export_pages_from_one, ("data line 1 should be order",)),
    (export_without_header, ("first line should be the header",)),
    (export_visible_example_only, ("should be order",)),
]


@pytest.mark.parametrize("export, hint", Q3_WRONG, ids=[
    "load-all", "client-side-fetchmany", "user-id-not-email", "sorted-by-user",
    "offset-pages-from-1", "no-header", "visible-example-hard-coded"])
def test_q3_wrong_exports_fail_with_a_hint_naming_the_mistake(export, hint):
    fails("04.q3", export, *hint)


# --- 04.q4: products in more than k different orders -------------------------------------


def products_text_sql(engine, k):
    sql = text("SELECT product_id FROM order_items GROUP BY product_id "
               "HAVING COUNT(DISTINCT order_id) > :k ORDER BY product_id")
    with engine.connect() as conn:
        return [row.product_id for row in conn.execute(sql, {"k": k})]


def products_distinct_pairs_subquery(engine, k):
    pairs = select(OrderItem.order_id, OrderItem.product_id).distinct().subquery()
    statement = (select(pairs.c.product_id).group_by(pairs.c.product_id)
                 .having(func.count() > k))
    with Session(engine) as session:
        return sorted(session.scalars(statement))


def products_orm_having_not_at_most(engine, k):
    orders = func.count(func.distinct(OrderItem.order_id))
    statement = (select(OrderItem.product_id).group_by(OrderItem.product_id)
                 .having(~(orders <= k)).order_by(OrderItem.product_id.asc()))
    with engine.connect() as conn:
        return tuple(conn.execute(statement).scalars())


@pytest.mark.parametrize("answer", [products_text_sql, products_distinct_pairs_subquery,
                                    products_orm_having_not_at_most],
                         ids=["text-sql", "distinct-pairs-subquery", "orm-not-at-most"])
def test_q4_one_query_answers_written_other_ways_pass(answer):
    passes("04.q4", answer)


def products_counting_lines(engine, k):
    statement = (select(OrderItem.product_id).group_by(OrderItem.product_id)
                 .having(func.count() > k).order_by(OrderItem.product_id))
    with engine.connect() as conn:
        return list(conn.execute(statement).scalars())


def products_at_least_k(engine, k):
    statement = (select(OrderItem.product_id).group_by(OrderItem.product_id)
                 .having(func.count(OrderItem.order_id.distinct()) >= k)
                 .order_by(OrderItem.product_id))
    with engine.connect() as conn:
        return list(conn.execute(statement).scalars())


def products_one_count_per_product(engine, k):
    with engine.connect() as conn:
        products = conn.execute(select(OrderItem.product_id).distinct()).scalars().all()
        return sorted(p for p in products if conn.execute(
            select(func.count(OrderItem.order_id.distinct()))
            .where(OrderItem.product_id == p)).scalar_one() > k)


def products_counted_in_python(engine, k):
    with engine.connect() as conn:
        pairs = set(conn.execute(select(OrderItem.order_id, OrderItem.product_id)).all())
    counts = Counter(product for _, product in pairs)
    return sorted(p for p, n in counts.items() if n > k)


def products_hard_coded(engine, k):
    return [7]


Q4_WRONG = [
    (products_counting_lines, ("counts order lines", "DISTINCT")),
    (products_at_least_k, ("> k, not >= k",)),
    (products_one_count_per_product, ("queries", "N+1")),
    (products_counted_in_python, ("GROUP BY", "Python")),
    (products_hard_coded, ("other products",)),
]


@pytest.mark.parametrize("answer, hint", Q4_WRONG, ids=[
    "count-star-lines", "at-least-k", "n-plus-one", "counter-in-python", "hard-coded"])
def test_q4_wrong_answers_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("04.q4", answer, *hint)


# --- 04.q5: memoise per data version ------------------------------------------------------


def make_cached_ordered_dict(compute, maxsize, version):
    """A hand-written LRU keyed on (version, arguments)."""
    cache = OrderedDict()

    def cached(product_id, currency):
        key = (version(), product_id, currency)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = cache[key] = compute(product_id, currency)
        if len(cache) > maxsize:
            cache.popitem(last=False)
        return value

    return cached


def make_cached_clear_on_change(compute, maxsize, version):
    """lru_cache on the arguments, emptied when the version moves."""
    seen = {"version": None}
    memo = functools.lru_cache(maxsize=maxsize)(compute)

    def cached(product_id, currency):
        current = version()
        if current != seen["version"]:
            memo.cache_clear()
            seen["version"] = current
        return memo(product_id, currency)

    return cached


class VersionedCache:
    """A callable object with the cache in a dict that keeps insertion order."""

    def __init__(self, compute, maxsize, version):
        self.compute, self.maxsize, self.version = compute, maxsize, version
        self.entries = {}

    def __call__(self, product_id, currency):
        key = (self.version(), product_id, currency)
        if key in self.entries:
            self.entries[key] = self.entries.pop(key)  # now the most recent
        else:
            self.entries[key] = self.compute(product_id, currency)
            while len(self.entries) > self.maxsize:
                del self.entries[next(iter(self.entries))]
        return self.entries[key]


@pytest.mark.parametrize("answer", [make_cached_ordered_dict, make_cached_clear_on_change,
                                    VersionedCache],
                         ids=["ordered-dict", "clear-on-version-change", "callable-class"])
def test_q5_caches_written_other_ways_pass(answer):
    passes("04.q5", answer)


def make_cached_ignoring_version(compute, maxsize, version):
    return functools.lru_cache(maxsize=maxsize)(compute)


def make_cached_version_read_once(compute, maxsize, version):
    at_start = version()
    memo = functools.lru_cache(maxsize=maxsize)(lambda v, p, c: compute(p, c))
    return lambda product_id, currency: memo(at_start, product_id, currency)


def make_cached_ignoring_arguments(compute, maxsize, version):
    cache = {}

    def cached(product_id, currency):
        if version() not in cache:
            cache[version()] = compute(product_id, currency)
        return cache[version()]

    return cached


def make_cached_unbounded(compute, maxsize, version):
    cache = {}

    def cached(product_id, currency):
        key = (version(), product_id, currency)
        if key not in cache:
            cache[key] = compute(product_id, currency)
        return cache[key]

    return cached


def make_cached_by_identity(compute, maxsize, version):
    cache = OrderedDict()

    def cached(product_id, currency):
        key = (version(), id(product_id), id(currency))
        if key not in cache:
            cache[key] = compute(product_id, currency)
            if len(cache) > maxsize:
                cache.popitem(last=False)
        return cache[key]

    return cached


def make_cached_not_at_all(compute, maxsize, version):
    return compute


Q5_WRONG = [
    (make_cached_ignoring_version, ("older version", "stale")),
    (make_cached_version_read_once, ("older version",)),
    (make_cached_ignoring_arguments, ("other arguments",)),
    (make_cached_unbounded, ("fewer", "more than maxsize", "unbounded")),
    (make_cached_by_identity, ("key",)),
    (make_cached_not_at_all, ("more than an LRU cache",)),
]


@pytest.mark.parametrize("answer, hint", Q5_WRONG, ids=[
    "ignores-version", "version-read-once", "ignores-arguments", "unbounded", "keyed-by-id",
    "no-cache"])
def test_q5_wrong_caches_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("04.q5", answer, *hint)


# --- 04.q6: orders per total band, one query ----------------------------------------------


def bands_sum_case(engine):
    def band(condition):
        return func.sum(case((condition, 1), else_=0))

    statement = select(band(Order.total < 50), band((Order.total >= 50) & (Order.total < 200)),
                       band(Order.total >= 200))
    with engine.connect() as conn:
        small, medium, large = conn.execute(statement).one()
    return {"small": int(small or 0), "medium": int(medium or 0), "large": int(large or 0)}


def bands_text_sql_booleans(engine):
    sql = ("SELECT total(total < 50) AS small, total(total >= 50 AND total < 200) AS medium, "
           "total(total >= 200) AS large FROM orders")
    with engine.connect() as conn:
        row = conn.exec_driver_sql(sql).one()
    return {name: int(value) for name, value in row._mapping.items()}


def bands_group_by_case_filled(engine):
    band = case((Order.total < 50, "small"), (Order.total < 200, "medium"), else_="large")
    counts = dict.fromkeys(("small", "medium", "large"), 0)
    with engine.connect() as conn:
        for name, n in conn.execute(select(band, func.count()).group_by(band)):
            counts[name] = n
    return counts


@pytest.mark.parametrize("answer", [bands_sum_case, bands_text_sql_booleans,
                                    bands_group_by_case_filled],
                         ids=["sum-case", "text-sql-booleans", "group-by-case-filled"])
def test_q6_one_query_answers_written_other_ways_pass(answer):
    passes("04.q6", answer)


def bands_bounds_shifted(engine):
    columns = [func.count().filter(Order.total <= 50).label("small"),
               func.count().filter(Order.total > 50, Order.total <= 200).label("medium"),
               func.count().filter(Order.total > 200).label("large")]
    with engine.connect() as conn:
        return dict(conn.execute(select(*columns)).one()._mapping)


def bands_three_queries(engine):
    conditions = {"small": Order.total < 50, "medium": (Order.total >= 50) & (Order.total < 200),
                  "large": Order.total >= 200}
    with engine.connect() as conn:
        return {name: conn.execute(select(func.count()).select_from(Order).where(c)).scalar_one()
                for name, c in conditions.items()}


def bands_counted_in_python(engine):
    counts = {"small": 0, "medium": 0, "large": 0}
    with engine.connect() as conn:
        for total in conn.execute(select(Order.total)).scalars():
            counts["small" if total < 50 else "medium" if total < 200 else "large"] += 1
    return counts


def bands_group_by_without_empty(engine):
    band = case((Order.total < 50, "small"), (Order.total < 200, "medium"), else_="large")
    with engine.connect() as conn:
        return dict(conn.execute(select(band, func.count()).group_by(band)).all())


def bands_without_cancelled(engine):
    columns = [func.count().filter(Order.total < 50).label("small"),
               func.count().filter(Order.total >= 50, Order.total < 200).label("medium"),
               func.count().filter(Order.total >= 200).label("large")]
    with engine.connect() as conn:
        return dict(conn.execute(select(*columns).where(Order.status != "cancelled"))
                    .one()._mapping)


def bands_visible_example(engine):
    return {"small": 1, "medium": 2, "large": 2}


Q6_WRONG = [
    (bands_bounds_shifted, ("exactly 50.00 is medium",)),
    (bands_three_queries, ("3 queries", "at most 1")),
    (bands_counted_in_python, ("every order's total to Python",)),
    (bands_group_by_without_empty, ("every band must be there", "GROUP BY")),
    (bands_without_cancelled, ("whatever its status",)),
    (bands_visible_example, ("add up to 5",)),
]


@pytest.mark.parametrize("answer, hint", Q6_WRONG, ids=[
    "bounds-shifted", "three-queries", "counted-in-python", "group-by-drops-empty-band",
    "cancelled-left-out", "visible-example-hard-coded"])
def test_q6_wrong_answers_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("04.q6", answer, *hint)
