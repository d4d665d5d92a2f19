"""Chapter 08 helpers: the shop app, load, spans, metrics parsing, log capture, kept error events,
the lab app. Counts, statuses and structure only, never wall time.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import sqlalchemy as sa

from perfcourse import web
from perfcourse.chapters import monitoring_and_profiling as mp


def test_request_mix_is_deterministic_and_mixed():
    paths = mp.request_mix(500, seed=3)
    assert paths == mp.request_mix(500, seed=3)
    kinds = {p.split("/")[1].split("?")[0] for p in paths}
    assert kinds == {"products", "users", "search", "checkout"}
    assert sum(p.startswith("/products/") for p in paths) > 250


def test_shop_app_answers_each_route(tiny):
    app = mp.create_shop_app(tiny)
    client = app.test_client()
    assert client.get("/products/1").status_code == 200
    orders = client.get("/users/1/orders").get_json()
    assert isinstance(orders, list) and all("items" in o for o in orders)
    assert client.get("/search?q=mini").status_code == 200
    app.testing = False  # a failing checkout answers 500, as in production
    assert client.get("/checkout/14").status_code == 500
    enqueued = []
    ok = mp.create_shop_app(tiny, enqueue=lambda order, rid: enqueued.append((order, rid))).test_client()
    assert ok.get("/checkout/1").status_code == 200
    assert enqueued == [(1, "-")]


def test_drive_records_every_request_against_a_real_server(tiny):
    app = mp.create_shop_app(tiny)
    paths = ["/products/1", "/products/2", "/nowhere", "/users/2/orders"] * 3
    with web.BackgroundServer(app) as server:
        log = mp.drive(server.port, paths, concurrency=3)
    assert list(log.columns) == ["path", "status", "start_s", "latency_s"]
    assert sorted(log["path"]) == sorted(paths)
    assert (log.loc[log.path == "/nowhere", "status"] == 404).all()
    assert (log.loc[log.path != "/nowhere", "status"] == 200).all()


def test_sql_spans_are_children_of_the_request_span():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = sa.create_engine("sqlite://")
    sql_tracer = mp.trace_sql(engine, provider)
    try:
        with provider.get_tracer("test").start_as_current_span("GET /x"):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                conn.execute(sa.text("SELECT 2"))
    finally:
        sql_tracer.remove_all_event_listeners()
    spans = mp.spans_table(exporter.get_finished_spans())
    assert len(spans) == 3
    root = spans[spans.parent_id == ""]
    assert list(root.name) == ["GET /x"]
    children = spans[spans.parent_id == root.span_id.iloc[0]]
    assert sorted(children.statement) == ["SELECT 1", "SELECT 2"]
    assert (spans.start_s >= 0).all() and spans.start_s.min() == 0


def test_bucket_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 50), (0.2, 90), (0.5, 100), (math.inf, 100)]
    assert mp.bucket_quantile(0.5, buckets) == pytest.approx(0.1)
    assert mp.bucket_quantile(0.7, buckets) == pytest.approx(0.15)
    assert mp.bucket_quantile(0.95, buckets) == pytest.approx(0.35)
    assert mp.bucket_quantile(0.99, [(0.1, 1), (math.inf, 10)]) == pytest.approx(0.1)  # +Inf bucket
    assert math.isnan(mp.bucket_quantile(0.5, [(0.1, 0), (math.inf, 0)]))
    assert mp.bucket_quantile(0.5, list(reversed(buckets))) == pytest.approx(0.1)  # any order


def test_parse_metrics_reads_histograms_and_counters():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    histogram = Histogram("req_seconds", "h", ["route"], buckets=(0.1, 1.0), registry=registry)
    counter = Counter("req_errors", "c", ["route"], registry=registry)
    histogram.labels("/a").observe(0.05)
    histogram.labels("/a").observe(0.5)
    counter.labels("/a").inc(3)
    df = mp.parse_metrics(generate_latest(registry).decode())
    buckets = df[df.name == "req_seconds_bucket"]
    assert list(zip(buckets["le"], buckets["value"])) == [(0.1, 1.0), (1.0, 2.0), (math.inf, 2.0)]
    assert set(buckets.labels) == {(("route", "/a"),)}
    assert df[df.name == "req_errors_total"]["value"].tolist() == [3.0]


def test_scrape_during_scrapes_while_load_runs(tiny):
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    registry = CollectorRegistry()
    served = Counter("served", "requests", registry=registry)
    app = mp.create_shop_app(tiny)
    app.after_request(lambda response: (served.inc(), response)[1])
    app.add_url_rule("/metrics", "metrics", lambda: generate_latest(registry))
    with web.BackgroundServer(app) as server:
        log, scrapes = mp.scrape_during(server.port, ["/products/1"] * 40, every_s=0.01, concurrency=2)
    assert len(log) == 40 and len(scrapes) >= 1
    last = mp.parse_metrics(scrapes[-1][1])
    assert last[last.name == "served_total"]["value"].iloc[0] >= 40


def test_log_capture_keeps_lines_and_detaches():
    capture = mp.LogCapture.attach(logging.Formatter("%(name)s %(message)s"), "ch08.test")
    logging.getLogger("ch08.test").info("hello %s", 1)
    capture.detach()
    logging.getLogger("ch08.test").info("not kept")
    assert capture.lines == ["ch08.test hello 1"]
    assert logging.getLogger("ch08.test").propagate


def test_kept_events_keep_sentry_events_without_network():
    import sentry_sdk

    mp.KeptEvents.reset()
    client = sentry_sdk.Client(dsn="https://key@sentry.invalid/1", transport=mp.KeptEvents,
                               default_integrations=False)
    with sentry_sdk.new_scope() as scope:
        scope.set_client(client)
        try:
            raise KeyError("missing")
        except KeyError as exc:
            sentry_sdk.capture_exception(exc)
    client.close()
    assert len(mp.KeptEvents.events) == 1
    assert mp.KeptEvents.events[0]["exception"]["values"][0]["type"] == "KeyError"
    json.dumps(mp.KeptEvents.events[0], default=str)
    mp.KeptEvents.reset()


def test_dead_redis_url_refuses_connections():
    import redis

    client = redis.Redis.from_url(mp.dead_redis_url(), socket_connect_timeout=0.5)
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()


@pytest.mark.redis
def test_send_receipt_job_logs_under_the_request_id(redis_client):
    from rq import Queue

    capture = mp.LogCapture.attach(logging.Formatter("%(message)s"), "shop.jobs")
    capture.addFilter(lambda record: setattr(record, "rid", mp.request_id_var.get()) or True)
    capture.setFormatter(logging.Formatter("%(rid)s %(message)s"))
    queue = Queue(redis_client.prefix + "jobs", connection=redis_client)
    try:
        queue.enqueue(mp.send_receipt, 5, meta={"request_id": "req-1"})
        assert mp.run_jobs(queue) == 1
    finally:
        capture.detach()
        queue.delete(delete_jobs=True)
    assert capture.lines == ["req-1 receipt sent for order 5"]


def test_postgres_statement_sources_on_sqlite_is_refused_clearly():
    with pytest.raises(sa.exc.OperationalError):
        mp.postgres_statement_sources(sa.create_engine("sqlite://"))


@pytest.mark.postgres
def test_postgres_statement_sources(postgres_engine):
    table = mp.postgres_statement_sources(postgres_engine)
    assert "log_min_duration_statement" in set(table.source)
    assert set(table["value"][table.source.str.startswith("pg_stat")]) <= {"yes", "no"}


def test_lab_app_hides_its_slow_path_and_serves_every_route(tiny):
    seen = set()
    for seed in range(3):
        lab = mp.LabApp(tiny, seed=seed)
        assert mp.current_lab() is lab
        assert str(seed) not in repr(lab)
        seen.add(lab._grading_key()["route"])
        client = lab.app.test_client()
        for path in lab.paths(8):
            assert client.get(path).status_code == 200
    assert seen == set(mp.LAB_HEAD_SQL) - {"/orders/<id>"}
    assert mp.LabApp(tiny, seed=4).paths(20) == mp.LabApp(tiny, seed=5).paths(20)


def test_scratch_redis_stops_and_starts_on_the_same_port():
    import redis

    with mp.ScratchRedis() as server:
        client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
        assert client.ping()
        server.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
        server.start()
        assert client.ping() and server.running()
        client.close()
    assert not server.running()
