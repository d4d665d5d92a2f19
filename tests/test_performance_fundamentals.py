"""Chapter 01's package code: percentiles, Little's law, the queue simulator, the slow functions."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from perfcourse.chapters import performance_fundamentals as f
from perfcourse.load import run_load
from perfcourse.profiler import hottest_function
from perfcourse.stats import percentile, summarize_latencies


@pytest.fixture(scope="module")
def shop():
    """The tiny SQLite dataset (seeded once per session, shared with other tests)."""
    from perfcourse.db import engine
    from perfcourse.seed import seed_dataset

    eng = engine("sqlite", scale="tiny")
    seed_dataset(eng, "tiny")
    yield eng
    eng.dispose()


# --- percentiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy(q):
    rng = random.Random(q)
    for n in (1, 2, 3, 10, 101):
        samples = [rng.expovariate(10) for _ in range(n)]
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_percentile_does_not_need_sorted_input_and_rejects_bad_arguments():
    assert percentile([3, 1, 2], 50) == 2
    with pytest.raises(ValueError, match="at least one"):
        percentile([], 50)
    with pytest.raises(ValueError, match="between 0 and 100"):
        percentile([1], 101)


def test_summary_has_the_tail_above_the_mean():
    log = f.latency_log(5000)
    summary = summarize_latencies(log["duration_s"])
    assert summary["requests"] == 5000
    assert summary["p50_s"] < summary["mean_s"] < summary["p99_s"] <= summary["max_s"]


# --- the latency log and Little's law -----------------------------------------------------


def test_latency_log_is_deterministic_and_consistent():
    a, b = f.latency_log(1000, seed=3), f.latency_log(1000, seed=3)
    assert a.equals(b)
    assert not a.equals(f.latency_log(1000, seed=4))
    assert (a["end_s"] - a["start_s"] - a["duration_s"]).abs().max() < 1e-12
    assert a["start_s"].is_monotonic_increasing
    assert set(a["endpoint"]) == {e.name for e in f.ENDPOINTS}


def test_littles_law_on_a_hand_made_log():
    # Two requests of 1 s and 3 s inside a 4 s window: X = 0.5/s, R = 2 s, L = 1.
    law = f.littles_law([(0.0, 1.0), (1.0, 4.0)])
    assert law["requests"] == 2
    assert law["window_s"] == pytest.approx(4.0)
    assert law["throughput_per_s"] == pytest.approx(0.5)
    assert law["mean_latency_s"] == pytest.approx(2.0)
    assert law["L"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        f.littles_law([])


def test_sampled_in_flight_count_agrees_with_littles_law():
    log = f.latency_log(20_000)
    times = np.linspace(log["start_s"].min(), log["end_s"].max(), 50_000, endpoint=False)
    sampled = f.in_flight_at(log, times).mean()
    assert sampled == pytest.approx(f.littles_law(log)["L"], rel=0.02)
    assert f.littles_law(log)["L"] == pytest.approx(f.littles_law(list(zip(log.start_s, log.end_s)))["L"])


def test_in_flight_at_counts_half_open_intervals():
    log = [(0.0, 2.0), (1.0, 3.0)]
    assert f.in_flight_at(log, [0.0, 0.5, 1.0, 2.0, 3.0]).tolist() == [1, 1, 2, 1, 0]


def test_run_load_records_every_request_and_samples_in_flight():
    def work(i):
        time.sleep(0.002)  # releases the GIL, like a database call

    run = run_load(work, workers=4, requests=80)
    assert len(run.log) == 80
    assert sorted(run.log["request"]) == list(range(80))
    assert (run.log["duration_s"] > 0).all()
    assert max(run.in_flight_samples) <= 4
    assert run.predicted_L == pytest.approx(4, rel=0.25)
    assert run.sampled_L == pytest.approx(run.predicted_L, rel=0.25)
    row = run.as_row()
    assert row["workers"] == 4 and row["requests"] == 80
    assert row["per_request_s"] == pytest.approx(1 / run.throughput_per_s)


def test_run_load_propagates_nothing_and_keeps_counting_after_errors():
    calls = []
    lock = threading.Lock()

    def work(i):
        with lock:
            calls.append(i)

    run = run_load(work, workers=3, requests=10)
    assert sorted(calls) == list(range(10))
    assert len(run.log) == 10
    with pytest.raises(ValueError):
        run_load(work, workers=0, requests=1)


# --- queues --------------------------------------------------------------------------------


def test_simulated_queue_follows_the_mm1_curve():
    for rho in (0.3, 0.6, 0.8):
        times = f.simulate_queue(rho, requests=50_000, seed=2)
        assert times.mean() == pytest.approx(f.mm1_mean_response(rho), rel=0.1)


def test_one_server_queue_matches_the_event_by_event_loop():
    # The numpy path for one server must give what a plain first-come-first-served loop gives.
    for rho in (0.2, 0.9, 0.99):
        times = f.simulate_queue(rho, requests=3000, seed=5)
        rng = np.random.default_rng(5)
        arrivals = np.cumsum(rng.exponential(0.010 / rho, 3000))
        services = rng.exponential(0.010, 3000)
        free, expected = 0.0, []
        for arrival, service in zip(arrivals, services):
            free = max(arrival, free) + service
            expected.append(free - arrival)
        assert np.allclose(times, expected, rtol=1e-9, atol=1e-12)


def test_near_saturation_short_runs_spread_and_long_runs_converge():
    # Why the lesson's 95% row can sit far from the curve: near saturation one run of 20,000
    # requests is one draw from a wide spread; at 50% the same length is already precise.
    def means(rho, requests, seeds):
        return np.array([f.simulate_queue(rho, requests=requests, seed=s).mean() for s in seeds])

    busy, calm = means(0.95, 20_000, range(1, 6)), means(0.5, 20_000, range(1, 6))
    assert np.ptp(busy) / f.mm1_mean_response(0.95) > 0.2
    assert np.ptp(calm) / f.mm1_mean_response(0.5) < 0.1
    assert means(0.95, 2_000_000, range(1, 3)).mean() == pytest.approx(f.mm1_mean_response(0.95), rel=0.05)


def test_simulated_queue_is_deterministic_and_more_servers_wait_less():
    a = f.simulate_queue(0.8, requests=2000)
    assert np.array_equal(a, f.simulate_queue(0.8, requests=2000))
    four = f.simulate_queue(0.8, requests=20_000, servers=4)
    assert four.mean() < f.simulate_queue(0.8, requests=20_000).mean()
    with pytest.raises(ValueError, match="utilisation"):
        f.simulate_queue(1.0)


# --- profiling examples ------------------------------------------------------------------


def test_category_revenue_slow_adds_up_the_items_per_category(shop):
    import sqlalchemy as sa

    slow = f.category_revenue_slow(shop, items=300)
    assert slow and all(v > 0 for v in slow.values())
    with shop.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT p.category_id, oi.quantity, oi.unit_price FROM order_items oi "
            "JOIN orders o ON o.id = oi.order_id JOIN products p ON p.id = oi.product_id "
            "WHERE o.status = 'delivered' ORDER BY oi.id LIMIT 300")).all()
    expected = {}
    for category_id, quantity, price in rows:
        expected[category_id] = expected.get(category_id, 0) + quantity * f.as_money(price)
    assert slow == dict(sorted(expected.items()))


def test_customer_report_issues_one_query_per_item(shop):
    from perfcourse.statements import count_queries

    with count_queries(shop) as q:
        report = f.customer_report(shop, [1, 2, 3, 5, 8])
    with shop.connect() as conn:
        items = len(f.user_items(conn, [1, 2, 3, 5, 8]))
    assert q.count == 1 + items
    assert [r["user_id"] for r in report] == sorted(r["user_id"] for r in report)
    for row in report:
        assert set(row) == {"user_id", "spent", "favourite"}
    assert f.customer_report(shop, []) == []


def test_hottest_function_finds_the_bottleneck(shop):
    pyinstrument = pytest.importorskip("pyinstrument")

    profiler = pyinstrument.Profiler(interval=0.0005)
    with profiler:
        f.customer_report(shop, list(range(1, 60)))
    session = profiler.last_session
    assert hottest_function(session, f.__name__, exclude=["customer_report"]) == "lookup_category"
    assert hottest_function(session, f.__name__) == "customer_report"  # the entry point holds everything
    with pytest.raises(ValueError, match="No function"):
        hottest_function(session, "json")
