"""Chapter 01, performance fundamentals: percentiles, Little's law, utilisation, bottlenecks.

01.q1-01.q4 are in the lesson (solutions/01-performance-fundamentals.ipynb), 01.q5-01.q8 in
the lab (solutions/01-performance-fundamentals-lab.ipynb).
"""

from __future__ import annotations

import copy
import inspect
import numbers
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from perfcourse.chapters.performance_fundamentals import (
    as_money,
    favourite_category,
    latency_log,
    user_items,
)
from perfcourse.stats import percentile

from ..bank import Question
from ..checkers import (
    NOT_WRITTEN,
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    NoAnswer,
    Number,
    call_learner,
    is_unwritten,
    need_function,
    short_repr,
    shorten,
    values_equal,
)
from ..datasets import private_dataset

__all__ = [
    "QUESTIONS",
]


@dataclass
class _ComputedNumber(Checker):
    """A :class:`Number` whose right value is computed on first use (from seeded data)."""

    compute: Callable[[], float]
    rel_tol: float = 0.01
    unit: str = ""

    def _number(self) -> Number:
        return Number(self.compute(), rel_tol=self.rel_tol, unit=self.unit)

    def grade(self, answer):
        self._number().grade(answer)

    def model_answer(self):
        return self._number().model_answer()


def _checkout_p99_ms() -> float:
    log = latency_log()
    return round(percentile(log.loc[log.endpoint == "POST /checkout", "duration_s"], 99) * 1000, 1)


# --- a function the learner writes, with hints that name the usual slips -----------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class _DiagnosedFunction(Checker):
    """A function the learner writes, run on hidden inputs against ``reference``.

    When a result is wrong, each ``slips`` entry ``(variant, hint)`` is tried: a variant is the
    function a learner gets by one typical mistake, and when the learner's result equals the
    variant's (and differs from the right one) its hint names that mistake. ``error_hints`` maps
    an exception name to a hint added when the learner's code raised it. ``special(args)`` may
    return a hint for an edge case (q = 0, an empty window...). A reference returning None means
    "no value" (the question states it); the learner must return None too. Inputs are copies: a
    learner function that changes the list it is given fails with ``mutation_hint``.
    """

    reference: Callable
    cases: Callable[[random.Random], Any]
    example: str
    slips: tuple = ()
    error_hints: dict = field(default_factory=dict)
    special: Callable | None = None
    none_hint: str = ""
    mutation_hint: str = "Your function changed the list it was given: work on a copy."
    seed: int = 20240601

    def grade(self, answer):
        need_function(answer, self.example)
        if is_unwritten(answer):
            raise NoAnswer(NOT_WRITTEN)
        for args in self.cases(random.Random(self.seed)):
            expected = self.reference(*copy.deepcopy(args))
            given = copy.deepcopy(args)
            shown = ", ".join(short_repr(a, 90) for a in args)
            try:
                got = call_learner(answer, *given)
            except NoAnswer:
                raise
            except Incorrect as exc:
                extra = next((h for name, h in self.error_hints.items() if name in str(exc)), "")
                raise Incorrect(f"{exc} (input: {shown}){' ' + extra if extra else ''}") from None
            if not values_equal(list(given), list(args)):
                raise Incorrect(f"{self.mutation_hint} (input: {shown})")
            if expected is None:
                if got is not None:
                    raise Incorrect(f"For ({shown}) you returned {short_repr(got, 40)}: {self.none_hint}")
                continue
            if got is None:
                hint = self._diagnose(args, None, expected, slips_only=True)
                raise Incorrect(f"Your function returned None for ({shown}): "
                                + (hint or "did you forget `return`?"))
            if not _is_number(got):
                raise Incorrect(f"Return a number (a float), not a {type(got).__name__} (input: {shown}).")
            if values_equal(float(got), expected):
                continue
            hint = self._diagnose(args, float(got), expected)
            raise Incorrect(f"For ({shown}) your function returned {float(got):.10g}, expected "
                            f"{expected:.10g}.{' ' + hint if hint else ''}")

    def _diagnose(self, args, got, expected, slips_only=False) -> str:
        """The hint of the first slip whose result is the learner's (None matches None)."""
        for variant, hint in self.slips:
            try:
                wrong = variant(*copy.deepcopy(args))
            except Exception:  # noqa: BLE001 - a slip that cannot happen on this input
                continue
            if values_equal(wrong, expected):
                continue
            if (got is None and wrong is None) or (
                    got is not None and wrong is not None and values_equal(got, wrong)):
                return hint
        if slips_only or not self.special:
            return ""
        return self.special(args) or ""

    def model_answer(self):
        return inspect.getsource(self.reference)


# --- 01.q5: a percentile from a latency histogram ----------------------------------------------


def histogram_percentile(buckets, q):
    """The q-th percentile (0-100) estimated from (upper_bound_s, count) buckets."""
    ordered = sorted(buckets)  # by upper bound; a copy: the caller's list stays as it was
    total = sum(count for _, count in ordered)
    if total == 0:
        return None  # no requests, no percentile
    rank = total * q / 100
    below, lower = 0, 0.0
    for upper, count in ordered:
        if count and below + count >= rank:  # the first bucket holding requests that reaches the rank
            return lower + (upper - lower) * (rank - below) / count
        below += count
        lower = upper
    raise AssertionError("unreachable: the last bucket holding requests reaches the total")


def _bucket_search(ordered, rank, *, skip_empty=True, wrap=False):
    """Where ``rank`` falls: ``(index, lower, upper, below, count)`` (variants' building block)."""
    below = 0
    for i, (upper, count) in enumerate(ordered):
        if (count or not skip_empty) and below + count >= rank:
            lower = ordered[i - 1][0] if (i > 0 or wrap) else 0.0
            return i, lower, upper, below, count
        below += count
    return None


def _slip_interpolate(buckets, q, *, sort=True, rank_of=None, wrap=False, pick=None):
    ordered = sorted(buckets) if sort else list(buckets)
    total = sum(c for _, c in ordered)
    if total == 0:
        return None
    rank = rank_of(total, q) if rank_of else total * q / 100
    found = _bucket_search(ordered, rank, wrap=wrap)
    if found is None:
        return None
    _, lower, upper, below, count = found
    if pick == "upper":
        return upper
    if pick == "lower":
        return lower
    return lower + (upper - lower) * (rank - below) / count


def _slip_cumulative(buckets, q):
    """Counts read as cumulative (Prometheus' ``le`` buckets), which these are not."""
    ordered = sorted(buckets)
    total = ordered[-1][1]
    rank = total * q / 100
    previous_bound, previous_count = 0.0, 0
    for upper, cumulative in ordered:
        if cumulative >= rank and cumulative > previous_count:
            return previous_bound + (upper - previous_bound) * (rank - previous_count) / (cumulative - previous_count)
        previous_bound, previous_count = upper, cumulative
    return None


_PERCENTILE_SLIPS = (
    (lambda b, q: _slip_interpolate(b, q, sort=False),
     "The buckets can come in any order: sort them by upper bound first (a sorted copy, e.g. "
     "sorted(buckets), not buckets.sort())."),
    (lambda b, q: _slip_interpolate(b, q, pick="upper"),
     "That is the upper bound of the right bucket: interpolate linearly inside the bucket, "
     "lower + (upper - lower) * (rank - below) / count."),
    (lambda b, q: _slip_interpolate(b, q, pick="lower"),
     "That is the lower bound of the right bucket: interpolate linearly inside the bucket, "
     "lower + (upper - lower) * (rank - below) / count."),
    (lambda b, q: _slip_interpolate(b, q, wrap=True),
     "The first bucket starts at 0: with i = 0, buckets[i - 1] is the *last* bucket in Python."),
    (lambda b, q: _slip_interpolate(b, q, rank_of=lambda n, q: (n - 1) * q / 100),
     "Off by one: the rank is total * q / 100 (the rule of this histogram), not (total - 1) * q / 100."),
    (lambda b, q: _slip_interpolate(b, q, rank_of=lambda n, q: n * q / 10_000),
     "q is a percentage from 0 to 100: the rank is total * q / 100, with q as given."),
    (_slip_cumulative,
     "Each count is the number of requests in that bucket alone, not a running (cumulative) total: "
     "add them up as you walk the buckets."),
)


def _percentile_edge(args) -> str:
    buckets, q = args
    if q == 0:
        return ("For q = 0 the answer is the lower bound of the first bucket that holds requests "
                "(skip empty buckets: they never hold the rank).")
    if q == 100:
        return "For q = 100 the answer is the upper bound of the last bucket that holds requests."
    if any(count == 0 for _, count in buckets):
        return "Empty buckets (count 0) hold no requests: the rank never falls in one."
    return ""


def _histogram(rng, bounds, *, empty_share=0.2):
    counts = [0 if rng.random() < empty_share else rng.randint(1, 400) for _ in bounds]
    if not any(counts):
        counts[rng.randrange(len(counts))] = rng.randint(1, 50)
    return list(zip(bounds, counts))


_PROMETHEUS_BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


def _histogram_cases(rng):
    yield ([], 50)  # no buckets at all
    yield ([(0.1, 0), (0.2, 0)], 99)  # buckets, but no request
    yield ([(0.05, 10), (0.1, 10)], 25)  # the rank inside the first bucket, which starts at 0
    yield ([(0.2, 4)], 50)  # one bucket: from 0 to its bound
    yield ([(0.01, 0), (0.02, 5), (0.05, 5)], 0)  # q = 0 with an empty first bucket
    yield ([(0.01, 3), (0.02, 5), (0.05, 0)], 100)  # q = 100 with an empty last bucket
    yield ([(0.1, 2), (0.01, 10), (0.05, 8)], 75)  # unsorted
    yield ([(0.01, 5), (0.02, 5)], 50)  # the rank exactly on a bucket's edge
    yield ([(0.05, 6), (0.1, 0), (0.3, 4)], 80)  # the rank just past an empty bucket
    yield ([(0.01, 1), (0.03, 998), (0.5, 1)], 99.9)
    for i in range(10):
        bounds = sorted(rng.sample(_PROMETHEUS_BOUNDS, rng.randint(2, len(_PROMETHEUS_BOUNDS))))
        buckets = _histogram(rng, bounds)
        if i % 3 == 0:
            rng.shuffle(buckets)
        yield (buckets, rng.choice([50, 90, 95, 99, 99.9, round(rng.uniform(0, 100), 2)]))


# --- 01.q6: requests in flight during a window -------------------------------------------------


def mean_in_flight(log, start_s, end_s):
    """The mean number of requests of log in flight during [start_s, end_s)."""
    busy = 0.0
    for begin, end in log:
        overlap = min(end, end_s) - max(begin, start_s)  # the part of the request inside the window
        if overlap > 0:
            busy += overlap
    return busy / (end_s - start_s)


def _overlapping(log, start_s, end_s):
    return [(b, e) for b, e in log if e > start_s and b < end_s]


_IN_FLIGHT_SLIPS = (
    (lambda log, a, b: sum(e - s for s, e in _overlapping(log, a, b)) / (b - a),
     "Clip each request to the window: one that started before start_s counts only from "
     "start_s, one still running at end_s only up to end_s."),
    (lambda log, a, b: sum(e - s for s, e in log) / (b - a),
     "Only the time inside the window counts: clip each request to the window, and a request "
     "that ends before start_s or starts after end_s adds nothing."),
    (lambda log, a, b: sum(min(e, b) - s for s, e in _overlapping(log, a, b)) / (b - a),
     "Clip both ends: a request that started before start_s counts only from start_s."),
    (lambda log, a, b: sum(e - max(s, a) for s, e in _overlapping(log, a, b)) / (b - a),
     "Clip both ends: a request still running at end_s counts only up to end_s."),
    (lambda log, a, b: sum(min(e, b) - max(s, a) for s, e in log) / (b - a),
     "A request outside the window has a negative overlap: add max(0, overlap), not the overlap."),
    (lambda log, a, b: sum(e - s for s, e in log if a <= s < b) / (b - a),
     "Counting only the requests that start inside the window misses those already running at "
     "start_s, and counts the whole of those still running at end_s: clip each request instead."),
    (lambda log, a, b: (sum(e - s for s, e in log) / (max(e for _, e in log) - min(s for s, _ in log)))
     if log else None,
     "That is L over the whole log (first start to last end), as the lesson computed it: this "
     "exercise asks for the window [start_s, end_s) you are given."),
)


def _in_flight_edge(args) -> str:
    log, start_s, end_s = args
    if not _overlapping(log, start_s, end_s):
        return "No request overlaps this window: nothing was in flight, so the answer is 0.0."
    return ""


def _request_log_cases(rng):
    yield ([], 0.0, 1.0)  # an empty log
    yield ([(0.0, 1.0)], 0.0, 1.0)
    yield ([(0.0, 4.0)], 1.0, 3.0)  # one request across both edges
    yield ([(0.0, 0.5), (2.0, 3.0)], 1.0, 1.5)  # no request inside the window
    yield ([(0.5, 1.5), (1.2, 1.4), (1.8, 2.6)], 1.0, 2.0)
    yield ([(3.0, 3.5), (0.2, 1.4), (0.9, 2.6), (1.0, 1.0)], 1.0, 3.0)  # unsorted, one of length 0
    for _ in range(10):
        t, log = rng.uniform(0, 1000), []
        for _ in range(rng.randint(2, 300)):
            t += rng.expovariate(rng.choice([5, 50, 500]))
            log.append((t, t + rng.lognormvariate(-3, 1)))
        rng.shuffle(log)  # a log need not be sorted
        first, last = min(s for s, _ in log), max(e for _, e in log)
        start = rng.uniform(first, (first + last) / 2)
        yield (log, start, rng.uniform(start + 0.05, last + 0.5))


# --- 01.q7: the bottleneck's name ----------------------------------------------------------------


@dataclass
class _FunctionName(Checker):
    """The name of a function, as a string; ``explanations`` per known wrong name."""

    expected: str
    module: str
    explanations: dict = field(default_factory=dict)

    def _normal(self, answer: str) -> str:
        name = answer.strip().removesuffix("()").strip()
        return name.removeprefix(self.module + ".").removeprefix("fun.")

    def grade(self, answer):
        if not isinstance(answer, str):
            raise Incorrect(f"Answer with the function's name as a string, e.g. answer = \"user_items\" "
                            f"(got a {type(answer).__name__}).")
        name = self._normal(answer)
        if name != self.expected:
            raise Incorrect(self.explanations.get(name)
                            or f"{short_repr(answer, 60)} is not the function that holds most of the time.")

    def model_answer(self):
        return repr(self.expected)


# --- 01.q8: the fix of customer_report, counted where the queries land -------------------------


def _customer_report_fast(engine, user_ids):
    """The fix: every category in one query (a dict), so the loop issues no queries."""
    with engine.connect() as conn:
        rows = user_items(conn, user_ids)
        category_of = dict(conn.execute(sa.text(
            "SELECT p.id, c.name FROM products p JOIN categories c ON c.id = p.category_id"
        )).all())
    per_user: dict[int, dict[str, Decimal]] = {}
    for user_id, product_id, quantity, unit_price in rows:
        spent = per_user.setdefault(user_id, {})
        category = category_of[product_id]
        spent[category] = spent.get(category, Decimal(0)) + quantity * as_money(unit_price)
    return [
        {"user_id": u, "spent": sum(s.values(), Decimal(0)), "favourite": favourite_category(s)}
        for u, s in sorted(per_user.items())
    ]


def _same_report(got: Any, expected: list[dict]) -> str | None:
    """None when ``got`` matches ``expected`` (money to the cent), else what differs."""
    if not isinstance(got, list):
        return f"Return a list of dicts, like customer_report does (got a {type(got).__name__})."
    if len(got) != len(expected):
        return f"Your report has {len(got)} rows; customer_report gives {len(expected)} for the same users."
    for row, want in zip(got, expected):
        if not isinstance(row, dict) or set(row) != {"user_id", "spent", "favourite"}:
            return f"Each row is a dict with keys user_id, spent, favourite (got {short_repr(row, 80)})."
        try:
            spent_ok = round(Decimal(str(row["spent"])), 2) == round(want["spent"], 2)
        except Exception:  # noqa: BLE001 - a spent that is not a number
            spent_ok = False
        if row["user_id"] != want["user_id"] or not spent_ok or row["favourite"] != want["favourite"]:
            return (f"For user {want['user_id']} customer_report gives {short_repr(want, 90)}, "
                    f"yours gives {short_repr(row, 90)}.")
    return None


_NOT_QUERIES = re.compile(r"\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA)\b", re.I)


def _repeated(statements: list[str]) -> str:
    shapes = Counter(re.sub(r"\b\d+(\.\d+)?\b", "?", " ".join(s.split())) for s in statements)
    if not shapes:
        return ""
    text, times = shapes.most_common(1)[0]
    if times > 2:
        return (f" The same query ran {times} times ({shorten(text, 70)}): one query per item, the "
                "N+1 pattern.")
    return ""


def _other_engines(engine: Engine, sink: list[str]) -> Callable:
    """A ``before_cursor_execute`` listener that notes statements of engines other than ``engine``."""

    def listener(conn, cursor, statement, parameters, context, executemany):
        if conn.engine is not engine:
            sink.append(statement)

    return listener


@dataclass
class _FasterReport(Checker):
    """The learner's ``customer_report_fast(engine, user_ids)``: the rows of ``customer_report``
    for hidden users of a private in-memory copy of the dataset, in at most ``max_queries``.

    Queries are counted where they land, by SQLite's trace hook on the copy's only connection:
    whatever sends them (the engine given, a second engine, the raw DB-API connection) is seen,
    and nothing outside this process can reach an in-memory database. SQLAlchemy statements
    sent through any other engine during the call are noted too, to say so in the hint.
    """

    max_queries: int = 2
    seed: int = 20240601

    def grade(self, answer):
        need_function(answer, 'check("01.q8", customer_report_fast)')
        if is_unwritten(answer):
            raise NoAnswer(NOT_WRITTEN)
        engine = private_dataset()
        try:
            self._grade_on(engine, answer)
        finally:
            engine.dispose()

    def _grade_on(self, engine, answer):
        with engine.connect() as conn:
            users = conn.exec_driver_sql("SELECT count(*) FROM users").scalar_one()
        proxied = engine.raw_connection()
        database = proxied.driver_connection  # the copy's one sqlite3 connection (a StaticPool)
        proxied.close()
        rng = random.Random(self.seed)
        some = rng.sample(range(1, users + 1), 40)
        inputs = [[], [1], sorted(some), sorted(rng.sample(range(1, users + 1), 25)) + [users + 1000],
                  some[:15][::-1] + [some[0]]]  # unsorted, one id twice
        for user_ids in inputs:
            expected = _customer_report_fast(engine, list(user_ids))
            reached: list[str] = []
            elsewhere: list[str] = []
            other_engine = _other_engines(engine, elsewhere)
            database.set_trace_callback(reached.append)
            sa.event.listen(Engine, "before_cursor_execute", other_engine)
            try:
                got = call_learner(answer, engine, list(user_ids))
            except NoAnswer:
                raise
            except Incorrect as exc:
                if elsewhere:
                    raise Incorrect(f"{str(exc).rstrip('.')}. Your code sent queries through an engine of its own: the "
                                    "grader's data is only behind the engine you are given.") from None
                raise
            finally:
                database.set_trace_callback(None)
                sa.event.remove(Engine, "before_cursor_execute", other_engine)
            problem = _same_report(got, expected)
            if problem:
                raise Incorrect(problem + f" (user_ids: {short_repr(user_ids, 60)})")
            queries = [s for s in reached if not _NOT_QUERIES.match(s)]
            if len(queries) > self.max_queries:
                raise Incorrect(
                    f"Right report, but {len(queries)} queries reached the database for "
                    f"{len(user_ids)} user{'' if len(user_ids) == 1 else 's'}: at most "
                    f"{self.max_queries} are needed, whatever the number of users and items."
                    + _repeated(queries)
                )

    def model_answer(self):
        return inspect.getsource(_customer_report_fast)


QUESTIONS = [
    Question(
        id="01.q1",
        title="Interview: how do you identify performance bottlenecks?",
        checker=MultiChoice(
            options={
                "a": "Profile the slow code path (pyinstrument, an APM) before changing anything",
                "b": "Time the function you suspect once, with time.time() before and after the call",
                "c": "Read the slow-query log and EXPLAIN the worst statements",
                "d": "Track memory over time to catch growth and leaks",
                "e": "Watch the mean response time: the p99 is mostly noise from GC and the network",
                "f": "Load-test with realistic traffic and watch p95/p99, not the mean",
                "g": "Add a cache in front of the endpoint users complain about, and see if it helps",
                "h": "Alert on the metrics you monitor (latency percentiles, errors, saturation)",
            },
            correct={"a", "c", "d", "f", "h"},
            explanations={
                "b": "One cold timing is an anecdote (section 6: warm up, repeat, look at the "
                "spread), and timing the function you suspect is still guessing: a profiler "
                "shows where the time goes without a suspect.",
                "e": "The tail is what users feel: a p99 of seconds behind a mean of milliseconds "
                "is a bottleneck for one request in a hundred, and the mean hides it.",
                "g": "A cache is a fix, not a way to find the bottleneck: measure first, or you "
                "may cache the part that was never slow.",
            },
        ),
        explanation="Finding a bottleneck is measurement at every level: a profiler for code, the "
        "slow-query log and EXPLAIN for the database, memory tracking for leaks, load tests for "
        "behaviour under concurrency, and monitoring with alerts for what changes in production. "
        "Fixes (caches, rewrites) come after the measurement has named the slow part.",
        hints=("Pick every way of *finding* a bottleneck that measures properly, and no fix.",),
    ),
    Question(
        id="01.q2",
        title="The tail of the checkout endpoint",
        checker=_ComputedNumber(_checkout_p99_ms, rel_tol=0.01, unit="ms"),
        answer="p99 of latency_log()'s POST /checkout durations, times 1000, e.g. "
        "percentile(log.loc[log.endpoint == 'POST /checkout', 'duration_s'], 99) * 1000",
        explanation="One checkout in a hundred waits at least this long, several times the mean: "
        "the slow path (a cache miss, a lock) is invisible in an average.",
        hints=("Filter the log on the endpoint, take the 99th percentile of duration_s, convert "
               "seconds to milliseconds.",),
    ),
    Question(
        id="01.q3",
        title="Little's law",
        checker=Number(20, rel_tol=0.01, unit="requests"),
        explanation="L = X * R = 400 requests/s * 0.050 s = 20 requests in flight on average: the "
        "pool needs at least 20 workers (threads, processes, connections) or requests queue.",
        hints=("Convert 50 ms to seconds before multiplying by the throughput.",),
    ),
    Question(
        id="01.q4",
        title="Why CPU should stay under 80%",
        checker=Choice(
            options={
                "a": "It roughly quadruples: a queue's mean response time is S / (1 - utilisation), "
                "2.5 S at 60% and 10 S at 90%",
                "b": "It grows by about half: response time rises in proportion to utilisation, so "
                "50% more load means 50% more time",
                "c": "It barely changes: below 100% a core still has idle cycles, so requests wait "
                "only once the CPU is saturated",
                "d": "It stays about the same: Little's law gives R = L / X, and L and X both grow "
                "by half with the traffic",
            },
            correct="a",
            explanations={
                "b": "Service time S stays the same; the queue in front of it is what grows, and "
                "it grows non-linearly: S / (1 - utilisation) is 2.5 S at 60% and 10 S at 90%.",
                "c": "The queueing curve bends long before 100%: random arrivals find the server "
                "busy more and more often. Compare the simulated p95 at 0.6 and at 0.9.",
                "d": "L does not grow in proportion: as the queue fills, more requests wait at "
                "once, so L grows much faster than X, and R = L / X grows with it.",
            },
        ),
        explanation="S / (1 - 0.6) = 2.5 S and S / (1 - 0.9) = 10 S: four times the mean response "
        "time, and the tail grows faster still. Headroom below about 80% absorbs bursts.",
    ),
    # --- lab --------------------------------------------------------------------------------
    Question(
        id="01.q5",
        title="Lab: histogram_percentile(buckets, q)",
        checker=_DiagnosedFunction(
            reference=histogram_percentile,
            cases=_histogram_cases,
            example='check("01.q5", histogram_percentile)',
            slips=_PERCENTILE_SLIPS,
            error_hints={
                "ZeroDivisionError": "A bucket with count 0 holds no requests: skip it, the rank "
                "never falls in an empty bucket (and check the total before dividing).",
                "IndexError": "An index past the end: the last bucket that holds requests always "
                "reaches the rank, even for q = 100, so the walk never needs to go further.",
            },
            special=_percentile_edge,
            none_hint="a histogram with no requests (no buckets, or every count 0) has no "
            "percentile: return None.",
            mutation_hint="Your function changed the list of buckets it was given (sorted it in "
            "place?): sort a copy, sorted(buckets).",
        ),
        explanation="Walk the buckets in order of their bounds, adding up counts, until the "
        "running total reaches rank = total * q / 100; the requests inside that bucket are "
        "assumed spread evenly between its lower and upper bound. This is how Prometheus' "
        "histogram_quantile estimates p99 from a few counters instead of every sample: the "
        "estimate is only as precise as the buckets are narrow.",
        hints=("Sort the buckets by bound; the lower bound of a bucket is the upper bound of the "
               "one before (0 for the first).",),
    ),
    Question(
        id="01.q6",
        title="Lab: mean_in_flight(log, start_s, end_s)",
        checker=_DiagnosedFunction(
            reference=mean_in_flight,
            cases=_request_log_cases,
            example='check("01.q6", mean_in_flight)',
            slips=_IN_FLIGHT_SLIPS,
            error_hints={
                "ZeroDivisionError": "An empty log, or a window no request overlaps, had nothing "
                "in flight: return 0.0, and divide by the window's length, not by a count.",
                "ValueError": "min() or max() of an empty log: an empty log had nothing in "
                "flight, return 0.0.",
            },
            special=_in_flight_edge,
        ),
        explanation="L over a window is the request-seconds spent inside it divided by its "
        "length: each request counts for the part of it that overlaps the window. Over a long "
        "window this is X * R, Little's law; over a scrape interval it is what a monitoring "
        "system reports as the concurrency of that interval.",
        hints=("For each request, the overlap is min(end, end_s) - max(start, start_s), and only "
               "a positive overlap counts.",),
    ),
    Question(
        id="01.q7",
        title="Lab: the bottleneck of customer_report",
        checker=_FunctionName(
            "lookup_category",
            module="perfcourse.chapters.performance_fundamentals",
            explanations={
                "_find_product": "That was the lesson's bottleneck, under category_revenue_slow: "
                "profile customer_report and read its tree.",
                "customer_report": "The entry point holds all of its own time: name the function "
                "under customer_report that holds most of it.",
                "user_items": "user_items runs one query for all the users: look for the function "
                "that runs once per order item.",
                "favourite_category": "favourite_category is pure Python on a few numbers per "
                "user: look for the function whose time is spent waiting on the database.",
                "as_money": "as_money converts one price, in microseconds: look for the function "
                "whose time is spent waiting on the database.",
            },
        ),
        explanation="lookup_category runs one query per order item: almost all of the report's "
        "time is spent in it, below it in SQLAlchemy and the driver, waiting for round trips.",
        hints=("Give the name of a function of perfcourse.chapters.performance_fundamentals, as a string: the one "
               "under customer_report that holds most of the time in the profile.",),
    ),
    Question(
        id="01.q8",
        title="Lab: fix customer_report",
        checker=_FasterReport(max_queries=2),
        answer="def customer_report_fast(engine, user_ids):\n"
        "    with engine.connect() as conn:\n"
        "        rows = user_items(conn, user_ids)              # query 1: the users' items\n"
        "        category_of = dict(conn.execute(CATEGORIES))    # query 2: product id -> category\n"
        "    ...the same loop, with category_of[product_id] instead of lookup_category(...)",
        explanation="Load every product's category once (one query, a dict) instead of one query "
        "per item: the report then costs 2 queries whatever the number of users, and gives the "
        "same rows. Measured by the query count, which does not depend on the machine.",
        hints=("Keep user_items (one query); replace the per-item lookup_category calls by a "
               "single query that maps product id to category name.",),
        time_limit=15.0,
    ),
]
