"""Graders of chapter 01 (performance fundamentals): right answers written other ways pass, the
mistakes learners make fail with a hint that names them, and no package function passes a
practical."""

from __future__ import annotations

import bisect
import inspect
import itertools
import math
import random
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from perfcourse import stats
from perfcourse.chapters import performance_fundamentals as fun
from perfcourse.grading.bank import question

from .kit import fails, passes

ROOT = Path(__file__).resolve().parents[2]
LESSON = ROOT / "solutions" / "01-performance-fundamentals.ipynb"

# --- choice questions ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["A", " a "], ids=["upper", "spaced"])
def test_q4_right_key_passes_in_any_form(form):
    passes("01.q4", form)


Q4_WRONG = [
    ("b", ("non-linearly", "10 S at 90%")),
    ("c", ("bends long before 100%",)),
    ("d", ("L does not grow in proportion",)),
]


@pytest.mark.parametrize("key, hint", Q4_WRONG, ids=[k for k, _ in Q4_WRONG])
def test_q4_wrong_key_fails_with_its_explanation(key, hint):
    fails("01.q4", key, *hint)


Q1_RIGHT = {"a", "c", "d", "f", "h"}


@pytest.mark.parametrize("form", [
    Q1_RIGHT,
    sorted(k.upper() for k in Q1_RIGHT),
    " a, c, d, f, h ",
    "ACDFH",
], ids=["set", "upper-list", "spaced-string", "letters"])
def test_q1_right_set_passes_in_any_form(form):
    passes("01.q1", form)


def test_q1_right_options_are_not_the_leading_block():
    checker = question("01.q1").checker
    letters = sorted(checker.options)
    assert set(checker.correct) != set(letters[:len(checker.correct)])
    assert len(set(letters) - set(checker.correct)) >= 2


Q1_WRONG = [
    ("b", ("anecdote", "profiler")),
    ("e", ("tail is what users feel",)),
    ("g", ("a fix, not a way to find",)),
]


@pytest.mark.parametrize("key, hint", Q1_WRONG, ids=[k for k, _ in Q1_WRONG])
def test_q1_each_wrong_option_fails_with_its_explanation(key, hint):
    fails("01.q1", Q1_RIGHT | {key}, *hint)


def test_q1_a_partial_set_is_told_how_many_are_missing():
    fails("01.q1", {"a", "c", "d"}, "2 more options")


# --- numbers -----------------------------------------------------------------------------


def test_q3_littles_law_number():
    passes("01.q3", 400 * 0.050)
    fails("01.q3", 400 * 50, "too high")
    fails("01.q3", 400 / 0.050, "too high")


def test_q7_bottleneck_name():
    for form in ("lookup_category", " fun.lookup_category ",
                 "perfcourse.chapters.performance_fundamentals.lookup_category()"):
        passes("01.q7", form)
    fails("01.q7", "_find_product", "lesson's bottleneck")
    fails("01.q7", "customer_report", "entry point")
    fails("01.q7", "user_items", "one query for all the users")
    fails("01.q7", fun.lookup_category, "as a string")


# --- 01.q5 histogram_percentile -----------------------------------------------------------


def percentile_by_bisect(buckets, q):
    ordered = sorted(buckets, key=lambda bucket: bucket[0])
    bounds = [0.0] + [upper for upper, _ in ordered]
    cumulative = list(itertools.accumulate(count for _, count in ordered))
    if not cumulative or cumulative[-1] == 0:
        return None
    rank = cumulative[-1] * q / 100
    i = bisect.bisect_left(cumulative, rank)
    while ordered[i][1] == 0:  # only for q = 0 with empty first buckets
        i += 1
    before = cumulative[i] - ordered[i][1]
    return bounds[i] + (bounds[i + 1] - bounds[i]) * (rank - before) / ordered[i][1]


def percentile_with_numpy(buckets, q):
    if not buckets:
        return None
    table = np.array(sorted(buckets), dtype=float)
    upper, counts = table[:, 0], table[:, 1]
    total = counts.sum()
    if total == 0:
        return None
    rank = total * q / 100
    cumulative = np.cumsum(counts)
    i = int(np.argmax((cumulative >= rank) & (counts > 0)))
    lower = upper[i - 1] if i else 0.0
    return float(lower + (upper[i] - lower) * (rank - (cumulative[i] - counts[i])) / counts[i])


@pytest.mark.parametrize("answer", [percentile_by_bisect, percentile_with_numpy], ids=lambda f: f.__name__)
def test_q5_other_right_answers_pass(answer):
    passes("01.q5", answer)


def _walk(ordered, q, *, rank_of=lambda total, q: total * q / 100, wrap=False, pick=None):
    total = sum(count for _, count in ordered)
    if total == 0:
        return None
    rank = rank_of(total, q)
    below = 0
    for i, (upper, count) in enumerate(ordered):
        if count and below + count >= rank:
            lower = ordered[i - 1][0] if (i or wrap) else 0.0
            if pick:
                return upper if pick == "upper" else lower
            return lower + (upper - lower) * (rank - below) / count
        below += count
    return ordered[-1][0]


def sorts_in_place(buckets, q):
    buckets.sort()
    return _walk(buckets, q)


def never_sorts(buckets, q):
    return _walk(list(buckets), q)


def upper_bound_only(buckets, q):
    return _walk(sorted(buckets), q, pick="upper")


def first_bucket_wraps_to_last(buckets, q):
    return _walk(sorted(buckets), q, wrap=True)


def rank_off_by_one(buckets, q):
    return _walk(sorted(buckets), q, rank_of=lambda total, q: (total - 1) * q / 100)


def counts_read_as_cumulative(buckets, q):
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] == 0:
        return None
    rank = ordered[-1][1] * q / 100
    lower, before = 0.0, 0
    for upper, cumulative in ordered:
        if cumulative >= rank and cumulative > before:
            return lower + (upper - lower) * (rank - before) / (cumulative - before)
        lower, before = upper, cumulative
    return lower


def empty_buckets_not_skipped(buckets, q):
    ordered = sorted(buckets)
    total = sum(count for _, count in ordered)
    if total == 0:
        return None
    rank, below, lower = total * q / 100, 0, 0.0
    for upper, count in ordered:
        if below + count >= rank:
            return lower + (upper - lower) * (rank - below) / count
        below, lower = below + count, upper


def walks_past_the_end(buckets, q):
    ordered = sorted(buckets)
    total = sum(count for _, count in ordered)
    if total == 0:
        return None
    rank, i, below = total * q / 100, 0, 0
    while below + ordered[i][1] <= rank or ordered[i][1] == 0:  # <= instead of <
        below += ordered[i][1]
        i += 1
    lower = ordered[i - 1][0] if i else 0.0
    return lower + (ordered[i][0] - lower) * (rank - below) / ordered[i][1]


def zero_for_no_requests(buckets, q):
    return _walk(sorted(buckets), q) if sum(c for _, c in buckets) else 0.0


def visible_example_copied(buckets, q):
    return 0.08125  # the notebook's example


WRONG_PERCENTILES = [
    (sorts_in_place, ("changed the list", "sorted(buckets)")),
    (never_sorts, ("any order", "sort them by upper bound")),
    (upper_bound_only, ("upper bound of the right bucket", "interpolate")),
    (first_bucket_wraps_to_last, ("first bucket starts at 0", "last")),
    (rank_off_by_one, ("off by one", "total * q / 100")),
    (counts_read_as_cumulative, ("not a running (cumulative) total",)),
    (empty_buckets_not_skipped, ("ZeroDivisionError", "count 0")),
    (walks_past_the_end, ("IndexError", "index past the end")),
    (zero_for_no_requests, ("no requests", "return None")),
    (visible_example_copied, ("no requests", "return None")),
    (stats.percentile, ("raised",)),
]


@pytest.mark.parametrize("answer, hint", WRONG_PERCENTILES, ids=[f.__name__ for f, _ in WRONG_PERCENTILES])
def test_q5_wrong_answers_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("01.q5", answer, *hint)


# --- 01.q6 mean_in_flight ---------------------------------------------------------------


def in_flight_fsum(log, start_s, end_s):
    return math.fsum(max(0.0, min(e, end_s) - max(s, start_s)) for s, e in log) / (end_s - start_s)


def in_flight_numpy_clip(log, start_s, end_s):
    pairs = np.array(log, dtype=float).reshape(-1, 2)
    clipped = np.clip(pairs, start_s, end_s)
    return float((clipped[:, 1] - clipped[:, 0]).sum() / (end_s - start_s))


def in_flight_as_x_times_r(log, start_s, end_s):
    inside = [min(e, end_s) - max(s, start_s) for s, e in log if e > start_s and s < end_s]
    if not inside:
        return 0.0
    throughput = len(inside) / (end_s - start_s)
    return throughput * (sum(inside) / len(inside))


@pytest.mark.parametrize("answer", [in_flight_fsum, in_flight_numpy_clip, in_flight_as_x_times_r],
                         ids=lambda f: f.__name__)
def test_q6_other_right_answers_pass(answer):
    passes("01.q6", answer)


def whole_durations(log, start_s, end_s):
    return sum(e - s for s, e in log if e > start_s and s < end_s) / (end_s - start_s)


def every_request(log, start_s, end_s):
    return sum(e - s for s, e in log) / (end_s - start_s)


def clips_the_end_only(log, start_s, end_s):
    return sum(min(e, end_s) - s for s, e in log if e > start_s and s < end_s) / (end_s - start_s)


def negative_overlaps_added(log, start_s, end_s):
    return sum(min(e, end_s) - max(s, start_s) for s, e in log) / (end_s - start_s)


def only_requests_starting_inside(log, start_s, end_s):
    return sum(e - s for s, e in log if start_s <= s < end_s) / (end_s - start_s)


def the_lessons_whole_log_L(log, start_s, end_s):
    if not log:
        return 0.0
    return fun.littles_law(log)["L"]


def mean_over_requests(log, start_s, end_s):
    clipped = [max(0.0, min(e, end_s) - max(s, start_s)) for s, e in log]
    return sum(clipped) / len(clipped) * len(clipped) / (end_s - start_s) if len(log) else 1 / 0


def visible_example_in_flight(log, start_s, end_s):
    return 1.15  # the notebook's example


WRONG_IN_FLIGHT = [
    (whole_durations, ("clip each request",)),
    (every_request, ("clip each request",)),
    (clips_the_end_only, ("clip both ends", "only from start_s")),
    (negative_overlaps_added, ("negative overlap", "max(0")),
    (only_requests_starting_inside, ("start inside the window",)),
    (the_lessons_whole_log_L, ("whole log",)),
    (mean_over_requests, ("ZeroDivisionError", "return 0.0")),
    (visible_example_in_flight, ("nothing was in flight",)),
]


@pytest.mark.parametrize("answer, hint", WRONG_IN_FLIGHT, ids=[f.__name__ for f, _ in WRONG_IN_FLIGHT])
def test_q6_wrong_answers_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("01.q6", answer, *hint)


# --- 01.q8 customer_report_fast -----------------------------------------------------------

CATEGORY_OF_PRODUCT = "SELECT p.id, c.name FROM products p JOIN categories c ON c.id = p.category_id"


def _report(per_user):
    return [{"user_id": u, "spent": sum(s.values(), Decimal(0)), "favourite": fun.favourite_category(s)}
            for u, s in sorted(per_user.items())]


def report_in_one_query(engine, user_ids):
    ids = ", ".join(str(int(u)) for u in user_ids) or "NULL"
    sql = ("SELECT o.user_id, c.name, oi.quantity, oi.unit_price FROM orders o "
           "JOIN order_items oi ON oi.order_id = o.id JOIN products p ON p.id = oi.product_id "
           f"JOIN categories c ON c.id = p.category_id WHERE o.user_id IN ({ids}) "
           "AND o.status <> 'cancelled'")
    per_user = {}
    with engine.connect() as conn:
        for user_id, category, quantity, price in conn.execute(sa.text(sql)):
            spent = per_user.setdefault(user_id, {})
            spent[category] = spent.get(category, Decimal(0)) + quantity * Decimal(str(price))
    return _report(per_user)


def report_with_only_needed_products(engine, user_ids):
    with engine.connect() as conn:
        rows = fun.user_items(conn, user_ids)
        products = sorted({product for _, product, _, _ in rows})
        category_of = {}
        if products:
            category_of = dict(conn.execute(sa.text(
                CATEGORY_OF_PRODUCT + " WHERE p.id IN ({})".format(", ".join(map(str, products))))).all())
    per_user = {}
    for user_id, product_id, quantity, price in rows:
        spent = per_user.setdefault(user_id, {})
        name = category_of[product_id]
        spent[name] = spent.get(name, Decimal(0)) + quantity * fun.as_money(price)
    return _report(per_user)


@pytest.mark.parametrize("answer", [report_in_one_query, report_with_only_needed_products],
                         ids=lambda f: f.__name__)
def test_q8_other_right_answers_pass(answer):
    passes("01.q8", answer)


def n_plus_one_on_a_second_engine(engine, user_ids):
    other = sa.create_engine(engine.url)
    try:
        return fun.customer_report(other, user_ids)
    finally:
        other.dispose()


def n_plus_one_on_the_raw_connection(engine, user_ids):
    with engine.connect() as conn:
        rows = fun.user_items(conn, user_ids)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        per_user = {}
        for user_id, product_id, quantity, price in rows:
            cursor.execute(CATEGORY_OF_PRODUCT + " WHERE p.id = ?", (product_id,))
            name = cursor.fetchone()[1]
            spent = per_user.setdefault(user_id, {})
            spent[name] = spent.get(name, Decimal(0)) + quantity * fun.as_money(price)
    finally:
        raw.close()
    return _report(per_user)


def one_query_per_user(engine, user_ids):
    per_user = {}
    with engine.connect() as conn:
        category_of = dict(conn.execute(sa.text(CATEGORY_OF_PRODUCT)).all())
        for user in user_ids:
            for user_id, product_id, quantity, price in fun.user_items(conn, [user]):
                spent = per_user.setdefault(user_id, {})
                name = category_of[product_id]
                spent[name] = spent.get(name, Decimal(0)) + quantity * fun.as_money(price)
    return _report(per_user)


def rows_not_sorted_by_user(engine, user_ids):
    with engine.connect() as conn:
        rows = fun.user_items(conn, user_ids)
        category_of = dict(conn.execute(sa.text(CATEGORY_OF_PRODUCT)).all())
    per_user = {}
    for user_id, product_id, quantity, price in rows:
        spent = per_user.setdefault(user_id, {})
        name = category_of[product_id]
        spent[name] = spent.get(name, Decimal(0)) + quantity * fun.as_money(price)
    return [{"user_id": u, "spent": sum(s.values(), Decimal(0)), "favourite": fun.favourite_category(s)}
            for u, s in per_user.items()]


def tuples_not_dicts(engine, user_ids):
    return [(row["user_id"], row["spent"], row["favourite"]) for row in report_in_one_query(engine, user_ids)]


WRONG_REPORTS = [
    (fun.customer_report, ("queries reached the database", "N+1")),
    (n_plus_one_on_a_second_engine, ("engine of its own",)),
    (n_plus_one_on_the_raw_connection, ("queries reached the database", "N+1")),
    (one_query_per_user, ("at most 2",)),
    (rows_not_sorted_by_user, ("customer_report gives",)),
    (tuples_not_dicts, ("dict with keys user_id, spent, favourite",)),
]


@pytest.mark.parametrize("answer, hint", WRONG_REPORTS, ids=[f.__name__ for f, _ in WRONG_REPORTS])
def test_q8_wrong_answers_fail_with_a_hint_naming_the_mistake(answer, hint):
    fails("01.q8", answer, *hint)


# --- the notebook's visible examples are what the text says ---------------------------------


def test_the_visible_examples_hold_and_differ_from_the_hidden_inputs():
    from perfcourse.grading.questions import ch01

    example = [(0.01, 30), (0.025, 40), (0.05, 20), (0.1, 8), (0.25, 2)]
    assert ch01.histogram_percentile(example, 95) == pytest.approx(0.08125)
    log = [(0.2, 1.4), (0.9, 2.6), (1.5, 1.8), (3.5, 4.5)]
    assert ch01.mean_in_flight(log, 1.0, 3.0) == pytest.approx(1.15)
    seed = question("01.q5").checker.seed
    assert (example, 95) not in list(ch01._histogram_cases(random.Random(seed)))
    seed = question("01.q6").checker.seed
    assert (log, 1.0, 3.0) not in list(ch01._request_log_cases(random.Random(seed)))


# --- no package function answers a practical ----------------------------------------------

PRACTICALS = ["01.q5", "01.q6", "01.q7", "01.q8"]
PUBLIC = [name for name in fun.__all__ if inspect.isfunction(getattr(fun, name))]
PLATFORM = [stats.percentile, stats.percentiles, stats.summarize_latencies]


@pytest.mark.parametrize("qid", PRACTICALS)
@pytest.mark.parametrize("name", PUBLIC)
def test_no_chapter_function_passes_a_practical(qid, name):
    fails(qid, getattr(fun, name))


@pytest.mark.parametrize("qid", PRACTICALS)
@pytest.mark.parametrize("function", PLATFORM, ids=lambda f: f.__name__)
def test_no_platform_statistic_passes_a_practical(qid, function):
    fails(qid, function)


def histogram_percentile(buckets, q):
    raise NotImplementedError("Your code here")


def mean_in_flight(log, start_s, end_s):
    raise NotImplementedError("Your code here")


def customer_report_fast(engine, user_ids):
    """customer_report in at most 2 queries."""
    raise NotImplementedError("Your code here")


@pytest.mark.parametrize("qid, stub", [("01.q5", histogram_percentile), ("01.q6", mean_in_flight),
                                       ("01.q8", customer_report_fast)], ids=["q5", "q6", "q8"])
def test_untouched_stubs_are_not_written_yet(qid, stub):
    fails(qid, stub, "not written yet")
