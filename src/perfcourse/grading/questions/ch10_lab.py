"""Chapter 10's capstone lab, "the slow shop": one practical per planted problem, and the whole shop.

Every check runs the learner's part on data, parameters and loads they have not seen, and grades
by counts, never by wall time:

* 10.q11 (N+1): the order history of hidden users (one with ties, one with none, one unknown)
  on an in-memory copy: same rows as the reference, at most 4 statements;
* 10.q12 (missing index): the learner's CREATE INDEX statements on a fresh copy; the admin list
  (hidden status) and a range query on ``created_at`` must be index searches;
* 10.q13 (function in WHERE): orders of hidden days (with orders planted at the day's edges) on a
  copy that has an index on ``created_at``: same ids, and no statement reads ``orders`` in full;
* 10.q14 (unbounded cache): hits on a hidden Zipf workload (at least 90% of an LRU's) and the
  memory the cache keeps (tracemalloc) after thousands of distinct keys;
* 10.q15 (invalidation): a hidden price change and category rename on a shop whose product pages
  are cached in Redis: every page fresh afterwards, unrelated pages still cached;
* 10.q16 (e-mail in the request): hidden checkouts send nothing inline; one RQ job each, of
  ``capstone.send_receipt`` with the right address, delivered exactly once;
* 10.q17 (pool too small): hidden servers; a real burst trial counts the checkouts that time out,
  and the connections promised over all processes must fit the database's limit;
* 10.q18 (the whole shop): a hidden workload on a copy of the course dataset with every fix;
  modelled p95 under 200 ms, no stale page, no pool timeout, a search cache that levels off.
"""

from __future__ import annotations

import random
import tempfile
import tracemalloc
from collections import OrderedDict
from datetime import date
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from perfcourse import db
from perfcourse.chapters.interview_questions import capstone
from perfcourse.models import Order, OrderItem, Product, User
from perfcourse.scratch import memory_copy
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import (
    NOT_WRITTEN,
    Checker,
    ExplainCheck,
    Incorrect,
    NoAnswer,
    call_learner,
    is_unwritten,
    need_function,
    short_repr,
    shorten,
    type_name,
    values_equal,
)

__all__ = ["QUESTIONS"]


def _written(answer, example: str) -> None:
    need_function(answer, example)
    if is_unwritten(answer):
        raise NoAnswer(NOT_WRITTEN)


def _repeated(statements) -> str:
    shapes: dict[str, int] = {}
    for record in statements:
        shape = " ".join(record.sql.split())
        shapes[shape] = shapes.get(shape, 0) + 1
    shape, times = max(shapes.items(), key=lambda kv: kv[1], default=("", 0))
    if times > 2:
        return f" The same query ran {times} times ({shorten(shape, 70)}): that is the N+1 pattern."
    return ""


# --------------------------------------------------------------------------------------------
# 10.q11: the order history without N+1


def _history_reference(session, user_id):
    orders = session.scalars(
        select(Order).where(Order.user_id == user_id)
        .order_by(Order.created_at.desc(), Order.id.desc()).limit(10)
        .options(selectinload(Order.items).selectinload(OrderItem.product)
                 .selectinload(Product.category))).all()
    return [{"order_id": o.id, "created_at": o.created_at, "status": o.status, "total": o.total,
             "items": [{"product": i.product.name, "category": i.product.category.name,
                        "quantity": i.quantity} for i in sorted(o.items, key=lambda i: i.id)]}
            for o in orders]


def _history_data():
    """The tiny dataset plus a user with 13 orders, four of them at the same instant."""
    rows = ["INSERT INTO users (id, email, first_name, last_name, active, premium, created_at) "
            "VALUES (9001, 'ties@example.com', 'T', 'Ies', 1, 0, '2024-01-01 10:00:00')"]
    for k in range(13):
        when = "2025-03-01 12:00:00" if k % 3 == 0 else f"2025-0{1 + k % 2}-{10 + k:02d} 08:30:00"
        rows.append(f"INSERT INTO orders (id, user_id, status, total, created_at) VALUES "
                    f"({90000 + k}, 9001, 'paid', {10 + k}.50, '{when}')")
        for j in range(1 + k % 3):
            rows.append(f"INSERT INTO order_items (id, order_id, product_id, quantity, unit_price) "
                        f"VALUES ({900000 + 10 * k + j}, {90000 + k}, {1 + (7 * k + 3 * j) % 90}, "
                        f"{1 + j}, 5.00)")
    return memory_copy("tiny", rows)


class _HistoryCheck(Checker):
    budget = 4

    def grade(self, answer):
        _written(answer, 'check("10.q11", order_history)')
        engine = _history_data()
        try:
            with engine.connect() as conn:
                busiest = conn.execute(sa.text(
                    "SELECT user_id FROM orders WHERE user_id < 9000 GROUP BY user_id "
                    "ORDER BY count(*) DESC, user_id LIMIT 1")).scalar()
                lonely = conn.execute(sa.text(
                    "SELECT min(id) FROM users WHERE id NOT IN (SELECT user_id FROM orders)")).scalar()
            for user_id in (9001, busiest, lonely, 424242):
                with Session(engine) as session:
                    expected = _history_reference(session, user_id)
                with Session(engine) as session, count_queries(engine) as counted:
                    got = call_learner(answer, session, user_id)
                    same = call_learner(values_equal, got, expected)  # lazy loads count too
                if got is None:
                    raise Incorrect("Your function returned None: did you forget `return`?")
                if not same:
                    shown = (f"{len(got)} orders" if isinstance(got, list) else type_name(got))
                    raise Incorrect(
                        f"For user {user_id} your page is not the planted one's ({shown}, expected "
                        f"{len(expected)} orders): same keys and values, the 10 newest orders "
                        "(equal times: higher id first), items by id.")
                if counted.count > self.budget:
                    raise Incorrect(
                        f"Right page for user {user_id}, but it took {counted.count} statements; "
                        f"the budget is {self.budget}." + _repeated(counted.statements)
                        + " Load the orders with LIMIT, and items, products and categories in "
                        "batches (selectinload) or joins.")
        finally:
            engine.dispose()

    def model_answer(self):
        return (
            "def order_history(session, user_id):\n"
            "    orders = session.scalars(\n"
            "        select(Order).where(Order.user_id == user_id)\n"
            "        .order_by(Order.created_at.desc(), Order.id.desc()).limit(10)\n"
            "        .options(selectinload(Order.items).selectinload(OrderItem.product)\n"
            "                 .selectinload(Product.category))).all()\n"
            "    return [{\"order_id\": o.id, \"created_at\": o.created_at, \"status\": o.status,\n"
            "             \"total\": o.total,\n"
            "             \"items\": [{\"product\": i.product.name, \"category\": i.product.category.name,\n"
            "                        \"quantity\": i.quantity} for i in sorted(o.items, key=lambda i: i.id)]}\n"
            "            for o in orders]")


# --------------------------------------------------------------------------------------------
# 10.q12: the indexes the admin list and the day report need


class _IndexesCheck(Checker):
    status = "shipped"

    def grade(self, answer):
        if isinstance(answer, str):
            answer = [answer]
        if not isinstance(answer, (list, tuple)) or not all(isinstance(a, str) for a in answer):
            raise Incorrect("Answer with a list of CREATE INDEX statements (strings), e.g. "
                            f"INDEXES = [\"CREATE INDEX ...\"] (got a {type_name(answer)}).")
        if not answer:
            raise Incorrect("Your list is empty: the admin list still reads every order.")
        admin = ExplainCheck(
            statement=sa.text("SELECT id, user_id, total, created_at FROM orders WHERE status = "
                              ":status ORDER BY created_at DESC LIMIT 20"),
            params={"status": self.status}, engine=lambda: memory_copy("tiny"),
            verdicts=("index search", "covering index search"),
            hint="The admin list filters on status and sorts by created_at.")
        day = ExplainCheck(
            statement=sa.text("SELECT id FROM orders WHERE created_at >= :start AND created_at < "
                              ":end ORDER BY id"),
            params={"start": "2024-05-14 00:00:00", "end": "2024-05-15 00:00:00"},
            engine=lambda: memory_copy("tiny"), verdicts=("index search", "covering index search"),
            hint="The day report, once its WHERE compares created_at itself with a range, needs an "
                 "index whose first column is created_at.")
        for name, check in (("The admin list of orders by status", admin),
                            ("The day report (a range on created_at)", day)):
            try:
                check.grade(list(answer))
            except NoAnswer:
                raise
            except Incorrect as exc:
                raise Incorrect(f"{name}: {exc}") from None

    def model_answer(self):
        return ('INDEXES = ["CREATE INDEX ix_orders_status_created_at ON orders (status, created_at)",\n'
                '           "CREATE INDEX ix_orders_created_at ON orders (created_at)"]')


# --------------------------------------------------------------------------------------------
# 10.q13: the day report without a function in WHERE

_EDGE_DAY = date(2024, 2, 29)


def _day_data():
    rows = ["CREATE INDEX ix_orders_created_at ON orders (created_at)"]
    for k, when in enumerate(["2024-02-28 23:59:59", "2024-02-29 00:00:01", "2024-02-29 12:00:00",
                              "2024-02-29 23:59:59", "2024-03-01 00:00:01"]):
        rows.append(f"INSERT INTO orders (id, user_id, status, total, created_at) VALUES "
                    f"({80000 + k}, 1, 'paid', 9.99, '{when}')")
    return memory_copy("tiny", rows)


class _DayCheck(Checker):
    def grade(self, answer):
        _written(answer, 'check("10.q13", orders_on_day)')
        engine = _day_data()
        try:
            with engine.connect() as conn:
                rows = {t: conn.execute(select(sa.func.count()).select_from(sa.table(t))).scalar()
                        for t in ("orders", "users", "order_items", "products", "categories")}
                busy = conn.execute(sa.text(
                    "SELECT date(created_at) d FROM orders GROUP BY d ORDER BY count(*) DESC, d "
                    "LIMIT 1")).scalar()
            days = [_EDGE_DAY, date.fromisoformat(busy), date(2022, 6, 1), date(2025, 12, 31)]
            for day in days:
                with Session(engine) as session:
                    expected = capstone.planted_orders_on_day(session, day)
                with Session(engine) as session, count_queries(engine) as counted:
                    got = call_learner(answer, session, day)
                    if got is not None and not isinstance(got, (str, bytes)):
                        got = call_learner(lambda got=got: [int(i) for i in got])
                if got is None:
                    raise Incorrect("Your function returned None: did you forget `return`?")
                if got != expected:
                    raise Incorrect(
                        f"For {day} your function returned {len(got)} order ids, expected "
                        f"{len(expected)} (ascending): every order from 00:00:00 that day up to, "
                        "not including, 00:00:00 the next day." + (
                            f" Got {short_repr(got, 60)}." if len(got) < 8 else ""))
                for record in counted.statements:
                    scanned = capstone.plan_rows_scanned(engine, record.sql, record.parameters, rows)
                    if scanned >= rows["orders"]:
                        raise Incorrect(
                            f"Right ids for {day}, but the plan still reads every order ("
                            f"{shorten(record.sql, 80)}): a function of the column (date(), "
                            "strftime, cast, LIKE on its text) hides it from the index on "
                            "created_at. Compare the column itself with a half-open range.")
        finally:
            engine.dispose()

    def model_answer(self):
        return ("def orders_on_day(session, day):\n"
                "    start = datetime.combine(day, time())\n"
                "    return list(session.scalars(\n"
                "        select(Order.id)\n"
                "        .where(Order.created_at >= start, Order.created_at < start + timedelta(days=1))\n"
                "        .order_by(Order.id)))")


# --------------------------------------------------------------------------------------------
# 10.q14: a bounded search cache


def _zipf(rng: random.Random, requests: int, items: int, s: float = 1.1) -> list[str]:
    weights = [1 / (k ** s) for k in range(1, items + 1)]
    order = list(range(items))
    rng.shuffle(order)
    return [f"q{order[k]}" for k in rng.choices(range(items), weights, k=requests)]


def _lru_hits(keys, capacity: int) -> int:
    kept: OrderedDict = OrderedDict()
    hits = 0
    for key in keys:
        if key in kept:
            hits += 1
            kept.move_to_end(key)
        else:
            kept[key] = True
            if len(kept) > capacity:
                kept.popitem(last=False)
    return hits


class _CacheCheck(Checker):
    def _build(self, answer, capacity):
        cache = call_learner(answer, capacity)
        if cache is None or not callable(getattr(cache, "fetch", None)):
            raise Incorrect(f"{type_name(answer) if not isinstance(answer, type) else answer.__name__}"
                            f"({capacity}) gave a {type_name(cache)} without a fetch(key, compute) "
                            "method: pass your class itself.")
        return cache

    def grade(self, answer):
        need_function(answer, 'check("10.q14", BoundedCache)')
        for capacity, seed in ((40, 1401), (150, 1402)):
            cache = self._build(answer, capacity)
            keys = _zipf(random.Random(seed), 3000, 1500)
            computed = []

            def replay(cache=cache, keys=keys, computed=computed):
                wrong = None
                for key in keys:
                    def compute(key=key):
                        computed.append(key)
                        return ("page of", key)
                    if cache.fetch(key, compute) != ("page of", key) and wrong is None:
                        wrong = key
                return wrong

            wrong = call_learner(replay)
            if wrong is not None:
                raise Incorrect(f"fetch({wrong!r}, compute) returned something else than what "
                                "compute() returned for that key.")
            hits = len(keys) - len(computed)
            lru = _lru_hits(keys, capacity)
            if hits < 0.9 * lru:
                raise Incorrect(
                    f"With capacity {capacity}, your cache answered {hits} of {len(keys)} requests "
                    f"without computing; keeping the {capacity} most recently used keys answers "
                    f"{lru}. Evict the least recently used key, and count a hit as a use.")
        self._memory(answer)

    def _memory(self, answer):
        capacity, payload, keys = 100, 2000, 3000
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            cache = self._build(answer, capacity)
            seen = []

            def fill(cache=cache):
                for i in range(keys):
                    cache.fetch(f"new search {i}", lambda i=i: f"{i:08d}".ljust(payload, "#"))
                    if i + 1 in (keys // 4, keys):
                        seen.append(tracemalloc.get_traced_memory()[0] - before)

            call_learner(fill)
        finally:
            if not was_tracing:
                tracemalloc.stop()
        early, late = seen
        allowed = capacity * payload * 3 + 200_000
        if late > allowed or late > 1.5 * early + 100_000:
            raise Incorrect(
                f"Memory keeps growing: {early / 1e3:.0f} kB kept after {keys // 4} distinct "
                f"searches, {late / 1e3:.0f} kB after {keys}, with capacity {capacity}. Drop an "
                "entry whenever one more than `capacity` would be kept.")

    def model_answer(self):
        return ("class BoundedCache:\n"
                "    def __init__(self, capacity):\n"
                "        self.capacity, self.entries = capacity, OrderedDict()\n\n"
                "    def fetch(self, key, compute):\n"
                "        if key in self.entries:\n"
                "            self.entries.move_to_end(key)  # a hit is a use\n"
                "            return self.entries[key]\n"
                "        value = self.entries[key] = compute()\n"
                "        if len(self.entries) > self.capacity:\n"
                "            self.entries.popitem(last=False)  # the least recently used\n"
                "        return value")


# --------------------------------------------------------------------------------------------
# 10.q15 and 10.q16: shops of the grader (tiny data, the course's Redis, a private namespace)


def _grader_shop(fixes: capstone.Fixes, engine=None):
    engine = engine or memory_copy("tiny")
    return capstone.SlowShop(fixes=fixes, engine=engine, name="ch10grade")


class _InvalidationCheck(Checker):
    def grade(self, answer):
        _written(answer, 'check("10.q15", after_change)')
        shop = _grader_shop(capstone.Fixes(after_change=answer))
        try:
            with shop.engine.connect() as conn:
                products = conn.execute(select(Product.id, Product.category_id).order_by(Product.id)).all()
            rng = random.Random(1501)
            category = rng.choice(sorted({c for _, c in products}))
            in_category = [p for p, c in products if c == category]
            changed = rng.choice([p for p, c in products if c != category])
            others = [p for p, c in products if c != category and p != changed]
            read = [changed, *in_category, *rng.sample(others, 12)]
            for product_id in read:
                shop.product_page(product_id)
            call_learner(shop.update_price, changed, Decimal("1234.56"))
            call_learner(shop.rename_category, category, f"Renamed {rng.randint(100, 999)}")
            stale = [p for p in read if shop.product_page(p) != shop.fresh_product_page(p)]
            if changed in stale:
                raise Incorrect(
                    f"After the price of product {changed} changed, its page still showed the "
                    "old price: delete its cached page (shop.product_key(row_id)) when table is "
                    "'products'.")
            if stale:
                raise Incorrect(
                    f"After category {category} was renamed, {len(stale)} of its "
                    f"{len(in_category)} product pages still showed the old name: every page "
                    "of a product in that category caches the name; delete each of them (or "
                    "put a version of the category in the key).")
        finally:
            shop.close()
        self._kept(answer, read, changed, in_category)

    def _kept(self, answer, read, changed, in_category):
        """Unrelated pages stay cached: count how many are recomputed after the changes."""
        shop = _grader_shop(capstone.Fixes(after_change=answer))
        try:
            for product_id in read:
                shop.product_page(product_id)
            category = shop.fresh_product_page(in_category[0])["category"]
            with shop.engine.connect() as conn:
                category_id = conn.execute(select(Product.category_id).where(
                    Product.id == in_category[0])).scalar()
            call_learner(shop.update_price, changed, Decimal("4321.00"))
            call_learner(shop.rename_category, category_id, category + " (new)")
            unrelated = [p for p in read if p != changed and p not in in_category]
            gone = [p for p in unrelated if not shop.cache.exists(shop.product_key(p))]
            if gone:
                raise Incorrect(
                    f"Every page is fresh, but {len(gone)} of {len(unrelated)} pages of unrelated "
                    "products were dropped from the cache too: delete only the pages the change "
                    "affects, or the hit rate falls after every admin edit.")
        finally:
            shop.close()

    def model_answer(self):
        return ("def after_change(shop, table, row_id):\n"
                "    if table == \"products\":\n"
                "        ids = [row_id]\n"
                "    else:  # a category: every product page shows its name\n"
                "        with shop.engine.connect() as conn:\n"
                "            ids = conn.scalars(select(Product.id).where(Product.category_id == row_id)).all()\n"
                "    if ids:\n"
                "        shop.cache.delete(*[shop.product_key(i) for i in ids])")


_SEND = f"{capstone.__name__}.send_receipt"


class _MailCheck(Checker):
    def grade(self, answer):
        _written(answer, 'check("10.q16", send_receipt_step)')
        shop = _grader_shop(capstone.Fixes(send_receipt_step=answer))
        try:
            with shop.engine.connect() as conn:
                orders = conn.execute(select(Order.id, User.email).join(User, User.id == Order.user_id)
                                      .order_by(Order.id)).all()
            picked = random.Random(1601).sample(orders, 3)
            for order_id, _ in picked:
                before = len(shop.mail_queue)
                record = call_learner(shop.request, "checkout", order_id)
                if record.inline_mails:
                    raise Incorrect(
                        f"Checkout of order {order_id} sent the e-mail inside the request (the "
                        "customer waits for the mail server): enqueue it on shop.mail_queue "
                        "instead.")
                if shop.cache.llen(shop.outbox_key):
                    raise Incorrect("A mail reached the outbox during the request: enqueue the job, "
                                    "do not run it.")
                jobs = shop.mail_queue.get_jobs()
                if len(jobs) != before + 1:
                    raise Incorrect(
                        f"Checkout of order {order_id} left {len(jobs) - before} new jobs on "
                        "shop.mail_queue; one receipt per checkout is one job.")
                job = jobs[-1]
                if job.func_name != _SEND:
                    raise Incorrect(
                        f"The job runs {job.func_name}: a worker imports the job's function by its "
                        "dotted name, and one defined in the notebook cannot be imported there. "
                        "Enqueue capstone.send_receipt.")
            delivered = call_learner(capstone.deliver_mail, shop.mail_queue)
            outbox = [x.decode() for x in shop.cache.lrange(shop.outbox_key, 0, -1)]
            expected = [f"{email}|{order_id}" for order_id, email in picked]
            if outbox != expected:
                raise Incorrect(
                    f"The {delivered} jobs delivered {short_repr(outbox, 90)}, expected "
                    f"{short_repr(expected, 90)}: send_receipt(shop.outbox_key, email, order_id) "
                    "with the customer's address.")
        finally:
            shop.close()

    def model_answer(self):
        return ("def send_receipt_step(shop, order_id):\n"
                "    with Session(shop.engine) as session:\n"
                "        email = session.scalar(select(User.email).join(Order).where(Order.id == order_id))\n"
                "    shop.mail_queue.enqueue(capstone.send_receipt, shop.outbox_key, email, order_id)")


# --------------------------------------------------------------------------------------------
# 10.q17: pool settings for the app server

_POOL_KEYS = {"pool_size", "max_overflow", "pool_timeout", "pool_recycle", "pool_pre_ping"}
_SERVERS = ({"processes": 3, "threads": 6, "max_connections": 30},
            {"processes": 2, "threads": 12, "max_connections": 100},
            {"processes": 5, "threads": 4, "max_connections": 22})


def _pool_size_of(settings) -> tuple[int, int]:
    if not isinstance(settings, dict):
        raise Incorrect("Return a dict of engine keywords, e.g. {\"pool_size\": ..., "
                        f"\"max_overflow\": ...}} (got a {type_name(settings)}).")
    unknown = set(settings) - _POOL_KEYS
    if unknown:
        raise Incorrect(f"{sorted(unknown)[0]!r} is not a pool setting of create_engine here: use "
                        "pool_size and max_overflow (pool_timeout, pool_recycle, pool_pre_ping "
                        "are allowed).")
    size, overflow = settings.get("pool_size", 5), settings.get("max_overflow", 10)
    for name, value in (("pool_size", size), ("max_overflow", overflow)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise Incorrect(f"{name} must be a whole number (got {short_repr(value, 30)}).")
    if size < 1 or overflow < 0:
        raise Incorrect(f"pool_size={size}, max_overflow={overflow}: pool_size must be at least 1 "
                        "and max_overflow at least 0 (-1, no limit, would let the pool promise "
                        "any number of connections).")
    return size, overflow


class _PoolCheck(Checker):
    def grade(self, answer):
        _written(answer, 'check("10.q17", pool_settings)')
        folder = tempfile.TemporaryDirectory(prefix="ch10-pool-")
        try:
            url = f"sqlite:///{Path(folder.name) / 'trial.sqlite'}"
            for server in _SERVERS:
                settings = call_learner(answer, dict(server))
                size, overflow = _pool_size_of(settings)
                shown = (f"For {server['processes']} processes of {server['threads']} threads "
                         f"(max_connections {server['max_connections']}), pool_size={size}, "
                         f"max_overflow={overflow}: ")
                promised = server["processes"] * (size + overflow)
                if promised > server["max_connections"]:
                    raise Incorrect(
                        shown + f"the processes may open {promised} connections, more than the "
                        f"database accepts ({server['max_connections']}). A process never needs more "
                        "than one connection per thread.")
                trial = capstone.pool_trial(url, {k: v for k, v in settings.items()
                                                  if k in ("pool_size", "max_overflow")},
                                            server["threads"])
                if trial["timeouts"] or trial["errors"]:
                    raise Incorrect(
                        shown + f"{trial['timeouts']} of {server['threads']} requests timed out "
                        "waiting for a connection when every thread needed one at once. Each "
                        "thread of a process may hold a connection: pool_size + max_overflow "
                        "must cover the threads.")
        finally:
            folder.cleanup()

    def model_answer(self):
        return ("def pool_settings(server):\n"
                "    # one connection per thread of a process, kept open; within the server's limit\n"
                "    return {\"pool_size\": server[\"threads\"], \"max_overflow\": 0}")


# --------------------------------------------------------------------------------------------
# 10.q18: the whole shop under a hidden load


_HIDDEN_SERVER = {"processes": 3, "threads": 6, "max_connections": 24}


def _route_cause(part) -> str:
    if part.inline_mails.sum():
        return "it sends the e-mail inline"
    if part.pool_wait.sum():
        return "its requests wait for a pool connection"
    if part.rows_scanned.max() >= 10_000:
        return f"a statement reads {int(part.rows_scanned.max()):,} rows in a full scan"
    if part.statements.max() > 4:
        return f"it sends up to {int(part.statements.max())} statements (N+1)"
    return "look at its statements"


class _ShopCheck(Checker):
    def grade(self, answer):
        if not isinstance(answer, capstone.Fixes):
            raise Incorrect("Pass your capstone.Fixes(...) with every part you fixed, e.g. "
                            f"check(\"10.q18\", fixes) (got a {type_name(answer)}).")
        parts = [answer.part(p) for p in capstone.PARTS if p != "indexes"]
        if all(callable(p) and is_unwritten(p) for p in parts) and answer.indexes in (None, ...):
            raise NoAnswer(NOT_WRITTEN)
        source = db.engine("sqlite")
        shop = None
        try:
            shop = call_learner(capstone.SlowShop, source, answer, name="ch10_grade",
                                server=_HIDDEN_SERVER)
            requests = capstone.workload(shop.engine, 160, seed=1801)
            table = call_learner(shop.run, requests)
            updated = sorted({r[1] for r in requests if r[0] == "update"})
            stale = shop.stale_pages(updated)
            growth = call_learner(capstone.cache_growth, answer.part("search_cache"), keys=2000)
        finally:
            if shop is not None:
                shop.close()
            else:
                db.drop_namespace("sqlite", "ch10_grade")
            source.dispose()
        p95 = capstone.summarize_run(table).set_index("route").p95_ms
        if p95["all"] > capstone.TARGET_P95_MS:
            slow = [(r, v) for r, v in p95.drop("all").items() if v > capstone.TARGET_P95_MS]
            worst = max(slow, key=lambda rv: rv[1])[0] if slow else p95.drop("all").idxmax()
            raise Incorrect(
                f"The modelled p95 is {p95['all']:g} ms, over the {capstone.TARGET_P95_MS:g} ms "
                f"target. Slowest route: {worst} ({p95[worst]:g} ms): "
                f"{_route_cause(table[table.route == worst])}. Routes over the target: "
                f"{', '.join(r for r, _ in slow)}.")
        if table.attrs["pool_timeouts"]:
            raise Incorrect(f"{table.attrs['pool_timeouts']} checkouts timed out in the pool trial.")
        if stale:
            raise Incorrect(f"p95 is within target, but {stale} of the {len(updated)} updated "
                            "products still show a stale page: the after_change hook.")
        early, late = growth.retained_bytes.iloc[0], growth.retained_bytes.iloc[-1]
        if late > 1.5 * early + 100_000:
            raise Incorrect(f"p95 is within target, but the search cache keeps growing "
                            f"({early / 1e3:.0f} kB after {growth.keys_seen.iloc[0]} searches, "
                            f"{late / 1e3:.0f} kB after {growth.keys_seen.iloc[-1]}): bound it.")

    def model_answer(self):
        return ("def all_fixes():  # every part, as written in its section\n"
                "    return capstone.Fixes(order_history=order_history, indexes=INDEXES,\n"
                "                          orders_on_day=orders_on_day, search_cache=BoundedCache,\n"
                "                          after_change=after_change, send_receipt_step=send_receipt_step,\n"
                "                          pool_settings=pool_settings)\n"
                "check(\"10.q18\", all_fixes())")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="10.q11",
        title="Capstone: the order history without N+1",
        checker=_HistoryCheck(),
        explanation="The planted page loads every order of the user, then one query per order "
        "for its items, per product, per category. Ask for the 10 newest orders with ORDER BY "
        "and LIMIT, and load the rest in batches: selectinload(Order.items).selectinload("
        "OrderItem.product).selectinload(Product.category) sends 4 statements whatever the "
        "number of orders (joinedload, or one join of the four tables, fewer).",
        hints=("Count the statements of one page with count_queries(shop.engine) and look at "
               "which one repeats.",),
        time_limit=15.0,
    ),
    Question(
        id="10.q12",
        title="Capstone: the missing indexes",
        checker=_IndexesCheck(),
        explanation="The admin list filters on status and sorts by created_at: an index on "
        "(status, created_at) finds the rows and returns them in order (no sort). The day report "
        "needs an index whose first column is created_at, searched with a range; an index on "
        "(status, created_at) cannot serve a query that does not name the status.",
        hints=("explain() each query of the shop that reads orders: which column does its WHERE "
               "use first?",),
    ),
    Question(
        id="10.q13",
        title="Capstone: no function in WHERE",
        checker=_DayCheck(),
        explanation="date(created_at) = ? computes a value per row: the index on created_at "
        "stores the column, not the function's result, so the database reads every row. "
        "created_at >= day AND created_at < day + 1 compares the column itself, a range the "
        "index answers. (An expression index on date(created_at) works too, at the cost of "
        "another index to maintain.)",
        hints=("Give the WHERE a half-open range of created_at: from the day's midnight to the "
               "next day's, the upper bound excluded.",),
        time_limit=15.0,
    ),
    Question(
        id="10.q14",
        title="Capstone: a bounded search cache",
        checker=_CacheCheck(),
        explanation="A dict that remembers every search grows with every new query: a leak by "
        "retention. A bounded cache keeps at most `capacity` entries and evicts the least "
        "recently used (an OrderedDict with move_to_end and popitem(last=False), or "
        "functools.lru_cache(maxsize=...)); on a skewed workload it keeps almost all the hits "
        "in flat memory.",
        hints=("On a hit, move the key to the end; after adding one, drop the oldest while "
               "more than capacity are kept.",),
        time_limit=15.0,
    ),
    Question(
        id="10.q15",
        title="Capstone: invalidate the product pages",
        checker=_InvalidationCheck(),
        explanation="Cache-aside without expiry serves a product page until someone deletes it. "
        "After a product changes, delete its page; after a category is renamed, delete the page "
        "of every product in it (or make the category's version part of the key). Deleting "
        "every page works but throws the hit rate away at each admin edit.",
        hints=("table is 'products' or 'categories'; shop.product_key(product_id) is the key of "
               "a page; shop.cache is the Redis client.",),
        time_limit=15.0,
    ),
    Question(
        id="10.q16",
        title="Capstone: the receipt e-mail off the request",
        checker=_MailCheck(),
        explanation="Talking to a mail server takes hundreds of milliseconds the customer should "
        "not wait for. The request enqueues a job (plain arguments: the address and the order "
        "id, not ORM objects) and returns; a worker sends it. The job's function must be "
        "importable by a worker: capstone.send_receipt.",
        hints=("shop.mail_queue is an RQ Queue: enqueue(function, *args).",),
        time_limit=15.0,
    ),
    Question(
        id="10.q17",
        title="Capstone: a pool for the app server's threads",
        checker=_PoolCheck(),
        explanation="Each thread of a process may hold a connection while it serves a request: "
        "pool_size + max_overflow must be at least the threads, or requests wait and time out "
        "under a burst. Across the processes the pools must fit the database's "
        "max_connections.",
        hints=("server['threads'] threads per process, server['processes'] processes, "
               "server['max_connections'] in all.",),
        time_limit=15.0,
    ),
    Question(
        id="10.q18",
        title="Capstone: the shop under its p95 target",
        checker=_ShopCheck(),
        explanation="With every fix, each route's requests send a few statements, read by index "
        "searches, never wait for the mail server nor for a pool connection: the modelled p95 "
        "falls from over half a second to a few tens of milliseconds, with fresh pages and a "
        "search cache of constant size.",
        hints=("Run the report cell: it names each route's statements, scanned rows, inline "
               "e-mails and pool waits.",),
        time_limit=15.0,
    ),
]
