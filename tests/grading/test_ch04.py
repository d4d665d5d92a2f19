"""Graders of chapter 04 (memory and CPU): right answers written other ways pass, the mistakes
learners make fail with a hint that names them.

The practical checks run on the grader's own in-memory databases (nothing to clean up); no test
asserts on time. Memory is judged by tracemalloc byte counts inside the grader.
"""

from __future__ import annotations

import csv
import functools
import io
from collections import Counter, OrderedDict
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session, selectinload

from perfcourse.models import Category, Order, OrderItem, Product, User

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


# --- the lab: 04.q7, the nightly export in bounded memory ----------------------------------

LINE_HEADER = ["order_id", "ordered_on", "product", "quantity", "unit_price", "line_total"]


def _window_lines(since, until):
    return (select(Order.id, Order.created_at, Product.name, OrderItem.quantity, OrderItem.unit_price)
            .join(OrderItem, OrderItem.order_id == Order.id)
            .join(Product, Product.id == OrderItem.product_id)
            .where(Order.created_at >= since, Order.created_at < until, Order.status != "cancelled")
            .order_by(Order.id, OrderItem.id))


def _line(order_id, created_at, name, quantity, price):
    return [order_id, created_at.date().isoformat(), name, quantity, price, quantity * price]


def lines_orm_yield_per_selectin(engine, out, since, until):
    """ORM objects streamed with yield_per, items and products eager-loaded per batch."""
    statement = (select(Order).where(Order.created_at >= since, Order.created_at < until,
                                     Order.status != "cancelled").order_by(Order.id)
                 .options(selectinload(Order.items).selectinload(OrderItem.product))
                 .execution_options(yield_per=500))
    writer = csv.writer(out)
    writer.writerow(LINE_HEADER)
    with Session(engine) as session:
        for order in session.scalars(statement):
            for item in sorted(order.items, key=lambda i: i.id):
                writer.writerow(_line(order.id, order.created_at, item.product.name, item.quantity,
                                      item.unit_price))


def lines_keyset_batches(engine, out, since, until):
    """Keyset batches on the order item id, one joined query per batch of 800 lines."""
    writer = csv.writer(out)
    writer.writerow(LINE_HEADER)
    last = (0, 0)
    with engine.connect() as conn:
        while True:
            rows = conn.execute(
                _window_lines(since, until).add_columns(OrderItem.id)
                .where(sa.tuple_(Order.id, OrderItem.id) > sa.tuple_(*last)).limit(800)).all()
            if not rows:
                return
            writer.writerows(_line(*row[:5]) for row in rows)
            last = (rows[-1][0], rows[-1][5])


def lines_text_sql_stream_results(engine, out, since, until):
    """Text SQL with a server-side cursor, rows written one by one, the date cut from the text."""
    sql = text("SELECT o.id, o.created_at, p.name, i.quantity, i.unit_price "
               "FROM orders o JOIN order_items i ON i.order_id = o.id JOIN products p ON p.id = i.product_id "
               "WHERE o.created_at >= :since AND o.created_at < :until AND o.status <> 'cancelled' "
               "ORDER BY o.id, i.id")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(LINE_HEADER)
    with engine.connect().execution_options(stream_results=True, max_row_buffer=500) as conn:
        for order_id, created_at, name, quantity, price in conn.execute(sql, {"since": since, "until": until}):
            price = Decimal(str(price))
            writer.writerow([order_id, str(created_at)[:10], name, quantity, f"{price:.2f}",
                             f"{quantity * price:.2f}"])


@pytest.mark.parametrize("export", [lines_orm_yield_per_selectin, lines_keyset_batches,
                                    lines_text_sql_stream_results], ids=lambda f: f.__name__)
def test_q7_bounded_exports_written_other_ways_pass(export):
    passes("04.q7", export)


def lines_loading_all(engine, out, since, until):
    with engine.connect() as conn:
        rows = conn.execute(_window_lines(since, until)).all()
    writer = csv.writer(out)
    writer.writerow(LINE_HEADER)
    writer.writerows(_line(*row) for row in rows)


def lines_streamed_into_a_string(engine, out, since, until):
    text_out = io.StringIO()  # every line in memory before anything reaches out
    writer = csv.writer(text_out)
    writer.writerow(LINE_HEADER)
    with engine.connect() as conn:
        for rows in conn.execute(_window_lines(since, until).execution_options(yield_per=1000)).partitions():
            writer.writerows(_line(*row) for row in rows)
    out.write(text_out.getvalue())


def lines_client_side_cursor(engine, out, since, until):
    writer = csv.writer(out)
    writer.writerow(LINE_HEADER)
    with engine.connect() as conn:
        for row in conn.execute(_window_lines(since, until)):
            writer.writerow(_line(*row))


def lines_product_lazy_loaded(engine, out, since, until):
    """Streamed order items, the product looked up one query per line: an N+1."""
    statement = (select(OrderItem, Order.created_at).join(Order, Order.id == OrderItem.order_id)
                 .where(Order.created_at >= since, Order.created_at < until, Order.status != "cancelled")
                 .order_by(Order.id, OrderItem.id).execution_options(yield_per=1000))
    writer = csv.writer(out)
    writer.writerow(LINE_HEADER)
    with Session(engine) as session:
        for item, created_at in session.execute(statement):
            name = session.execute(select(Product.name).where(Product.id == item.product_id)).scalar_one()
            writer.writerow(_line(item.order_id, created_at, name, item.quantity, item.unit_price))


def lines_joined_by_hand(engine, out, since, until):
    out.write(",".join(LINE_HEADER) + "\n")
    with engine.connect() as conn:
        for rows in conn.execute(_window_lines(since, until).execution_options(yield_per=1000)).partitions():
            for row in rows:
                out.write(",".join(map(str, _line(*row))) + "\n")


def _streamed(statement, out, engine, make_line=_line):
    writer = csv.writer(out)
    writer.writerow(LINE_HEADER)
    with engine.connect() as conn:
        for rows in conn.execute(statement.execution_options(yield_per=1000)).partitions():
            writer.writerows(make_line(*row) for row in rows)


def lines_with_cancelled(engine, out, since, until):
    statement = (select(Order.id, Order.created_at, Product.name, OrderItem.quantity, OrderItem.unit_price)
                 .join(OrderItem, OrderItem.order_id == Order.id).join(Product, Product.id == OrderItem.product_id)
                 .where(Order.created_at >= since, Order.created_at < until).order_by(Order.id, OrderItem.id))
    _streamed(statement, out, engine)


def lines_until_included(engine, out, since, until):
    statement = (select(Order.id, Order.created_at, Product.name, OrderItem.quantity, OrderItem.unit_price)
                 .join(OrderItem, OrderItem.order_id == Order.id).join(Product, Product.id == OrderItem.product_id)
                 .where(Order.created_at >= since, Order.created_at <= until, Order.status != "cancelled")
                 .order_by(Order.id, OrderItem.id))
    _streamed(statement, out, engine)


def lines_since_excluded(engine, out, since, until):
    statement = (select(Order.id, Order.created_at, Product.name, OrderItem.quantity, OrderItem.unit_price)
                 .join(OrderItem, OrderItem.order_id == Order.id).join(Product, Product.id == OrderItem.product_id)
                 .where(Order.created_at > since, Order.created_at < until, Order.status != "cancelled")
                 .order_by(Order.id, OrderItem.id))
    _streamed(statement, out, engine)


def lines_unit_price_as_total(engine, out, since, until):
    _streamed(_window_lines(since, until), out, engine,
              lambda o, t, n, q, p: [o, t.date().isoformat(), n, q, p, p])


def lines_without_header(engine, out, since, until):
    writer = csv.writer(out)
    with engine.connect() as conn:
        for rows in conn.execute(_window_lines(since, until).execution_options(yield_per=1000)).partitions():
            writer.writerows(_line(*row) for row in rows)


Q7_WRONG = [
    (lines_loading_all, ("memory grows with the window", "stream")),
    (lines_streamed_into_a_string, ("in one write", "StringIO")),
    (lines_client_side_cursor, ("client-side cursor", "yield_per")),
    (lines_product_lazy_loaded, ("statements", "N+1")),
    (lines_joined_by_hand, ("csv.writer", "quotes")),
    (lines_with_cancelled, ("cancelled",)),
    (lines_until_included, ("until", "excludes")),
    (lines_since_excluded, ("since exactly",)),
    (lines_unit_price_as_total, ("line_total", "quantity x unit_price")),
    (lines_without_header, ("header",)),
]


@pytest.mark.parametrize("export, hint", Q7_WRONG, ids=[f.__name__ for f, _ in Q7_WRONG])
def test_q7_wrong_exports_fail_with_a_hint_naming_the_mistake(export, hint):
    fails("04.q7", export, *hint)


# --- the lab: 04.q8, the category report in one statement ----------------------------------


def report_text_sql_left_join_on(engine, since):
    """The conditions in the ON clause of a nested join, in plain SQL."""
    sql = text("SELECT c.name, count(DISTINCT o.id), coalesce(sum(CASE WHEN o.id IS NOT NULL THEN i.quantity END), 0), "
               "coalesce(sum(CASE WHEN o.id IS NOT NULL THEN i.quantity * i.unit_price END), 0) "
               "FROM categories c LEFT JOIN products p ON p.category_id = c.id "
               "LEFT JOIN order_items i ON i.product_id = p.id "
               "LEFT JOIN orders o ON o.id = i.order_id AND o.created_at >= :since AND o.status <> 'cancelled' "
               "GROUP BY c.id, c.name ORDER BY c.name")
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sql, {"since": since})]


def report_filter_clauses(engine, since):
    """The lines filtered in a subquery, outer-joined, then aggregated with floats."""
    lines = (select(Product.category_id, OrderItem.order_id, OrderItem.quantity, OrderItem.unit_price)
             .join(Order, Order.id == OrderItem.order_id).join(Product, Product.id == OrderItem.product_id)
             .where(Order.created_at >= since, Order.status != "cancelled").subquery())
    statement = (select(Category.name, func.count(lines.c.order_id.distinct()),
                        func.coalesce(func.sum(lines.c.quantity), 0),
                        func.coalesce(func.sum(lines.c.quantity * lines.c.unit_price), 0))
                 .outerjoin(lines, lines.c.category_id == Category.id)
                 .group_by(Category.id).order_by(Category.name))
    with engine.connect() as conn:
        return [(name, orders, units, float(revenue)) for name, orders, units, revenue in conn.execute(statement)]


@pytest.mark.parametrize("answer", [report_text_sql_left_join_on, report_filter_clauses],
                         ids=lambda f: f.__name__)
def test_q8_one_statement_reports_written_other_ways_pass(answer):
    passes("04.q8", answer)


def _inner_report(since, *, where_on_left_join=False, distinct=True, cancelled=False, strict=False):
    orders = func.count(OrderItem.order_id.distinct()) if distinct else func.count()
    conditions = [Order.created_at > since if strict else Order.created_at >= since]
    if not cancelled:
        conditions.append(Order.status != "cancelled")
    statement = (select(Category.name, orders, func.sum(OrderItem.quantity),
                        func.sum(OrderItem.quantity * OrderItem.unit_price)))
    if where_on_left_join:
        statement = (statement.select_from(Category).outerjoin(Product, Product.category_id == Category.id)
                     .outerjoin(OrderItem, OrderItem.product_id == Product.id)
                     .outerjoin(Order, Order.id == OrderItem.order_id))
    else:
        statement = (statement.join(Product, Product.category_id == Category.id)
                     .join(OrderItem, OrderItem.product_id == Product.id)
                     .join(Order, Order.id == OrderItem.order_id))
    return statement.where(*conditions).group_by(Category.id, Category.name).order_by(Category.name)


def _filled(engine, since, *, distinct=True, cancelled=False, strict=False):
    """A variant of the report in one statement: aggregated per category, categories left-joined."""
    orders = func.count(OrderItem.order_id.distinct()) if distinct else func.count()
    conditions = [Order.created_at > since if strict else Order.created_at >= since]
    if not cancelled:
        conditions.append(Order.status != "cancelled")
    per_category = (select(Product.category_id, orders.label("orders"), func.sum(OrderItem.quantity).label("units"),
                           func.sum(OrderItem.quantity * OrderItem.unit_price).label("revenue"))
                    .join(Order, Order.id == OrderItem.order_id).join(Product, Product.id == OrderItem.product_id)
                    .where(*conditions).group_by(Product.category_id).subquery())
    statement = (select(Category.name, func.coalesce(per_category.c.orders, 0),
                        func.coalesce(per_category.c.units, 0), func.coalesce(per_category.c.revenue, 0))
                 .outerjoin(per_category, per_category.c.category_id == Category.id).order_by(Category.name))
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(statement)]


def report_inner_join(engine, since):
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(_inner_report(since))]


def report_where_on_left_join(engine, since):
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(_inner_report(since, where_on_left_join=True))]


def report_counting_lines(engine, since):
    return _filled(engine, since, distinct=False)


def report_with_cancelled(engine, since):
    return _filled(engine, since, cancelled=True)


def report_since_excluded(engine, since):
    return _filled(engine, since, strict=True)


def report_two_statements(engine, since):
    """Right rows, but the categories are counted first, in a statement of their own."""
    with engine.connect() as conn:
        conn.execute(select(func.count()).select_from(Category)).scalar_one()
    return _filled(engine, since)


def report_summed_in_python(engine, since):
    """One statement, but every line of the period goes to Python."""
    statement = (select(Category.name, OrderItem.order_id, OrderItem.quantity, OrderItem.unit_price)
                 .select_from(Category).outerjoin(Product, Product.category_id == Category.id)
                 .outerjoin(OrderItem, OrderItem.product_id == Product.id)
                 .outerjoin(Order, (Order.id == OrderItem.order_id) & (Order.created_at >= since)
                            & (Order.status != "cancelled")).add_columns(Order.id))
    totals = {}
    with engine.connect() as conn:
        for name, _, quantity, price, order_id in conn.execute(statement):
            orders, units, revenue = totals.setdefault(name, (set(), 0, Decimal(0)))
            if order_id is not None:
                orders.add(order_id)
                totals[name] = (orders, units + quantity, revenue + quantity * Decimal(str(price)))
    return [(name, len(o), u, r) for name, (o, u, r) in sorted(totals.items())]


def report_one_query_per_category(engine, since):
    with engine.connect() as conn:
        names = conn.execute(select(Category.id, Category.name).order_by(Category.name)).all()
        rows = []
        for category_id, name in names:
            o, u, r = conn.execute(
                select(func.count(OrderItem.order_id.distinct()), func.coalesce(func.sum(OrderItem.quantity), 0),
                       func.coalesce(func.sum(OrderItem.quantity * OrderItem.unit_price), 0))
                .join(Order, Order.id == OrderItem.order_id).join(Product, Product.id == OrderItem.product_id)
                .where(Product.category_id == category_id, Order.created_at >= since,
                       Order.status != "cancelled")).one()
            rows.append((name, o, u, r))
    return rows


Q8_WRONG = [
    (report_inner_join, ("missing", "LEFT JOIN")),
    (report_where_on_left_join, ("missing", "WHERE")),
    (report_counting_lines, ("order lines", "DISTINCT")),
    (report_with_cancelled, ("cancelled",)),
    (report_since_excluded, ("since exactly", "included")),
    (report_two_statements, ("2 statements", "1 is needed")),
    (report_summed_in_python, ("Python", "aggregate")),
    (report_one_query_per_category, ("statements", "GROUP BY")),
]


@pytest.mark.parametrize("answer, hint", Q8_WRONG, ids=[f.__name__ for f, _ in Q8_WRONG])
def test_q8_wrong_reports_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("04.q8", answer, *hint)


# --- the lab: 04.q9, the hot function of the nightly job -----------------------------------


@pytest.fixture
def job():
    """A nightly job with a known hot step (it is the one the grader reads: made last)."""
    from perfcourse.chapters import memory_and_cpu as profiling

    made = profiling.NightlyJob(engine=None, seed=2)  # never run: the grader only reads it
    yield made
    profiling._JOBS.remove(made)


@pytest.mark.parametrize("form", ["rank_products", " rank_products() ",
                                  "perfcourse.chapters.memory_and_cpu.rank_products", "`rank_products`"])
def test_q9_the_hot_step_passes_in_the_forms_a_profile_shows(job, form):
    assert job._hot == "rank_products"
    passes("04.q9", form)


@pytest.mark.parametrize("answer, hint", [
    ("NightlyJob.run", ("where you entered", "below")),
    ("run", ("where you entered",)),
    ("dedupe_customers", ("quick one",)),
    ("load_job_data", ("quick one",)),
    ("<genexpr>", ("called by run()",)),
    ("sum", ("called by run()",)),
    (42, ("as a string",)),
    ("", ("as a string",)),
])
def test_q9_other_frames_fail_with_a_hint(job, answer, hint):
    fails("04.q9", answer, *hint)


def test_q9_without_a_job_asks_for_one(monkeypatch):
    from perfcourse.chapters import memory_and_cpu as profiling

    monkeypatch.setattr(profiling, "_JOBS", [])
    fails("04.q9", "rank_products", "no nightly job")
