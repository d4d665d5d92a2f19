"""Grader tests of chapter 09 (common performance issues): right answers written other ways pass,
usual mistakes fail with a hint that names them, choice keys are accepted in any form.

Everything runs on in-memory copies of the tiny dataset and in-process caches: no server is
needed and nothing is timed.
"""

from __future__ import annotations

import weakref

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from perfcourse.chapters import common_performance_issues as cpi
from perfcourse.grading import question
from perfcourse.models import Order, OrderItem, Product
from perfcourse.scratch import memory_copy
from perfcourse.statements import count_queries

from .kit import fails, passes

# --------------------------------------------------------------------------------------------
# Choice questions


@pytest.mark.parametrize("qid", ["09.q1", "09.q2", "09.q5"])
def test_choices_accept_the_right_key_in_any_form(qid):
    right = question(qid).checker.correct
    if isinstance(right, str):
        for typed in (right.upper(), f" {right} ", f"({right})"):
            passes(qid, typed)
    else:
        passes(qid, ", ".join(sorted(right)).upper())
        passes(qid, set(right))


@pytest.mark.parametrize("qid", ["09.q1", "09.q5"])
def test_each_wrong_option_gets_its_explanation(qid):
    checker = question(qid).checker
    for key in set(checker.options) - {checker.correct}:
        fails(qid, key, checker.explanations[key][:40])


def test_leak_question_wrong_options_explained_and_partial_refused():
    checker = question("09.q2").checker
    right = sorted(checker.correct)
    for key in set(checker.options) - set(right):
        fails("09.q2", {*right, key}, checker.explanations[key][:40])
    fails("09.q2", set(right[1:]), "more")


# --------------------------------------------------------------------------------------------
# 09.q3: a price feed that does not keep its subscribers alive


class FeedWithCallbacks:
    """WeakMethod with a removal callback (the model answer, written with a dict)."""

    def __init__(self):
        self.listeners = {}

    def subscribe(self, callback):
        ref = weakref.WeakMethod(callback, lambda dead: self.listeners.pop(id(dead), None))
        self.listeners[id(ref)] = ref

    def publish(self, product_id, price):
        for ref in list(self.listeners.values()):
            fn = ref()
            if fn is not None:
                fn(product_id, price)


class FeedByOwner:
    """A WeakKeyDictionary from each subscriber object to its function."""

    def __init__(self):
        self.owners = weakref.WeakKeyDictionary()

    def subscribe(self, callback):
        self.owners.setdefault(callback.__self__, []).append(callback.__func__)

    def publish(self, product_id, price):
        for owner, functions in list(self.owners.items()):
            for function in functions:
                function(owner, product_id, price)


class FeedPruningInPublish:
    """A list of WeakMethod, pruned of dead entries on every publish."""

    def __init__(self):
        self.refs = []

    def subscribe(self, callback):
        self.refs.append(weakref.WeakMethod(callback))

    def publish(self, product_id, price):
        alive = []
        for ref in self.refs:
            fn = ref()
            if fn is not None:
                alive.append(ref)
                fn(product_id, price)
        self.refs = alive


@pytest.mark.parametrize("feed", [FeedWithCallbacks, FeedByOwner, FeedPruningInPublish])
def test_flat_price_feeds_pass(feed):
    passes("09.q3", feed)


class StrongFeed:
    """The leak: a list of bound methods keeps every view alive."""

    def __init__(self):
        self.callbacks = []

    def subscribe(self, callback):
        self.callbacks.append(callback)

    def publish(self, product_id, price):
        for callback in self.callbacks:
            callback(product_id, price)


class WeakSetFeed:
    """Weak references to bound methods: they die at once, nobody is called."""

    def __init__(self):
        self.callbacks = weakref.WeakSet()

    def subscribe(self, callback):
        self.callbacks.add(callback)

    def publish(self, product_id, price):
        for callback in list(self.callbacks):
            callback(product_id, price)


class DeadRefsPileUp:
    """WeakMethod without ever removing the dead ones: the list grows."""

    def __init__(self):
        self.refs = []

    def subscribe(self, callback):
        self.refs.append(weakref.WeakMethod(callback))

    def publish(self, product_id, price):
        for ref in self.refs:
            fn = ref()
            if fn is not None:
                fn(product_id, price)


class ForgetsEveryone:
    """Keeps only the last subscriber: flat, but the dashboards stop getting prices."""

    def __init__(self):
        self.last = None

    def subscribe(self, callback):
        self.last = callback

    def publish(self, product_id, price):
        if self.last is not None:
            self.last(product_id, price)


class NoPublish:
    def subscribe(self, callback):
        pass


@pytest.mark.parametrize(("answer", "named"), [
    (StrongFeed, "not flat"),
    (WeakSetFeed, "WeakMethod"),
    (DeadRefsPileUp, "pile up"),
    (ForgetsEveryone, "dashboard"),
    (NoPublish, "publish()"),
    (StrongFeed(), "PriceFeed"),
])
def test_leaky_or_broken_feeds_fail_naming_the_mistake(answer, named):
    fails("09.q3", answer, named)


# --------------------------------------------------------------------------------------------
# 09.q4: a test that catches an N+1 on small fixture data


def answer_with_detector(engine, render_page, user_id):
    with cpi.NPlusOneDetector(engine, max_repeats=1), Session(engine) as session:
        render_page(session, user_id)


def answer_counting_by_hand(engine, render_page, user_id):
    with Session(engine) as session, count_queries(engine) as counted:
        render_page(session, user_id)
    shapes = [cpi.fingerprint(s.sql) for s in counted.statements]
    repeated = {s for s in shapes if shapes.count(s) > 1}
    assert not repeated, f"N+1: {repeated}"


def answer_detector_without_raising(engine, render_page, user_id):
    detector = cpi.forbid_n_plus_one(engine, max_repeats=1, raise_on_exit=False)
    with detector:
        with Session(engine) as session:
            render_page(session, user_id)
    assert detector.verdict() is None, detector.verdict()


@pytest.mark.parametrize("answer", [answer_with_detector, answer_counting_by_hand, answer_detector_without_raising])
def test_n_plus_one_tests_that_pass(answer):
    passes("09.q4", answer)


def default_threshold(engine, render_page, user_id):
    with cpi.forbid_n_plus_one(engine), Session(engine) as session:
        render_page(session, user_id)


def total_count(engine, render_page, user_id):
    with Session(engine) as session, count_queries(engine) as counted:
        render_page(session, user_id)
    assert counted.count <= 3


def wrong_engine(engine, render_page, user_id):
    other = sa.create_engine("sqlite://")
    with cpi.forbid_n_plus_one(other, max_repeats=1), Session(engine) as session:
        render_page(session, user_id)


def never_fails(engine, render_page, user_id):
    with Session(engine) as session:
        render_page(session, user_id)


def crashes_on_purpose(engine, render_page, user_id):
    raise RuntimeError("no database")


@pytest.mark.parametrize(("answer", "named"), [
    (default_threshold, "max_repeats"),
    (total_count, "not the total"),
    (wrong_engine, "engine the test was given"),
    (never_fails, "passed a page with an N+1"),
    (crashes_on_purpose, "RuntimeError"),
])
def test_wrong_n_plus_one_tests_fail_naming_the_mistake(answer, named):
    fails("09.q4", answer, named)


# --------------------------------------------------------------------------------------------
# The lab


PLANTS = {
    "/users/<id>/orders": ("/users/by-email", "place_order"),
    "/orders/<id>": ("/orders/recent", "change_price"),
    "/categories/<id>/products": ("/users/by-name", "rename_category"),
}


@pytest.fixture(params=list(PLANTS))
def lab(request):
    engine = memory_copy("tiny")
    lookup, write = PLANTS[request.param]
    made = cpi.LabService(engine, copy=False, issues={"n_plus_one": request.param, "missing_index": lookup,
                                                       "stale_write": write})
    yield made
    engine.dispose()


def users_orders(session, key):
    orders = session.scalars(sa.select(Order).where(Order.user_id == key).order_by(Order.id)
                             .options(selectinload(Order.items))).all()
    return [[o.id, o.status, f"{o.total:.2f}", sum(i.quantity for i in o.items)] for o in orders]


def order_detail(session, key):
    rows = session.execute(sa.select(Product.name, OrderItem.quantity, OrderItem.unit_price)
                           .join(OrderItem.product).where(OrderItem.order_id == key).order_by(OrderItem.id))
    return [(name, quantity, f"{price:.2f}") for name, quantity, price in rows]


def category_products(session, key):
    products = session.scalars(sa.select(Product).where(Product.category_id == key).order_by(Product.id)
                               .limit(12).options(selectinload(Product.order_items))).all()
    return [[p.id, p.name, f"{p.price:.2f}", len(p.order_items)] for p in products]


FIXED = {"/users/<id>/orders": users_orders, "/orders/<id>": order_detail,
         "/categories/<id>/products": category_products}
INDEXES = {"/users/by-email": "CREATE INDEX ix_email ON users (email)",
           "/orders/recent": "CREATE INDEX ix_recent ON orders (created_at)",
           "/users/by-name": "CREATE INDEX ix_name ON users (last_name)"}
RULES = {
    "place_order": lambda e: [f"user:{e['user_id']}:summary"] if e["kind"] == "place_order" else [],
    "change_price": lambda e: [f"product:{e['product_id']}:card"] if e["kind"] == "change_price" else [],
    "rename_category": lambda e: [f"product:{p}:card" for p in e.get("product_ids", [])],
}


def test_lab_fixes_pass(lab):
    key = lab._grading_key()
    passes("09.q6", FIXED[key["n_plus_one"]])
    passes("09.q7", INDEXES[key["missing_index"]])
    passes("09.q8", RULES[key["stale_write"]])


def test_lab_service_lazy_loader_is_refused_as_still_n_plus_one(lab):
    route = lab._grading_key()["n_plus_one"]
    fails("09.q6", lab.loaders[route], "still an N+1")


def test_lab_wrong_page_fixed(lab):
    route = lab._grading_key()["n_plus_one"]
    other = next(r for r in FIXED if r != route)
    fails("09.q6", FIXED[other], "what the N+1 page returns")


def test_lab_wrong_index(lab):
    lookup = lab._grading_key()["missing_index"]
    other = next(sql for route, sql in INDEXES.items() if route != lookup
                 and sql.split(" ON ")[1].split()[0] != INDEXES[lookup].split(" ON ")[1].split()[0])
    fails("09.q7", other, "full scan")
    fails("09.q7", "DROP TABLE users", "CREATE INDEX")


def test_lab_wrong_invalidation(lab):
    write = lab._grading_key()["stale_write"]
    other = next(w for w in RULES if w != write)
    fails("09.q8", RULES[other], "stale")
    fails("09.q8", lambda event: None, "stale")
    fails("09.q8", lambda event: [*RULES[write](event), *(f"user:{n}:summary" for n in range(1, 201))],
          "had not changed")
    fails("09.q8", lambda event: "user:1:summary", "list of cache keys")


def test_lab_questions_need_a_lab(monkeypatch):
    monkeypatch.setattr(cpi, "_lab_state", {})
    fails("09.q6", users_orders, "No lab service")


def _raises(*args):
    raise ValueError("learner bug")


@pytest.mark.parametrize("answer", [_raises, lambda *a: None, lambda *a: object(), 42, "not code"])
def test_lab_questions_refuse_hostile_answers_with_a_lab(lab, answer):
    for qid in ("09.q6", "09.q7", "09.q8"):
        fails(qid, answer)
