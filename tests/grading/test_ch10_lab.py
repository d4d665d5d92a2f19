"""Grader tests for chapter 10's capstone lab (the slow shop): right answers written differently
from the model answers pass, plausible wrong ones fail with a hint that names the mistake.

10.q15 and 10.q16 use the course's Redis (a private namespace, removed by the check); 10.q18 a
copy of the course dataset. Nothing here asserts on time.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from datetime import datetime, time, timedelta

import pytest
from rq import Queue
from sqlalchemy import String, cast, func, select
from sqlalchemy.orm import Session, joinedload, selectinload

from perfcourse.chapters.interview_questions import capstone
from perfcourse.models import Category, Order, OrderItem, Product, User

from .kit import fails, passes

# ------------------------------------------------------------------------------------------
# 10.q11: the order history without N+1


def _page(orders):
    return [{"order_id": o.id, "created_at": o.created_at, "status": o.status, "total": o.total,
             "items": [{"product": i.product.name, "category": i.product.category.name,
                        "quantity": i.quantity} for i in sorted(o.items, key=lambda i: i.id)]}
            for o in orders]


def history_joined(session, user_id):
    newest = (select(Order.id).where(Order.user_id == user_id)
              .order_by(Order.created_at.desc(), Order.id.desc()).limit(10).scalar_subquery())
    orders = session.scalars(
        select(Order).where(Order.id.in_(newest))
        .options(joinedload(Order.items).joinedload(OrderItem.product).joinedload(Product.category))
    ).unique().all()
    return _page(sorted(orders, key=lambda o: (o.created_at, o.id), reverse=True))


def history_by_hand(session, user_id):
    orders = session.execute(
        select(Order.id, Order.created_at, Order.status, Order.total).where(Order.user_id == user_id)
        .order_by(Order.created_at.desc(), Order.id.desc()).limit(10)).all()
    items = {}
    for order_id, _item_id, name, category, quantity in session.execute(
            select(OrderItem.order_id, OrderItem.id, Product.name, Category.name, OrderItem.quantity)
            .join(Product, Product.id == OrderItem.product_id)
            .join(Category, Category.id == Product.category_id)
            .where(OrderItem.order_id.in_([o.id for o in orders])).order_by(OrderItem.id)):
        items.setdefault(order_id, []).append({"product": name, "category": category, "quantity": quantity})
    return [{"order_id": o.id, "created_at": o.created_at, "status": o.status, "total": o.total,
             "items": items.get(o.id, [])} for o in orders]


def history_lazy_with_limit(session, user_id):
    return _page(session.scalars(select(Order).where(Order.user_id == user_id)
                                 .order_by(Order.created_at.desc(), Order.id.desc()).limit(10)).all())


def history_no_tie_break(session, user_id):
    return _page(session.scalars(
        select(Order).where(Order.user_id == user_id).order_by(Order.created_at.desc(), Order.id)
        .limit(10).options(selectinload(Order.items).selectinload(OrderItem.product)
                           .selectinload(Product.category))).all())


def test_q11_right():
    passes("10.q11", history_joined)
    passes("10.q11", history_by_hand)


def test_q11_wrong():
    fails("10.q11", capstone.planted_order_history, "statements", "N+1")
    fails("10.q11", history_lazy_with_limit, "budget", "N+1")
    fails("10.q11", history_no_tie_break, "higher id first")


# ------------------------------------------------------------------------------------------
# 10.q12: the missing indexes


def test_q12_right():
    passes("10.q12", ["create index a on orders (status, created_at)",
                      "create index b on orders (created_at)"])
    passes("10.q12", ["CREATE INDEX ix_status ON orders (status)",
                      "CREATE INDEX ix_created_status ON orders (created_at, status)"])


def test_q12_wrong():
    fails("10.q12", ["CREATE INDEX ix_c ON orders (created_at)"], "admin list", "status")
    fails("10.q12", ["CREATE INDEX ix_sc ON orders (status, created_at)"], "day report", "created_at")
    fails("10.q12", ["CREATE INDEX ix_u ON users (email)"], "admin list", "full scan")
    fails("10.q12", ["DROP INDEX ix_orders_user_id"], "CREATE INDEX statements only")
    fails("10.q12", [], "empty")


# ------------------------------------------------------------------------------------------
# 10.q13: no function in WHERE


def day_between(session, day):
    start = datetime(day.year, day.month, day.day)
    end = start + timedelta(days=1) - timedelta(seconds=1)
    return session.scalars(select(Order.id).where(Order.created_at.between(start, end))
                           .order_by(Order.id)).all()


def day_with_text_bounds(session, day):
    return sorted(session.scalars(select(Order.id).where(
        Order.created_at >= day.isoformat(), Order.created_at < (day + timedelta(days=1)).isoformat())))


def day_strftime(session, day):
    return session.scalars(select(Order.id).where(
        func.strftime("%Y-%m-%d", Order.created_at) == day.isoformat()).order_by(Order.id)).all()


def day_like(session, day):
    return session.scalars(select(Order.id).where(cast(Order.created_at, String).like(f"{day}%"))
                           .order_by(Order.id)).all()


def day_misses_last_minute(session, day):
    start = datetime.combine(day, time())
    return session.scalars(select(Order.id).where(
        Order.created_at >= start, Order.created_at < datetime.combine(day, time(23, 59)))
        .order_by(Order.id)).all()


def test_q13_right():
    passes("10.q13", day_between)
    passes("10.q13", day_with_text_bounds)


def test_q13_wrong():
    fails("10.q13", capstone.planted_orders_on_day, "function of the column", "range")
    fails("10.q13", day_strftime, "reads every order")
    fails("10.q13", day_like, "reads every order")
    fails("10.q13", day_misses_last_minute, "2024-02-29", "up to")


# ------------------------------------------------------------------------------------------
# 10.q14: a bounded search cache


class CacheOnLruCache:
    def __init__(self, capacity):
        self.values = {}
        self.capacity = capacity

        @functools.lru_cache(maxsize=capacity)
        def lookup(key):
            return self.values.pop(key)()

        self.lookup = lookup

    def fetch(self, key, compute):
        self.values[key] = compute
        try:
            return self.lookup(key)
        finally:
            self.values.pop(key, None)


class CacheOnDict:
    def __init__(self, capacity):
        self.capacity, self.kept = capacity, {}

    def fetch(self, key, compute):
        if key in self.kept:
            self.kept[key] = self.kept.pop(key)   # re-insert: now the newest
            return self.kept[key]
        self.kept[key] = compute()
        while len(self.kept) > self.capacity:
            del self.kept[next(iter(self.kept))]
        return self.kept[key]


class CacheFifo(CacheOnDict):
    def fetch(self, key, compute):
        if key not in self.kept:
            self.kept[key] = compute()
            if len(self.kept) > self.capacity:
                del self.kept[next(iter(self.kept))]
        return self.kept[key]


class CacheClearsWhenFull(CacheOnDict):
    def fetch(self, key, compute):
        if key not in self.kept:
            if len(self.kept) >= self.capacity:
                self.kept.clear()
            self.kept[key] = compute()
        return self.kept[key]


class CacheReturnsKey(CacheOnDict):
    def fetch(self, key, compute):
        super().fetch(key, compute)
        return key


def test_q14_right():
    passes("10.q14", CacheOnLruCache)
    passes("10.q14", CacheOnDict)


def test_q14_wrong():
    fails("10.q14", capstone.UnboundedCache, "keeps growing")
    fails("10.q14", CacheFifo, "least recently used")
    fails("10.q14", CacheClearsWhenFull, "least recently used")
    fails("10.q14", CacheReturnsKey, "compute()")
    fails("10.q14", lambda capacity: {}, "fetch")


# ------------------------------------------------------------------------------------------
# 10.q15: invalidate the product pages


def after_change_loop(shop, table, row_id):
    if table == "categories":
        with Session(shop.engine) as session:
            ids = session.scalars(select(Product.id).where(Product.category_id == row_id))
            for product_id in ids:
                shop.cache.delete(shop.product_key(product_id))
    elif table == "products":
        shop.cache.unlink(shop.product_key(row_id))


def after_change_pipeline(shop, table, row_id):
    query = (select(Product.id).where(Product.id == row_id) if table == "products"
             else select(Product.id).where(Product.category_id == row_id))
    with shop.engine.connect() as conn:
        keys = [shop.product_key(i) for i in conn.scalars(query)]
    pipe = shop.cache.pipeline()
    for key in keys:
        pipe.delete(key)
    pipe.execute()


def after_change_products_only(shop, table, row_id):
    if table == "products":
        shop.cache.delete(shop.product_key(row_id))


def after_change_everything(shop, table, row_id):
    for key in shop.cache.scan_iter(match=shop.product_key("*")):
        shop.cache.delete(key)


def test_q15_right():
    passes("10.q15", after_change_loop)
    passes("10.q15", after_change_pipeline)


def test_q15_wrong():
    fails("10.q15", capstone.planted_after_change, "old price")
    fails("10.q15", after_change_products_only, "renamed", "old name")
    fails("10.q15", after_change_everything, "unrelated")


# ------------------------------------------------------------------------------------------
# 10.q16: the receipt e-mail off the request


def send_step_orm(shop, order_id):
    with Session(shop.engine) as session:
        order = session.get(Order, order_id)
        email = order.user.email
    shop.mail_queue.enqueue(capstone.send_receipt, args=(shop.outbox_key, email, order_id))


def send_step_fresh_queue(shop, order_id):
    with shop.engine.connect() as conn:
        email = conn.scalar(select(User.email).where(User.id == select(Order.user_id)
                                                     .where(Order.id == order_id).scalar_subquery()))
    queue = Queue(shop.mail_queue.name, connection=shop.mail_queue.connection)
    queue.enqueue(capstone.send_receipt, shop.outbox_key, email, order_id, job_timeout=30)


def my_sender(outbox_key, email, order_id):
    return capstone.send_receipt(outbox_key, email, order_id)


def send_step_local_function(shop, order_id):
    with Session(shop.engine) as session:
        email = session.get(Order, order_id).user.email
    shop.mail_queue.enqueue(my_sender, shop.outbox_key, email, order_id)


def send_step_twice(shop, order_id):
    send_step_orm(shop, order_id)
    send_step_orm(shop, order_id)


def send_step_wrong_address(shop, order_id):
    shop.mail_queue.enqueue(capstone.send_receipt, shop.outbox_key, f"order{order_id}@shop.test", order_id)


def test_q16_right():
    passes("10.q16", send_step_orm)
    passes("10.q16", send_step_fresh_queue)


def test_q16_wrong():
    fails("10.q16", capstone.planted_send_receipt_step, "inside the request", "enqueue")
    fails("10.q16", send_step_local_function, "dotted name")
    fails("10.q16", send_step_twice, "one job")
    fails("10.q16", send_step_wrong_address, "address")


# ------------------------------------------------------------------------------------------
# 10.q17: a pool for the app server's threads


def pool_half_overflow(server):
    size = (server["threads"] + 1) // 2
    return {"pool_size": size, "max_overflow": server["threads"] - size, "pool_timeout": 5,
            "pool_pre_ping": True}


def pool_share_of_limit(server):
    share = server["max_connections"] // server["processes"]
    return {"pool_size": min(share, server["threads"]), "max_overflow": 0}


def test_q17_right():
    passes("10.q17", lambda server: {"pool_size": server["threads"], "max_overflow": 0})
    passes("10.q17", pool_half_overflow)
    passes("10.q17", pool_share_of_limit)


def test_q17_wrong():
    fails("10.q17", capstone.planted_pool_settings, "timed out", "cover the threads")
    fails("10.q17", lambda server: {"pool_size": server["max_connections"], "max_overflow": 0},
          "more than the database accepts")
    fails("10.q17", lambda server: {"pool_size": server["threads"], "max_overflow": 10},
          "more than the database accepts")
    fails("10.q17", lambda server: (server["threads"], 0), "dict")
    fails("10.q17", lambda server: {"pool_size": 1, "max_overflow": -1}, "max_overflow")
    fails("10.q17", lambda server: {"size": 4}, "not a pool setting")


# ------------------------------------------------------------------------------------------
# 10.q18: the whole shop


FIXES = capstone.Fixes(
    order_history=history_joined,
    indexes=["CREATE INDEX ix_orders_status_created_at ON orders (status, created_at)",
             "CREATE INDEX ix_orders_created_at ON orders (created_at)"],
    orders_on_day=day_with_text_bounds, search_cache=CacheOnDict,
    after_change=after_change_pipeline, send_receipt_step=send_step_orm,
    pool_settings=pool_half_overflow)


def test_q18_right():
    passes("10.q18", FIXES)


@pytest.mark.parametrize(("part", "words"), [
    ("send_receipt_step", ("checkout", "e-mail inline")),
    ("order_history", ("order_history", "N+1")),
    ("pool_settings", ("pool connection",)),
    ("after_change", ("stale",)),
    ("search_cache", ("keeps growing",)),
])
def test_q18_each_planted_problem_is_named(part, words):
    fails("10.q18", replace(FIXES, **{part: None}), *words)


def test_q18_wrong():
    fails("10.q18", replace(FIXES, indexes=["CREATE INDEX ix_s ON orders (status, created_at)"]),
          "day_report", "full scan")
    fails("10.q18", capstone.Fixes(), "over the 200 ms target")
    fails("10.q18", [history_joined], "capstone.Fixes")
