"""Chapter 10, the ten interview questions of the guide (10.q1 to 10.q10, in its order).

Each question's ``answer`` is a short model answer to the interview question, shown by ``check``
after a right attempt, and its ``explanation`` says why and where the course taught it.

Practical questions are graded by behaviour the learner cannot hard-code:

* 10.q1: the name that spent the most *self* time in hidden request traces (spans listed in any
  order, names repeated, nesting two levels deep);
* 10.q2: orders per user for hidden user ids (some without orders) on a private in-memory copy
  of the tiny dataset, in one statement, without loading ``Order`` objects;
* 10.q6: an index after which the plan of a "recent orders of one user with one status" page
  searches on both conditions and needs no sort step (SQLite's ``USE TEMP B-TREE``);
* 10.q7: keyset batches in ``(created_at, id)`` order on a private copy whose ``created_at``
  values tie across batch boundaries, one short query per batch, no ``OFFSET``.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from perfcourse.models import Order, User
from perfcourse.scratch import memory_copy
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    apply_schema_changes,
    call_learner,
    explain_or_hint,
    need_function,
    short_repr,
    type_name,
)

__all__ = ["QUESTIONS"]


# --------------------------------------------------------------------------------------------
# 10.q1: the bottleneck of a trace, by self time


def _bottleneck_reference(spans):
    """The span name with the largest total self time (duration minus direct children's)."""
    children = defaultdict(float)
    for span in spans:
        if span["parent"] is not None:
            children[span["parent"]] += span["end"] - span["start"]
    self_time = defaultdict(float)
    for span in spans:
        self_time[span["name"]] += span["end"] - span["start"] - children[span["id"]]
    return max(self_time, key=self_time.get)


class _Trace:
    """Builds one hidden trace: spans laid out one after another under their parent."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.spans: list[dict] = []

    def add(self, name, parent, start, duration, children=()):
        """Add a span of ``duration`` ms whose ``children`` (name, ms, grandchildren) run inside."""
        span_id = f"{self.rng.randrange(16**6):06x}{len(self.spans)}"
        self.spans.append({"id": span_id, "parent": parent, "name": name,
                           "start": round(start / 1000, 6), "end": round((start + duration) / 1000, 6)})
        at = start + self.rng.uniform(0.1, 0.5)
        for child_name, child_ms, grandchildren in children:
            self.add(child_name, span_id, at, child_ms, grandchildren)
            at += child_ms + self.rng.uniform(0.05, 0.2)
        return span_id

    def shuffled(self):
        spans = list(self.spans)
        self.rng.shuffle(spans)
        return spans


def _traces(rng: random.Random):
    """Hidden traces; each defeats one way of reading a trace wrongly."""
    # Many short queries add up to more than the one long render (sum by name, not per span);
    # the root's own duration is the largest of all (subtract the children).
    many = _Trace(rng)
    queries = [("SELECT orders", rng.uniform(1.8, 2.2), ()) for _ in range(40)]
    many.add("GET /orders", None, 0, 200, [
        ("authenticate", 5, ()), *queries[:20], ("render", 60, ()), *queries[20:],
        ("serialize", 30, [("SELECT products", 25, ())])])
    # "send email" spends most in its own code (155 ms) around a child that holds a grandchild:
    # subtracting every descendant (not only direct children) gives it 115 ms, and counting only
    # spans without children gives the 150 ms external call.
    nested = _Trace(rng)
    nested.add("POST /checkout", None, 0, 390, [
        ("load cart", 20, [("SELECT cart", 12, ())]),
        ("charge card", 150, ()),
        ("send email", 200, [("render template", 45, [("SELECT user", 40, ())])])])
    # The handler's own code is the bottleneck: the root's self time is the largest.
    own = _Trace(rng)
    own.add("GET /report", None, 0, 500, [("SELECT sales", 40, ()), ("SELECT users", 30, ()),
                                            ("render", 25, ())])
    return [many.shuffled(), nested.shuffled(), own.shuffled()]


def _inclusive_by_name(spans, with_root=True):
    total = defaultdict(float)
    for span in spans:
        if with_root or span["parent"] is not None:
            total[span["name"]] += span["end"] - span["start"]
    return max(total, key=total.get)


def _all_descendants_subtracted(spans):
    by_id = {s["id"]: s for s in spans}
    inside = defaultdict(float)
    for span in spans:
        parent = span["parent"]
        while parent is not None:
            inside[parent] += span["end"] - span["start"]
            parent = by_id[parent]["parent"] if parent in by_id else None
    own = defaultdict(float)
    for span in spans:
        own[span["name"]] += span["end"] - span["start"] - inside[span["id"]]
    return max(own, key=own.get)


def _largest_single_self(spans):
    children = defaultdict(float)
    for span in spans:
        if span["parent"] is not None:
            children[span["parent"]] += span["end"] - span["start"]
    best = max(spans, key=lambda s: s["end"] - s["start"] - children[s["id"]])
    return best["name"]


def _leaf_by_name(spans):
    parents = {s["parent"] for s in spans}
    total = defaultdict(float)
    for span in spans:
        if span["id"] not in parents:
            total[span["name"]] += span["end"] - span["start"]
    return max(total, key=total.get)


class _BottleneckCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("10.q1", bottleneck)')
        for spans in _traces(random.Random(1001)):
            expected = _bottleneck_reference(spans)
            got = call_learner(answer, [dict(s) for s in spans])
            names = {s["name"] for s in spans}
            if not isinstance(got, str):
                raise Incorrect(f"Return the span's name (a str, e.g. \"render\"), not a "
                                f"{type_name(got)}.")
            if got == expected:
                continue
            if got not in names:
                raise Incorrect(f"{short_repr(got, 40)} is not the name of any span of the trace: "
                                "return one of the spans' \"name\" values.")
            if got == _inclusive_by_name(spans):
                raise Incorrect(f"You returned {got!r}, whose duration includes the time of the spans "
                                "inside it: a span's self time is its duration minus its direct "
                                "children's durations.")
            if got == _largest_single_self(spans):
                raise Incorrect(f"You returned {got!r}, the single span with the largest self time, "
                                "but 40 short spans of one name can cost more than one long one: "
                                "add up self time per name.")
            if got == _inclusive_by_name(spans, with_root=False):
                raise Incorrect(f"You returned {got!r}, leaving the request's root span out and "
                                "counting children with their own children: the handler's own code "
                                "(the root's self time) can be the bottleneck.")
            if got in (_leaf_by_name(spans), _all_descendants_subtracted(spans)):
                raise Incorrect(f"You returned {got!r}, but a parent span's own code counts too: its "
                                "self time is its duration minus its *direct* children's only (the "
                                "grandchildren are already inside the children).")
            raise Incorrect(f"For a trace with {len(spans)} spans you returned {got!r}: subtract only "
                            "a span's *direct* children (their own children are already inside "
                            "them), then add up self time per name.")

    def model_answer(self):
        return (
            "from collections import defaultdict\n\n"
            "def bottleneck(spans):\n"
            "    inside = defaultdict(float)  # time of each span's direct children\n"
            "    for span in spans:\n"
            "        if span[\"parent\"] is not None:\n"
            "            inside[span[\"parent\"]] += span[\"end\"] - span[\"start\"]\n"
            "    self_time = defaultdict(float)\n"
            "    for span in spans:\n"
            "        self_time[span[\"name\"]] += span[\"end\"] - span[\"start\"] - inside[span[\"id\"]]\n"
            "    return max(self_time, key=self_time.get)")


# --------------------------------------------------------------------------------------------
# 10.q2: orders per user, in one query, with zeros


def _orders_per_user_reference(session, user_ids):
    counts = dict(session.execute(
        select(User.id, func.count(Order.id)).outerjoin(Order, Order.user_id == User.id)
        .where(User.id.in_(user_ids)).group_by(User.id)).all())
    return {user_id: counts.get(user_id, 0) for user_id in user_ids}


_TINY: dict = {}


def _tiny_copy():
    """One private in-memory copy of the tiny dataset per process (the checks only read it)."""
    if "engine" not in _TINY:
        _TINY["engine"] = memory_copy("tiny")
    return _TINY["engine"]


def _user_id_cases(engine, rng: random.Random):
    with engine.connect() as conn:
        users = conn.execute(select(User.id)).scalars().all()
        with_orders = set(conn.execute(select(Order.user_id).distinct()).scalars())
    without = [u for u in users if u not in with_orders]
    some = rng.sample(sorted(with_orders), 12) + rng.sample(without, 4)
    rng.shuffle(some)
    return [some, [rng.choice(without)], []]


class _OrdersPerUserCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("10.q2", orders_per_user)')
        engine = _tiny_copy()
        for user_ids in _user_id_cases(engine, random.Random(1002)):
            with Session(engine) as session:
                expected = _orders_per_user_reference(session, user_ids)
            loaded = Counter()
            with Session(engine) as session:
                event.listen(session, "loaded_as_persistent",
                             lambda s, instance, loaded=loaded: loaded.update([type(instance).__name__]))
                with count_queries(engine) as counted:
                    got = call_learner(answer, session, list(user_ids))
            self._compare(got, expected, user_ids)
            if counted.count > 1:
                repeated = Counter(" ".join(s.sql.split()) for s in counted.statements).most_common(1)
                many = repeated and repeated[0][1] > 2
                raise Incorrect(
                    f"Right counts, but your function ran {counted.count} queries for "
                    f"{len(user_ids)} users" + (" (the same query again and again: the N+1 "
                                                 "pattern)" if many else "")
                    + ": one statement can count every user's orders (an outer join and GROUP BY).")
            if loaded["Order"]:
                raise Incorrect(f"Right counts in one query, but it loaded {loaded['Order']} Order "
                                "objects only to count them: let the database count "
                                "(func.count ... GROUP BY) and send one row per user.")

    @staticmethod
    def _compare(got, expected, user_ids):
        if not isinstance(got, dict):
            raise Incorrect(f"Return a dict {{user_id: number of orders}}, not a {type_name(got)}.")
        zeros = [u for u, n in expected.items() if n == 0]
        missing = [u for u in expected if u not in got]
        if missing and set(missing) <= set(zeros):
            raise Incorrect(f"Users without orders are missing from your dict (e.g. user "
                            f"{missing[0]}): they must be there with 0. An inner join drops them.")
        if missing:
            raise Incorrect(f"User {missing[0]} of the ids given is missing from your dict.")
        extra = [u for u in got if u not in expected]
        if extra:
            raise Incorrect(f"Your dict has users that were not asked for ({short_repr(extra[:3])}): "
                            "count only the ids given.")
        for user_id, n in expected.items():
            value = got[user_id]
            if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
                raise Incorrect(f"Counts should be ints; for user {user_id} you returned "
                                f"{short_repr(value, 30)}.")
            if int(value) == n:
                continue
            if n == 0 and int(value) == 1:
                raise Incorrect(f"User {user_id} has no orders but your count is 1: with an outer "
                                "join, count(*) counts the row of NULLs; count(Order.id) counts "
                                "only real orders.")
            raise Incorrect(f"User {user_id} has {n} orders, your dict says "
                            f"{short_repr(value, 30)}.")

    def model_answer(self):
        return (
            "def orders_per_user(session, user_ids):\n"
            "    rows = session.execute(\n"
            "        select(User.id, func.count(Order.id))\n"
            "        .outerjoin(Order, Order.user_id == User.id)\n"
            "        .where(User.id.in_(user_ids))\n"
            "        .group_by(User.id)).all()\n"
            "    counts = dict(rows)\n"
            "    return {user_id: counts.get(user_id, 0) for user_id in user_ids}")


# --------------------------------------------------------------------------------------------
# 10.q6: an index for "the recent orders of one user with one status"

_RECENT_SQL = ("SELECT id, total, created_at FROM orders WHERE user_id = :user_id "
               "AND status = :status ORDER BY created_at DESC LIMIT 10")
_RECENT_PARAMS = {"user_id": 17, "status": "delivered"}


class _RecentOrdersIndexCheck(Checker):
    def grade(self, answer):
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise Incorrect("Answer with a CREATE INDEX statement (a string).")
        engine = memory_copy("tiny")
        try:
            apply_schema_changes(engine, answer)
            plan = explain_or_hint(engine, sa.text(_RECENT_SQL), _RECENT_PARAMS)
        finally:
            engine.dispose()
        text = "\n".join(plan.plan_text)
        search = re.search(r"\(([^)]*)\)", text)
        searched = search.group(1) if search else ""
        if not plan.uses_index or plan.verdict in ("full scan", "full index scan"):
            raise Incorrect(f"The plan is a {plan.verdict}: it walks the table or a whole index. "
                            "Put the columns compared with = first in the index.")
        if "status" not in searched or "user_id" not in searched:
            raise Incorrect(f"The plan searches the index {plan.index} on {searched or 'nothing'} "
                            "only: the other condition is tested row by row. An index on both "
                            "equality columns serves both.")
        if "TEMP B-TREE" in text.upper():
            raise Incorrect(f"The plan searches {plan.index} on both conditions, then still sorts "
                            "the rows (USE TEMP B-TREE FOR ORDER BY): add the ORDER BY column "
                            "after the equality columns, so the index returns them in order.")

    def model_answer(self):
        return "CREATE INDEX ix_orders_user_status_created ON orders (user_id, status, created_at)"


# --------------------------------------------------------------------------------------------
# 10.q7: keyset batches on a column with ties

#: The hidden copy: order dates rounded to the month, so about 30 orders share each created_at
#: and every batch boundary falls inside a tie; an index on the keyset.
_TIED = ["UPDATE orders SET created_at = strftime('%Y-%m-01 00:00:00.000000', created_at)",
         "CREATE INDEX ix_orders_created_id ON orders (created_at, id)"]


def _tied_copy():
    if "tied" not in _TINY:
        _TINY["tied"] = memory_copy("tiny", _TIED)
    return _TINY["tied"]


def _created_at_batches_reference(session, batch_size):
    last = None
    while True:
        statement = select(Order).order_by(Order.created_at, Order.id).limit(batch_size)
        if last is not None:
            statement = statement.where(sa.tuple_(Order.created_at, Order.id) > last)
        batch = session.scalars(statement).all()
        if not batch:
            return
        yield batch
        last = (batch[-1].created_at, batch[-1].id)
        session.expunge_all()


def _offset_used(statement) -> bool:
    sql = statement.sql.upper()
    if "OFFSET" not in sql:
        return False
    literal = re.search(r"OFFSET\s+(\d+)", sql)
    if literal:
        return int(literal.group(1)) > 0
    params = statement.parameters
    if isinstance(params, (list, tuple)) and params and re.search(r"OFFSET\s+\?\s*$", sql.strip()):
        last = params[-1]
        return isinstance(last, int) and last > 0
    return False



def _came_twice(size: int, order_id: int) -> Incorrect:
    return Incorrect(f"With batch_size={size}, order {order_id} came twice: orders sharing a "
                     "created_at at a batch boundary were read again (>= repeats the tie). "
                     "Continue after the last (created_at, id) pair.")

class _KeysetBatchesCheck(Checker):
    sizes = (7, 64, 2000)

    def grade(self, answer):
        need_function(answer, 'check("10.q7", created_at_batches)')
        engine = _tied_copy()
        with engine.connect() as conn:
            expected = conn.execute(select(Order.id).order_by(Order.created_at, Order.id)).scalars().all()
        for size in self.sizes:
            with Session(engine) as session, count_queries(engine) as counted:
                batches = call_learner(
                    lambda session=session, size=size: self._consume(answer(session, size), size))
            statements = list(counted.statements)
            if any(_offset_used(s) for s in statements):
                raise Incorrect("Your batches use OFFSET: each page makes the database read and "
                                "throw away every row before it, so the walk gets slower with "
                                "every batch. Continue after the last (created_at, id) instead.")
            got = [i for batch in batches for i in batch]
            self._compare(got, expected, size)
            if len(statements) < len(batches):
                raise Incorrect(f"Right rows, but {len(batches)} batches came from "
                                f"{len(statements)} query: one result was read whole (or kept open) "
                                "and cut into lists. Run one short keyset query per batch.")
            if len(statements) > len(batches) + 1:
                raise Incorrect(f"Right rows, but {len(statements)} queries for {len(batches)} "
                                f"batches of {size}: one query per batch (and at most one last, "
                                "empty one) is enough.")

    @staticmethod
    def _consume(result, size):
        if not isinstance(result, Iterable) or isinstance(result, (str, bytes, dict)):
            raise Incorrect(f"created_at_batches must yield (or return) batches, lists of orders; "
                            f"it returned a {type_name(result)}.")
        batches, seen = [], set()
        for batch in result:
            if not isinstance(batch, (list, tuple)):
                raise Incorrect(f"Each batch should be a list of orders, not a {type_name(batch)}.")
            if len(batch) > size:
                raise Incorrect(f"A batch held {len(batch)} orders with batch_size={size}: never more "
                                "than batch_size (LIMIT batch_size).")
            ids = []
            for order in batch:
                order_id = getattr(order, "id", None)
                if not isinstance(order_id, int):
                    raise Incorrect(f"Each batch should hold Order objects (with .id), got "
                                    f"{short_repr(order, 50)}.")
                ids.append(order_id)
            again = next((i for i in ids if i in seen), None)
            if again is not None:  # stop at the first repeat: `>=` on a tie may repeat forever
                raise _came_twice(size, again)
            seen.update(ids)
            if ids:
                batches.append(ids)
            if len(batches) > 5000:
                raise Incorrect("Your batches never end: stop when a query returns no rows.")
        return batches

    @staticmethod
    def _compare(got, expected, size):
        if got == expected:
            return
        seen = Counter(got)
        twice = [i for i, n in seen.items() if n > 1]
        if twice:
            raise _came_twice(size, twice[0])
        missing = [i for i in expected if i not in seen]
        if missing:
            raise Incorrect(f"With batch_size={size}, {len(missing)} orders never came: when many "
                            "orders share a created_at, `created_at > last` skips the rest of the "
                            "tie at a batch boundary. Compare (created_at, id) pairs.")
        if sorted(got) == sorted(expected):
            raise Incorrect(f"With batch_size={size}, every order came once but not in (created_at, "
                            "id) order: order by created_at, then id (the tie-breaker).")
        raise Incorrect(f"With batch_size={size}, your batches held orders that are not in the "
                        "table: yield the Order objects the queries return.")

    def model_answer(self):
        return (
            "def created_at_batches(session, batch_size):\n"
            "    last = None  # (created_at, id) of the last order seen\n"
            "    while True:\n"
            "        query = (select(Order).order_by(Order.created_at, Order.id)\n"
            "                 .limit(batch_size))\n"
            "        if last is not None:\n"
            "            query = query.where(sa.tuple_(Order.created_at, Order.id) > last)\n"
            "        batch = session.scalars(query).all()\n"
            "        if not batch:\n"
            "            return\n"
            "        yield batch\n"
            "        last = (batch[-1].created_at, batch[-1].id)\n"
            "        session.expunge_all()  # the finished batch can be freed")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="10.q1",
        title="Interview 1: identify the bottleneck in a trace",
        checker=_BottleneckCheck(),
        explanation=(
            "How to identify bottlenecks: measure before changing anything. Trace or profile a "
            "slow request (APM, pyinstrument, OpenTelemetry spans), read the slow-query log and "
            "EXPLAIN the worst statements, watch memory over time, and load-test while watching "
            "p95/p99. In a trace, the bottleneck is the code with the most self time, added up "
            "over its calls: 40 queries of 2 ms cost more than one 60 ms render. Taught in 01 (the "
            "five principles) and 08 (profiling slow requests, tracing)."),
        hints=("Sum, per span id, the durations of the spans whose parent it is; then per name, "
               "duration minus that sum; take the name with the largest total.",),
    ),
    Question(
        id="10.q2",
        title="Interview 2: N+1, counted in one query",
        checker=_OrdersPerUserCheck(),
        explanation=(
            "N+1: the page runs one query for the list, then one more per row when the loop "
            "touches a relationship (user.orders.count). Fixes: load the relationship up front "
            "(selectinload = Rails preload, joinedload = eager_load; includes picks one), or, "
            "when the page only needs a number, count in SQL (GROUP BY, with an outer join for "
            "the zeros) or keep a counter cache. Taught in 02 (the N+1 problem, counter cache)."),
        hints=("select(User.id, func.count(Order.id)).outerjoin(Order, ...).where(User.id.in_(...))"
               ".group_by(User.id), then fill in 0 for any id the query did not return.",),
    ),
    Question(
        id="10.q3",
        title="Interview 3: caching a product page",
        answer=(
            "Cache at the level that saves the most and stays correct: fragments (rendered pieces "
            "keyed by record id and version), low-level cache-aside in Redis with a TTL for "
            "expensive results, and HTTP caching (ETag/Last-Modified answered with 304) so "
            "browsers and CDNs skip the body. Redis is the shared store every process reads."),
        checker=Choice(
            options={
                "a": "Cache the rendered fragment in Redis under a key with the product's id and "
                "updated_at, and answer If-None-Match with 304 using an ETag of that version",
                "b": "Cache the whole page in a dict in each worker process for an hour, since "
                "reading memory is faster than any network round trip",
                "c": "Send Cache-Control: public, max-age=31536000, immutable with the page, so "
                "browsers and CDNs never ask for it again",
                "d": "Pickle the Product ORM objects into Redis, so each render skips the query "
                "but still builds the page from fresh objects",
            },
            correct="a",
            explanations={
                "b": "A dict per worker is not shared (each of N processes misses and holds its "
                "own copy), never bounded, and an edit is seen by none of them for an hour: no "
                "invalidation reaches another process.",
                "c": "immutable with a year's max-age is for fingerprinted assets whose URL changes "
                "with the content: a product page's URL stays, so an edit would never be seen.",
                "d": "Detached ORM objects lazy-load (or fail) when the template touches a "
                "relationship, pickles break across code versions, and the render still runs "
                "every time: cache plain data or the rendered result.",
            },
        ),
        explanation=(
            "The key carries the version (updated_at), so an edit makes a new key and the old one "
            "expires; the ETag of the same version lets a browser that has the page get a 304 "
            "with no body. Taught in 05 (cache-aside, key design, fragment caching, HTTP caching)."),
    ),
    Question(
        id="10.q4",
        title="Interview 4: what to scale first",
        answer=(
            "Find the saturated tier first. Stateless app servers scale horizontally behind a "
            "load balancer (processes sized to cores, threads to the share of waiting); the "
            "database scales with caching, read replicas, pooling, and sharding when writes "
            "outgrow one server; slow work moves to background jobs and static files to a CDN."),
        checker=Choice(
            options={
                "a": "Add app servers behind the load balancer: more servers means more requests "
                "served at once",
                "b": "Take load off the database: cache the hot reads, send the remaining reads to "
                "a replica, then measure again",
                "c": "Raise the threads per worker: requests that mostly wait scale with threads, as "
                "this notebook measured",
                "d": "Move the app to a machine with twice the cores, since vertical scaling needs "
                "no code change",
            },
            correct="b",
            explanations={
                "a": "The app servers are not the bottleneck: more of them send more concurrent "
                "queries (and connections) to a database that is already at 95% CPU, so requests "
                "queue there and get slower.",
                "c": "Threads help while the thing waited on has spare capacity: here the waiting is "
                "on a saturated database, so more threads only lengthen its queue.",
                "d": "A bigger app machine speeds up the part that is not saturated; the database "
                "stays at 95% and the requests still wait for it.",
            },
        ),
        explanation=(
            "Throughput stops where the slowest shared resource saturates; scaling anything in "
            "front of it adds queueing, not throughput. Taught in 03 (replicas, pooling), 05 "
            "(caching) and 07 (throughput against workers and threads)."),
    ),
    Question(
        id="10.q5",
        title="Interview 5: monitoring this app",
        answer=(
            "Time every request (middleware, like the guide's around_action) and log the slow "
            "ones with a request id; keep latency histograms per route and alert on p95/p99 and "
            "the error rate; track errors (Sentry) and saturation (queues, pools); an APM or "
            "tracing ties a slow request to its SQL; readiness checks watch DB, Redis, queue."),
        checker=MultiChoice(
            options={
                "a": "Alert when the mean response time passes the budget, since it summarises "
                "every request",
                "b": "Log every request slower than a threshold, with its route and request id",
                "c": "Alert on p95 and p99 from a latency histogram per route over a window",
                "d": "Log every SQL statement with its parameters at INFO level in production",
                "e": "Track the error rate and saturation (queue length, pool in use) beside latency",
                "f": "Time only the SQL: the application's own code is never where the time goes",
                "g": "Time only one request in a thousand, because timing every request costs "
                "too much",
                "h": "Check the dependencies (database, Redis, queue) in a readiness probe with a "
                "timeout",
            },
            correct={"b", "c", "e", "h"},
            explanations={
                "a": "The mean hides the tail: in this notebook's load the mean sat far below the "
                "p99, because a few slow requests are drowned by many fast ones.",
                "d": "Every statement at INFO floods the logs, costs I/O on every query and leaks "
                "customer data in the parameters: log slow statements, sample the rest.",
                "f": "The time often goes elsewhere: a render, an external call (a payment "
                "provider, a mail server), the handler's own loops. Time the whole request, then "
                "break it down with spans.",
                "g": "Timing a request costs two clock reads: this notebook measured about a "
                "microsecond per call, nothing next to a request of milliseconds. Time them all; "
                "sample only expensive things like profiles.",
            },
        ),
        explanation=(
            "Metrics with percentiles for alerts, logs with request ids for the story of one "
            "request, error tracking, saturation, and cheap health checks. Taught in 08 (timing "
            "middleware, histograms, structured logs, health checks) and 01 (percentiles)."),
    ),
    Question(
        id="10.q6",
        title="Interview 6: an index for a page's query",
        checker=_RecentOrdersIndexCheck(),
        explanation=(
            "Optimising database performance: index the columns queries filter, join and sort on "
            "(equality columns first, then the ORDER BY column, so the index returns rows in "
            "order and LIMIT stops early), eager-load to avoid N+1, pool connections, send reads "
            "to replicas, and read the slow-query log with EXPLAIN. Taught in 02 (indexes, "
            "EXPLAIN) and 03 (pooling, replicas)."),
        hints=("CREATE INDEX ... ON orders (user_id, status, created_at): both = columns, then the "
               "sort column.",),
    ),
    Question(
        id="10.q7",
        title="Interview 7: keyset batches on a column with ties",
        checker=_KeysetBatchesCheck(),
        explanation=(
            "Handling memory leaks: do not retain what you no longer need (bounded caches, no "
            "growing module-level lists), break or avoid reference cycles, find growth by "
            "comparing tracemalloc snapshots and RSS over time, and walk big tables in batches or "
            "streams instead of loading them whole. A keyset on a non-unique column needs a "
            "tie-breaker: (created_at, id). Taught in 04 (batches and streaming, GC myths) and "
            "09 (memory leaks)."),
        hints=("Keep the last (created_at, id) you yielded and ask for "
               "sa.tuple_(Order.created_at, Order.id) > last, ordered by both, LIMIT batch_size.",),
        time_limit=12.0,
    ),
    Question(
        id="10.q8",
        title="Interview 8: a confirmation email as a job",
        answer=(
            "A Redis-backed queue (RQ, Sidekiq, Celery) with worker processes; separate queues by "
            "priority; retries with exponential backoff and jitter, so jobs must be idempotent; "
            "monitoring of queue length, failures and durations; a scheduler for recurring jobs. "
            "Pass ids, not objects, and enqueue after the commit."),
        checker=Choice(
            options={
                "a": "Send it in a thread started by the request handler, so the response does not "
                "wait and no queue is needed",
                "b": "Enqueue the pickled Order object, so the job does not need to query the "
                "database again",
                "c": "Enqueue the order id after the commit; the job loads the order and records the "
                "email as sent under a key, so a retry skips it",
                "d": "Enqueue the order id before the commit, so the email goes out as soon as "
                "possible",
            },
            correct="c",
            explanations={
                "a": "A thread dies with its process (a deploy, a worker recycled by gunicorn) and "
                "has no retries or monitoring: the email is silently lost.",
                "b": "The pickle is a stale copy taken at enqueue time, can be large, and breaks "
                "when the model changes between deploys: pass the id and load fresh data.",
                "d": "The worker can pick the job up before the commit is visible (or after a "
                "rollback): it finds no order, or emails about one that does not exist.",
            },
        ),
        explanation=(
            "Retries mean a job can run twice: the sent-marker (SET NX with an expiry) makes the "
            "second run a no-op, and enqueueing after the commit means the worker sees the order. "
            "Taught in 06 (queues, retries, idempotency, offloading)."),
    ),
    Question(
        id="10.q9",
        title="Interview 9: caching strategies",
        answer=(
            "Cache at several levels (application, database results, CDN); invalidate on change "
            "(delete or re-version after commit) with a TTL as the safety net; meaningful keys "
            "(namespace, kind, id, version); expiry chosen from how stale data may be; warm hot "
            "keys; protect against stampedes when a hot key expires."),
        checker=MultiChoice(
            options={
                "a": "Give every key a TTL, as a safety net even when writes invalidate it",
                "b": "Delete or re-version the key after the transaction that changed the data "
                "commits",
                "c": "Delete the key before the write commits, so no reader sees stale data",
                "d": "Grow the cache until the hit rate reaches 100%",
                "e": "Name keys by namespace, kind, id and version",
                "f": "Delete a family of keys with KEYS and a pattern",
                "g": "Warm the hottest keys before traffic arrives, e.g. after a deploy",
            },
            correct={"a", "b", "e", "g"},
            explanations={
                "c": "Between the delete and the commit a reader misses, reads the old row and "
                "caches it again: the stale value stays until the TTL. Invalidate after commit.",
                "d": "On a skewed workload the hit rate flattens as the cache grows (this notebook "
                "measured it): the last percent needs room for keys almost never asked for.",
                "f": "KEYS walks every key in one command and blocks Redis for everyone meanwhile: "
                "SCAN in batches instead.",
            },
        ),
        explanation=(
            "Correctness comes from invalidating after commit and versioned keys, with a TTL so a "
            "missed invalidation heals; cost from sizing to the hot set and warming it. Taught in "
            "05 (key design, hit rate, invalidation, SCAN, stampedes)."),
    ),
    Question(
        id="10.q10",
        title="Interview 10: a flash sale next week",
        answer=(
            "Load-test at the expected traffic to find the first tier that saturates; spread "
            "requests over stateless app servers behind a load balancer with health checks; cache "
            "hot pages and data (Redis, HTTP, CDN for static files); relieve the database with "
            "replicas and right-sized pools; move slow work to background jobs."),
        checker=Choice(
            options={
                "a": "Raise max_connections on the database and each pool's size, so every request "
                "gets a connection at once",
                "b": "Turn caching off for the sale, so every visitor sees the exact stock and "
                "price at every moment",
                "c": "Double the app servers the morning of the sale; scaling out is quick and needs "
                "no measurement",
                "d": "Load-test at the expected rate, cache the hot pages, move emails to jobs, and "
                "add servers behind the balancer",
            },
            correct="d",
            explanations={
                "a": "More connections than the database has cores to serve them makes every query "
                "slower (contention, memory per connection): pools sized by Little's law queue in "
                "the app instead, where it is cheap.",
                "b": "Without the cache every visit reaches the database, which this notebook's "
                "load showed serves far fewer requests per second: cache with short TTLs and "
                "check stock at checkout.",
                "c": "Without a load test you do not know whether the app servers are the limit: "
                "if the database saturates first, more app servers only add load to it.",
            },
        ),
        explanation=(
            "Measure, then remove work per request (cache, jobs) and spread what remains (balancer, "
            "replicas). Taught in 01 (measure first), 05 (caching), 06 (jobs) and 07 (balancing, "
            "scaling)."),
    ),
]
