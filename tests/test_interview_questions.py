"""The harness of chapter 10's lesson: the span recorder, the latency-injecting engine, the Zipf
workload and the throughput table. Nothing here asserts on wall time: counts, shapes, orders."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import text

from perfcourse.chapters import interview_questions as interview


def fake_clock(step=1.0):
    ticks = iter(range(10_000))
    return lambda: next(ticks) * step


def test_tracer_records_nested_spans_with_their_parents():
    tracer = interview.Tracer(clock=fake_clock())
    with tracer.span("GET /orders"):
        with tracer.span("SELECT users"):
            pass
        for _ in range(2):
            with tracer.span("SELECT orders"):
                pass
    root, users, *orders = tracer.spans
    assert root["parent"] is None
    assert users["parent"] == root["id"] and all(o["parent"] == root["id"] for o in orders)
    assert all(s["end"] > s["start"] for s in tracer.spans)
    assert len({s["id"] for s in tracer.spans}) == 4
    table = tracer.table()
    assert list(table.columns) == ["span", "parent", "duration_s"]
    assert table.span.tolist() == ["GET /orders", "SELECT users", "SELECT orders", "SELECT orders"]
    assert table.parent.tolist() == ["", "GET /orders", "GET /orders", "GET /orders"]
    assert table.duration_s[0] > table.duration_s[1:].sum()  # the root includes its children


def test_tracer_closes_a_span_when_its_block_raises():
    tracer = interview.Tracer(clock=fake_clock())
    with pytest.raises(ValueError), tracer.span("failing"):
        raise ValueError("boom")
    with tracer.span("next"):
        pass
    assert tracer.spans[0]["end"] is not None
    assert tracer.spans[1]["parent"] is None  # the failed span is no longer open


def test_tracer_refuses_a_span_without_a_name():
    with pytest.raises(TypeError, match="needs a name"), interview.Tracer().span(""):
        pass


def test_latency_engine_delays_every_statement_and_leaves_the_course_engine_alone(monkeypatch):
    slept = []
    monkeypatch.setattr(interview.time, "sleep", slept.append)
    engine = interview.latency_engine(0.002, scale="tiny")
    try:
        with engine.connect() as conn:
            for _ in range(3):
                conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert slept == [0.002] * 3


@pytest.mark.parametrize("delay", [-1, 2, "1ms", None, True])
def test_latency_engine_refuses_a_delay_that_is_not_seconds(delay):
    with pytest.raises(ValueError, match="delay_s"):
        interview.latency_engine(delay)


def test_zipf_keys_are_skewed_deterministic_and_in_range():
    keys = interview.zipf_keys(20_000, 1_000, seed=3)
    assert keys == interview.zipf_keys(20_000, 1_000, seed=3)
    assert min(keys) >= 1 and max(keys) <= 1_000
    counts = Counter(keys)
    assert counts[1] > counts[10] > counts[500]
    top_ten = sum(counts[k] for k in range(1, 11)) / len(keys)
    assert 0.3 < top_ten < 0.5  # 1/H(1000) * H(10) = 0.39


@pytest.mark.parametrize("args", [(-1, 10), (10, 0), (10.5, 10), ("10", 10)])
def test_zipf_keys_refuses_bad_sizes(args):
    with pytest.raises(ValueError):
        interview.zipf_keys(*args)


def test_throughput_by_workers_runs_every_request_at_each_concurrency():
    seen, lock = [], threading.Lock()

    def work(i):
        with lock:
            seen.append(i)

    table = interview.throughput_by_workers(work, [1, 3], requests=30)
    assert table.workers.tolist() == [1, 3]
    assert table.requests.tolist() == [30, 30]
    assert sorted(seen) == sorted(list(range(30)) * 2)
    assert (table.throughput > 0).all() and (table.p95_s >= table.p50_s).all()
    assert list(table.columns) == ["workers", "requests", "elapsed_s", "throughput", "p50_s", "p95_s"]


def test_throughput_by_workers_refuses_work_that_is_not_a_function():
    with pytest.raises(TypeError, match="function"):
        interview.throughput_by_workers([1, 2], [1], requests=2)
