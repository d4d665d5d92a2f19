"""Chapter 09, common performance issues: leaks, N+1 caught in tests, stale caches, and the lab.

The practicals run the learner's code on hidden inputs, never on wall time:

* 09.q3, a price feed that does not keep its subscribers alive: 10,000 simulated requests each
  subscribe a cart view and drop it; the traced memory (tracemalloc) must stay flat, the live
  views (and long-lived dashboards) must still get every price.
* 09.q4, a test configured to catch N+1: run on hidden pages over an in-memory copy of the tiny
  dataset, some with a planted N+1 over two or three rows, some eager with more statements in
  total. The test must fail exactly the N+1 pages.
* 09.q6-q8, the lab: the loader that replaces the N+1 page, the missing index, and the cache keys
  the forgetful write must delete, graded against the issues planted in the kernel's
  :class:`LabService` (``_grading_key()``), on the grader's own copy of the data.

Reference answers live here, private.
"""

from __future__ import annotations

import gc
import random
import tracemalloc

import sqlalchemy as sa
from sqlalchemy.orm import Session, joinedload, selectinload

from perfcourse.chapters import common_performance_issues as chapter
from perfcourse.models import Order, OrderItem, Product, User
from perfcourse.scratch import memory_copy
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    ExplainCheck,
    Incorrect,
    MultiChoice,
    call_learner,
    made_in_this_kernel,
    need_function,
    short_repr,
    type_name,
    values_equal,
)

__all__ = ["QUESTIONS"]


# --------------------------------------------------------------------------------------------
# 09.q3: a price feed that does not leak its subscribers

_REQUESTS = 10_000
_WARMUP = 1_000
_CHECK_EVERY = 500
_MAX_GROWTH = 256 * 1024


class _CartView:
    """A per-request view that subscribes to price changes and is then dropped, as pages are."""

    def __init__(self, feed, prices: dict[int, float]) -> None:
        self.prices = dict(prices)
        self.rendered = bytearray(1024)  # what a page holds on to: makes each leaked view visible
        feed.subscribe(self.on_price)

    def on_price(self, product_id: int, price: float) -> None:
        if product_id in self.prices:
            self.prices[product_id] = price

    @property
    def total(self) -> float:
        return round(sum(self.prices.values()), 2)


class _PriceFeedCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("09.q3", PriceFeed)')
        rng = random.Random(9003)
        state: dict = {}

        def simulate():
            feed = answer()
            for method in ("subscribe", "publish"):
                if not callable(getattr(feed, method, None)):
                    raise Incorrect(f"PriceFeed() must have a {method}() method (got a {type_name(feed)} "
                                    f"without one).")
            prices = {pid: float(rng.randint(100, 9_999)) / 100 for pid in range(1, 41)}
            dashboards = [_CartView(feed, {pid: prices[pid] for pid in range(n, n + 3)}) for n in (1, 4, 7)]
            started = not tracemalloc.is_tracing()
            if started:
                tracemalloc.start()
            try:
                base = None
                for number in range(1, _REQUESTS + 1):
                    shown = rng.sample(range(1, 41), rng.randint(1, 4))
                    view = _CartView(feed, {pid: prices[pid] for pid in shown})
                    changed = rng.choice(shown)
                    prices[changed] = float(rng.randint(100, 9_999)) / 100
                    feed.publish(changed, prices[changed])
                    expected = round(sum(prices[pid] for pid in shown), 2)
                    if view.total != expected:
                        raise Incorrect(
                            "A cart view that was still alive missed a price change: the feed must deliver to "
                            "live subscribers. A weak reference to a bound method (weakref.ref(cb), WeakSet) "
                            "dies at once, since `obj.method` makes a new object each time: keep "
                            "weakref.WeakMethod(cb) instead.")
                    del view
                    if number == _WARMUP:
                        gc.collect()
                        base = tracemalloc.get_traced_memory()[0]
                    elif base is not None and number % _CHECK_EVERY == 0:
                        # no gc.collect() here: the views make no cycles, and a full collection
                        # in a big kernel costs more than the whole simulation
                        growth = tracemalloc.get_traced_memory()[0] - base
                        if growth > _MAX_GROWTH:
                            state["growth"] = (number, growth)
                            return feed, dashboards, prices
            finally:
                if started:
                    tracemalloc.stop()
            return feed, dashboards, prices

        _feed, dashboards, prices = call_learner(simulate)
        if "growth" in state:
            number, growth = state["growth"]
            raise Incorrect(
                f"Memory is not flat: after {number:,} requests the traced memory had grown by "
                f"{growth / 1024:,.0f} KiB since request {_WARMUP:,} (the views are dropped after each "
                "request). Either the feed still holds every view (a strong reference to a bound method "
                "keeps its object alive), or dead weak references pile up: remove them (a WeakMethod "
                "callback, or prune them in publish).")
        for view in dashboards:
            wanted = round(sum(prices[pid] for pid in view.prices), 2)
            if view.total != wanted:
                raise Incorrect("A long-lived dashboard stopped receiving prices: subscribers that are "
                                "still alive must keep getting every publish.")

    def model_answer(self):
        return (
            "import weakref\n"
            "\n"
            "class PriceFeed:\n"
            "    def __init__(self):\n"
            "        self._listeners = set()\n"
            "\n"
            "    def subscribe(self, callback):\n"
            "        # a weak reference to the bound method; dropped from the set when its object dies\n"
            "        self._listeners.add(weakref.WeakMethod(callback, self._listeners.discard))\n"
            "\n"
            "    def publish(self, product_id, price):\n"
            "        for ref in list(self._listeners):\n"
            "            callback = ref()\n"
            "            if callback is not None:\n"
            "                callback(product_id, price)")


# --------------------------------------------------------------------------------------------
# 09.q4: a test that catches an N+1 on small fixture data


def _orders_lazy(session, user_id):
    """N+1: each order's items are loaded lazily."""
    orders = session.scalars(sa.select(Order).where(Order.user_id == user_id).order_by(Order.id)).all()
    return [(o.id, sum(i.quantity for i in o.items)) for o in orders]


def _first_order_products_lazy(session, user_id):
    """N+1: the first order's items, each item's product loaded lazily."""
    order = session.scalars(sa.select(Order).where(Order.user_id == user_id).order_by(Order.id).limit(1)).one()
    items = session.scalars(sa.select(OrderItem).where(OrderItem.order_id == order.id)).all()
    return [(i.product.name, i.quantity) for i in items]


def _orders_customers_lazy(session, user_id):
    """N+1 by a loop of lookups: one query per order for its items' count."""
    ids = session.scalars(sa.select(Order.id).where(Order.user_id == user_id).order_by(Order.id)).all()
    return [(oid, session.scalar(sa.select(sa.func.count()).where(OrderItem.order_id == oid))) for oid in ids]


def _full_page_eager(session, user_id):
    """Eager: user, orders, items, products and categories, each in one statement (5)."""
    user = session.get(User, user_id)
    orders = session.scalars(
        sa.select(Order).where(Order.user_id == user_id).order_by(Order.id)
        .options(selectinload(Order.items).selectinload(OrderItem.product).selectinload(Product.category))
    ).all()
    return [user.email, [(o.id, [(i.product.name, i.product.category.name) for i in o.items]) for o in orders]]


def _orders_joined(session, user_id):
    """Eager in one statement (joinedload)."""
    orders = session.scalars(
        sa.select(Order).where(Order.user_id == user_id).order_by(Order.id).options(joinedload(Order.items))
    ).unique().all()
    return [(o.id, sum(i.quantity for i in o.items)) for o in orders]


def _report_distinct(session, user_id):
    """Several different statements, none repeated (4)."""
    total = session.scalar(sa.select(sa.func.count()).where(Order.user_id == user_id))
    spent = session.scalar(sa.select(sa.func.sum(Order.total)).where(Order.user_id == user_id))
    email = session.scalar(sa.select(User.email).where(User.id == user_id))
    last = session.scalar(sa.select(sa.func.max(Order.created_at)).where(Order.user_id == user_id))
    return [total, str(spent), email, str(last)]


_N_PLUS_ONE_PAGES = (_orders_lazy, _first_order_products_lazy, _orders_customers_lazy)
_CLEAN_PAGES = (_full_page_eager, _orders_joined, _report_distinct)


def _few_orders_users(engine, orders: int) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT o.user_id FROM orders o GROUP BY o.user_id HAVING count(*) = :n "
            "AND min((SELECT count(*) FROM order_items i WHERE i.order_id = o.id)) >= 2 ORDER BY o.user_id LIMIT 2"),
            {"n": orders}).scalars())


def _what(page) -> str:
    return page.__doc__.split(": ", 1)[1].rstrip(".")


class _NPlusOneTestCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("09.q4", test_orders_page)')
        engine = memory_copy("tiny")
        try:
            users = _few_orders_users(engine, 2) + _few_orders_users(engine, 3)
            rng = random.Random(9004)
            clean = [(page, uid, False) for page in _CLEAN_PAGES for uid in users[1:3]]
            planted = [(page, uid, True) for page in _N_PLUS_ONE_PAGES for uid in users[:2]]
            rng.shuffle(clean)
            rng.shuffle(planted)
            cases = clean + planted  # clean pages first: a cap on the total count fails there
            for page, uid, planted in cases:
                outcome, message = call_learner(self._run, answer, engine, page, uid)
                if planted and outcome == "passed":
                    with Session(engine) as session, count_queries(engine) as counted:
                        page(session, uid)
                    raise Incorrect(
                        f"Your test passed a page with an N+1 ({_what(page)}, for a user "
                        f"with few orders: {counted.count} statements, one of them repeated). Is the "
                        "detector watching the engine the test was given, and is it strict enough for "
                        "fixture data this small (max_repeats)?")
                if not planted and outcome == "failed":
                    raise Incorrect(
                        "Your test failed a page without an N+1 (it sends several different statements, "
                        f"each once): {short_repr(message, 160)}. Count repeats of one statement, not "
                        "the total.")
        finally:
            engine.dispose()

    @staticmethod
    def _run(answer, engine, page, uid):
        try:
            answer(engine, page, uid)
        except AssertionError as exc:
            return "failed", str(exc)
        return "passed", None

    def model_answer(self):
        return (
            "from sqlalchemy.orm import Session\n"
            "\n"
            "def test_orders_page(engine, render_page, user_id):\n"
            "    # fixture data is small: a statement repeated even twice is an N+1\n"
            "    with cpi.forbid_n_plus_one(engine, max_repeats=1):\n"
            "        with Session(engine) as session:\n"
            "            render_page(session, user_id)")


# --------------------------------------------------------------------------------------------
# 09.q6-q8: the lab


def _lab():
    return made_in_this_kernel(chapter.current_lab(), "lab service",
                               "run the lab's setup cell first (LabService(...)).")


def _ref_user_orders(session, user_id):
    rows = session.execute(
        sa.select(Order.id, Order.status, Order.total, sa.func.coalesce(sa.func.sum(OrderItem.quantity), 0))
        .outerjoin(OrderItem, OrderItem.order_id == Order.id).where(Order.user_id == user_id)
        .group_by(Order.id, Order.status, Order.total).order_by(Order.id)).all()
    return [[oid, status, f"{total:.2f}", int(quantity)] for oid, status, total, quantity in rows]


def _ref_order_detail(session, order_id):
    rows = session.execute(
        sa.select(Product.name, OrderItem.quantity, OrderItem.unit_price)
        .join(Product, Product.id == OrderItem.product_id).where(OrderItem.order_id == order_id)
        .order_by(OrderItem.id)).all()
    return [[name, quantity, f"{price:.2f}"] for name, quantity, price in rows]


def _ref_category_products(session, category_id):
    first = sa.select(Product.id).where(Product.category_id == category_id).order_by(Product.id).limit(12)
    rows = session.execute(
        sa.select(Product.id, Product.name, Product.price, sa.func.count(OrderItem.id))
        .outerjoin(OrderItem, OrderItem.product_id == Product.id).where(Product.id.in_(first))
        .group_by(Product.id, Product.name, Product.price).order_by(Product.id)).all()
    return [[pid, name, f"{price:.2f}", int(n)] for pid, name, price, n in rows]


_LAB_REFERENCES = {
    "/users/<id>/orders": _ref_user_orders,
    "/orders/<id>": _ref_order_detail,
    "/categories/<id>/products": _ref_category_products,
}


def _lab_keys(engine, route: str) -> list[int]:
    with engine.connect() as conn:
        if route == "/users/<id>/orders":
            return list(conn.execute(sa.text(
                "SELECT user_id FROM orders GROUP BY user_id HAVING count(*) >= 4 ORDER BY user_id LIMIT 3")).scalars())
        if route == "/orders/<id>":
            return list(conn.execute(sa.text(
                "SELECT order_id FROM order_items GROUP BY order_id HAVING count(*) >= 3 ORDER BY order_id LIMIT 3"
            )).scalars())
        return [2, 5, 9]


class _LabLoaderCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("09.q6", load_page)')
        route = _lab()._grading_key()["n_plus_one"]
        reference = _LAB_REFERENCES[route]
        engine = memory_copy("tiny")
        try:
            for key in _lab_keys(engine, route):
                with Session(engine) as session:
                    expected = reference(session, key)
                with Session(engine) as session, count_queries(engine) as counted:
                    got = call_learner(answer, session, key)
                    got = call_learner(lambda value=got: _plain(value))
                if not values_equal(got, expected):
                    raise Incorrect(
                        f"For the hidden id {key} your loader returned {short_repr(got, 80)}, which is not "
                        "what the N+1 page returns: fix the loader of the route your detector flagged, "
                        "and return the same rows in the same shape (compare with lab.loaders[route]).")
                if counted.count > 3:
                    raise Incorrect(
                        f"Right rows, but your loader sent {counted.count} statements for id {key}: still an "
                        "N+1. Load the related rows in one statement (selectinload, or a join/GROUP BY).")
        finally:
            engine.dispose()

    def model_answer(self):
        return ("def load_page(session, key):\n"
                "    # the flagged page's query with its relation loaded eagerly (seed-dependent), e.g.\n"
                "    orders = session.scalars(select(Order).where(Order.user_id == key).order_by(Order.id)\n"
                "                             .options(selectinload(Order.items))).all()\n"
                "    return [[o.id, o.status, f\"{o.total:.2f}\", sum(i.quantity for i in o.items)] for o in orders]")


def _plain(value):
    """Lists all the way down (tuples and Rows too), so shapes compare by content."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Row":
        return [_plain(v) for v in value]
    return value


_LOOKUP_PARAMS = {
    "/users/by-email": {"email": "nobody@example.com"},
    "/orders/recent": {"status": "paid", "since": "2024-01-01"},
    "/users/by-name": {"last": "Knuth", "first": "Ada"},
}


class _LabIndexCheck(Checker):
    def grade(self, answer):
        key = _lab()._grading_key()
        check = ExplainCheck(statement=key["missing_index_sql"], engine=lambda: memory_copy("tiny"),
                             params=_LOOKUP_PARAMS[key["missing_index"]],
                             hint="Index the columns of the WHERE clause of the statement the missing-index "
                                  "detector flagged.")
        check.grade(answer)

    def model_answer(self):
        return "CREATE INDEX ... ON <the flagged table> (<the columns of its WHERE clause>)  (seed-dependent)"


class _LabInvalidationCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("09.q8", keys_to_delete)')
        key = _lab()._grading_key()
        engine = memory_copy("tiny")
        try:
            service = chapter.LabService(engine, copy=False, current=False, cache=chapter.DictCache(),
                                         issues={k: key[k] for k in ("n_plus_one", "missing_index", "stale_write")})
            service.extra_invalidation = answer
            call_learner(self._scenario, service)
        finally:
            engine.dispose()

    @staticmethod
    def _scenario(service):
        rng = random.Random(9008)
        with service.engine.connect() as conn:
            by_category = {}
            for pid, cid in conn.execute(sa.text("SELECT id, category_id FROM products ORDER BY id")):
                by_category.setdefault(cid, []).append(pid)
        writes = [*chapter.LAB_WRITES, *chapter.LAB_WRITES]
        for number, kind in enumerate(writes):
            service.cache.clear()
            category = rng.choice(sorted(by_category))
            users = rng.sample(range(1, 201), 6)
            products = rng.sample(range(1, 101), 8) + by_category[category][:4]
            for uid in users:
                service.read(f"user:{uid}:summary")
            for pid in products:
                service.read(f"product:{pid}:card")
            before = {k: service.cache.get(k) for k in service.cache.keys()}
            if kind == "place_order":
                service.place_order(users[0], products[0], 2)
            elif kind == "change_price":
                service.change_price(products[1], 10.0 + number)
            else:
                service.rename_category(category, f"renamed {number}")
            stale = chapter.find_stale_entries(service.cache, service.recompute)
            if len(stale):
                raise Incorrect(
                    f"After {kind}, {len(stale)} cached entr{'y was' if len(stale) == 1 else 'ies were'} "
                    f"stale (e.g. {stale.key.iloc[0]}): return the keys that write changes.")
            left = set(service.cache.keys())
            needless = [k for k in before if k not in left and service.recompute(k) == before[k]]
            if needless:
                raise Incorrect(
                    f"After {kind} you deleted {len(needless)} entries whose values had not changed (e.g. "
                    f"{needless[0]}): a cache emptied at every write serves no hits. Delete only the keys "
                    "of the rows the event names.")

    def model_answer(self):
        return ("def keys_to_delete(event):\n"
                "    # the rule the service forgot (seed-dependent), e.g. for place_order:\n"
                "    if event[\"kind\"] == \"place_order\":\n"
                "        return [f\"user:{event['user_id']}:summary\"]\n"
                "    return []")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="09.q1",
        title="The guide's fix for circular references",
        checker=Choice(
            options={
                "a": "It breaks the cycle: with the cascade, orders no longer point back at their user",
                "b": "It only says what DELETE does to the orders; the cycle in memory stays, and the "
                "collector frees it",
                "c": "It frees the orders at once when the request ends, instead of at the next collection",
                "d": "It turns the relation into a weak reference, the way weakref.ref would",
                "e": "It stops the ORM from loading the orders, so there is nothing left to retain",
            },
            correct="b",
            explanations={
                "a": "The cascade is a rule for deleting rows. order.user and user.orders are both still "
                "there after it: the lesson counted the same cycles with and without it.",
                "c": "Objects in a cycle are freed by the cycle collector whatever the delete rule; the "
                "lesson measured the same number collected either way.",
                "d": "Nothing about the references changes: a weak reference is something you write "
                "(weakref.ref for a back-pointer), not a side effect of a cascade.",
                "e": "Loading is controlled by the loader strategy (lazy, selectinload), not by the delete "
                "cascade: the orders load exactly as before.",
            },
        ),
        explanation="dependent: :destroy (SQLAlchemy's cascade=\"all, delete-orphan\") deletes child rows "
        "with their parent. In memory the parent and its children still point at each other; Python's "
        "cycle collector frees such cycles, and weakref is how you avoid them when it matters.",
    ),
    Question(
        id="09.q2",
        title="What keeps memory across requests",
        checker=MultiChoice(
            options={
                "a": "A module-level dict keyed by request id that nothing ever prunes",
                "b": "A list of 10,000 rows built inside the handler and returned as JSON",
                "c": "A user and its orders pointing at each other, with the garbage collector on",
                "d": "@lru_cache(maxsize=None) on a method of an object made per request",
                "e": "An SQLAlchemy event listener added to the shared engine on each request, never removed",
                "f": "@lru_cache(maxsize=256) on a module-level function of a product id",
                "g": "A logging handler added to a module-level logger on each request",
            },
            correct={"a", "d", "e", "g"},
            explanations={
                "b": "That is a peak, not a leak: the list dies when the request returns. Stream or page it "
                "if the peak is too high, but memory comes back.",
                "c": "Python's cycle collector frees unreachable cycles: after gc.collect() they are gone. "
                "A cycle leaks only while something outside still refers to it.",
                "f": "maxsize=256 bounds it: at most 256 entries, the oldest dropped. That is a bounded "
                "cache, the fix, not the leak.",
            },
        ),
        explanation="A leak is memory that something long-lived still refers to: a module-level dict, a "
        "cache holding self, a listener list on a shared engine, a logger's handlers. Everything a "
        "request made and dropped, cycles included, is freed.",
    ),
    Question(
        id="09.q3",
        title="A price feed that keeps memory flat over 10,000 requests",
        checker=_PriceFeedCheck(),
        explanation="The feed is long-lived and the views are not: a strong reference to view.on_price "
        "keeps every view alive. weakref.WeakMethod holds the bound method without its object (a plain "
        "weakref.ref to a bound method dies at once), and its callback removes the dead entry, so the "
        "feed's own bookkeeping stays flat too.",
        hints=("Look at weakref.WeakMethod, and at the callback a weak reference accepts: it runs when "
               "the object dies.",),
        time_limit=15.0,
    ),
    Question(
        id="09.q4",
        title="A test that catches an N+1 on small fixture data",
        checker=_NPlusOneTestCheck(),
        explanation="In tests the data is small, so an N+1 repeats a statement only two or three times: "
        "the detector must allow no repeats (max_repeats=1) and watch the engine the code under test "
        "uses. A cap on the total count cannot tell a clean page with five different statements from an "
        "N+1 with three.",
        hints=("Call render_page inside the detector's with block, on a Session of the engine the test "
               "receives; then count how often one statement repeats when a user has only two orders.",),
        time_limit=15.0,
    ),
    Question(
        id="09.q5",
        title="What the guide's top_users cache stores",
        checker=Choice(
            options={
                "a": "Ten user rows: the first call runs the query, the next 30 minutes read them from the cache",
                "b": "Nothing at all: an unloaded relation cannot be serialised, so every call misses",
                "c": "The query itself, not its rows: every hit still runs the SQL, so the cache saves nothing",
                "d": "The rows, but stale ones: the cache is right, only its expiry is too long",
                "e": "The rows with their orders loaded too, so the page needs no more queries",
            },
            correct="c",
            explanations={
                "a": "That is what it looks like it does. The block returns a lazy query (a relation, a "
                "select()); the lesson counted one statement per cache hit.",
                "b": "The entry is stored and hits are served from it; what comes out is the query, which "
                "then runs. Counting statements, not hits, shows it.",
                "d": "Staleness is a separate question: here even a fresh entry costs a query per hit, "
                "because what is cached is not the result.",
                "e": "Nothing is loaded when the block runs: neither the users nor their orders. Materialise "
                "the rows (.all(), plain tuples) inside the block.",
            },
        ),
        explanation="Rails.cache.fetch stores whatever the block returns; a relation is a query that has "
        "not run. Cache the result (to_a / .all() as plain values), and count statements per hit to be "
        "sure.",
    ),
    Question(
        id="09.q6",
        title="Lab: the N+1 page, fixed",
        checker=_LabLoaderCheck(),
        explanation="The per-request N+1 detector names the page and its repeated statement; loading the "
        "relation with the first query (selectinload, or a join with GROUP BY) returns the same rows in "
        "at most three statements, whatever the id.",
        time_limit=15.0,
    ),
    Question(
        id="09.q7",
        title="Lab: the missing index",
        checker=_LabIndexCheck(),
        explanation="The missing-index detector EXPLAINs every statement of the slow-query log and flags "
        "full scans of large tables; an index on the columns of that statement's WHERE clause turns the "
        "scan into a search.",
        time_limit=15.0,
    ),
    Question(
        id="09.q8",
        title="Lab: the stale cache",
        checker=_LabInvalidationCheck(),
        explanation="The stale-cache detector compares cached values with the database after each kind of "
        "write; the write whose keys come out stale is the one whose invalidation was forgotten. Deleting "
        "exactly those keys keeps every other entry (and its hits).",
        time_limit=15.0,
    ),
]
