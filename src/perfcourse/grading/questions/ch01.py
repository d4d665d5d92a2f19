"""Chapter 01, performance fundamentals: percentiles, Little's law, utilisation, bottlenecks.

01.q1-01.q4 are in the lesson (solutions/01-performance-fundamentals.ipynb), 01.q5-01.q8 in
the lab (solutions/01-performance-fundamentals-lab.ipynb).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from perfcourse.chapters.performance_fundamentals import (
    as_money,
    customer_report,
    favourite_category,
    latency_log,
    user_items,
)
from perfcourse.notebook import dataset
from perfcourse.statements import count_queries
from perfcourse.stats import percentile

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    FunctionCheck,
    Incorrect,
    MultiChoice,
    Number,
    Value,
    call_learner,
    short_repr,
)

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


# --- lab references and hidden inputs ------------------------------------------------------


def _percentile_cases(rng):
    yield ([0.25], 50)  # one sample
    yield ([0.3, 0.1, 0.2], 50)  # unsorted
    yield ([0.1, 0.2, 0.3, 0.4], 50)  # between two ranks
    yield ([0.004, 0.001, 0.003, 0.002], 0)
    yield ([0.004, 0.001, 0.003, 0.002], 100)
    yield ([0.01] * 5 + [0.5], 90)  # ties
    for _ in range(12):
        n = rng.randint(2, 400)
        samples = [rng.lognormvariate(-4, 1) for _ in range(n)]
        yield (samples, rng.choice([50, 90, 95, 99, 99.9, rng.uniform(0, 100)]))


def _littles_law_L(log):
    first = min(start for start, _ in log)
    last = max(end for _, end in log)
    return sum(end - start for start, end in log) / (last - first)


def _request_log_cases(rng):
    yield ([(0.0, 1.0)],)
    yield ([(0.0, 1.0), (1.0, 4.0)],)
    yield ([(0.0, 2.0), (0.5, 1.0), (0.6, 0.7)],)  # the first request ends last
    for _ in range(10):
        t, log = rng.uniform(0, 1000), []
        for _ in range(rng.randint(2, 300)):
            t += rng.expovariate(rng.choice([5, 50, 500]))
            log.append((t, t + rng.lognormvariate(-3, 1)))
        rng.shuffle(log)  # a log need not be sorted
        yield (log,)


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


@dataclass
class _FasterReport(Checker):
    """The learner's ``customer_report_fast(engine, user_ids)``: same rows as
    :func:`perfcourse.chapters.performance_fundamentals.customer_report` on hidden users, in at most ``max_queries``."""

    max_queries: int = 2
    seed: int = 20240601

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"01.q8\", customer_report_fast).")
        engine = dataset("sqlite", quiet=True)
        with engine.connect() as conn:
            users = conn.exec_driver_sql("SELECT count(*) FROM users").scalar_one()
        rng = random.Random(self.seed)
        inputs = [[], [1], sorted(rng.sample(range(1, users + 1), 60)),
                  sorted(rng.sample(range(1, users + 1), 25)) + [users + 1000]]  # one unknown id
        for user_ids in inputs:
            expected = customer_report(engine, list(user_ids))
            with count_queries(engine) as counted:
                got = call_learner(answer, engine, list(user_ids))
            problem = _same_report(got, expected)
            if problem:
                raise Incorrect(problem)
            if counted.count > self.max_queries:
                raise Incorrect(
                    f"Right report, but {counted.count} queries for {len(user_ids)} users: at most "
                    f"{self.max_queries} are needed, whatever the number of users and items."
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
                "b": "Read the slow-query log and EXPLAIN the worst statements",
                "c": "Track memory over time to catch growth and leaks",
                "d": "Load-test with realistic traffic and watch p95/p99, not the mean",
                "e": "Alert on the metrics you monitor (latency percentiles, errors, saturation)",
                "f": "Add a cache in front of the endpoint users complain about",
                "g": "Rewrite the function you suspect most in a faster language",
                "h": "Compare average response times only: the tail is noise",
            },
            correct={"a", "b", "c", "d", "e"},
            explanations={
                "f": "A cache is a fix, not a way to find the bottleneck: measure first, or you "
                "may cache the part that was never slow.",
                "g": "Suspicion is what profiling replaces: the worked example of this chapter was "
                "slow where nobody would have guessed.",
                "h": "The tail is what users feel: a p99 of seconds behind a mean of milliseconds "
                "is a bottleneck for one request in a hundred.",
            },
        ),
        explanation="Finding a bottleneck is measurement at every level: a profiler for code, the "
        "slow-query log and EXPLAIN for the database, memory tracking for leaks, load tests for "
        "behaviour under concurrency, and monitoring with alerts for what changes in production. "
        "Fixes (caches, rewrites) come after the measurement has named the slow part.",
        hints=("Pick every way of *finding* a bottleneck, and no fix.",),
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
                "a": "Latency grows by about the same 50% as the traffic",
                "b": "Latency barely changes until the CPU reaches 100%",
                "c": "Waiting time grows much faster than the load: the mean response time of "
                "a single queue is S / (1 - utilisation), so going from 60% to 90% multiplies "
                "it by 4",
                "d": "Latency falls, because a busy CPU stays in its fastest clock state",
            },
            correct="c",
            explanations={
                "a": "Service time stays the same; the queue in front of it is what grows, and it "
                "grows non-linearly with utilisation.",
                "b": "The queueing curve bends long before 100%: rerun the simulation at 0.9 and "
                "compare the p95 with the one at 0.6.",
                "d": "The work per request is unchanged; the extra time is spent waiting in line.",
            },
        ),
        explanation="S / (1 - 0.6) = 2.5 S and S / (1 - 0.9) = 10 S: four times the mean response "
        "time, and the tail grows faster still. Headroom below about 80% absorbs bursts.",
    ),
    # --- lab --------------------------------------------------------------------------------
    Question(
        id="01.q5",
        title="Lab: percentile(samples, q)",
        checker=FunctionCheck(reference=percentile, cases=_percentile_cases),
        answer="def percentile(samples, q):\n"
        "    ordered = sorted(samples)\n"
        "    position = (len(ordered) - 1) * q / 100\n"
        "    low = int(position)\n"
        "    high = min(low + 1, len(ordered) - 1)\n"
        "    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)",
        explanation="Sort, find the fractional rank (n - 1) * q / 100 and interpolate between its "
        "two neighbours: numpy.percentile's default, so your numbers match every dashboard "
        "built on numpy or pandas.",
        hints=("Sort first; the rank of the q-th percentile is (n - 1) * q / 100.",
               "When the rank falls between two samples, interpolate linearly between them."),
    ),
    Question(
        id="01.q6",
        title="Lab: littles_law_L(log)",
        checker=FunctionCheck(reference=_littles_law_L, cases=_request_log_cases),
        answer="def littles_law_L(log):\n"
        "    first = min(start for start, _ in log)\n"
        "    last = max(end for _, end in log)\n"
        "    throughput = len(log) / (last - first)\n"
        "    mean_latency = sum(end - start for start, end in log) / len(log)\n"
        "    return throughput * mean_latency",
        explanation="X is requests over the window (first start to last end), R the mean "
        "duration; X * R simplifies to the total time in flight divided by the window.",
        hints=("The window runs from the earliest start to the latest end; the log is not "
               "necessarily sorted, and the last request to start is not always the last to end.",),
    ),
    Question(
        id="01.q7",
        title="Lab: the bottleneck of customer_report",
        checker=Value("lookup_category", also=("perfcourse.chapters.performance_fundamentals.lookup_category",
                                               "lookup_category()")),
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
        time_limit=30.0,
    ),
]
