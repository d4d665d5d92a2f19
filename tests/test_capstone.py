"""The slow shop of chapter 10's capstone lab: its planted parts, measures and model.

Runs on in-memory copies of the tiny dataset and the course's Redis (a private namespace each
shop removes). Nothing here asserts on time: counts, plans and the deterministic model only.
"""

from __future__ import annotations

from datetime import date

import pytest

from perfcourse import db, services
from perfcourse.chapters.interview_questions import capstone
from perfcourse.scratch import memory_copy


@pytest.fixture
def shop():
    shop = capstone.SlowShop(engine=memory_copy("tiny"), name="ch10test")
    yield shop
    shop.close()


def test_module_exports_what_it_documents():
    for name in capstone.__all__:
        assert hasattr(capstone, name), name
    assert set(capstone.PARTS) == {f.name for f in capstone.Fixes.__dataclass_fields__.values()}


def test_modelled_latency_is_a_function_of_counts():
    assert capstone.modelled_ms(4, 0, 0, False) == 4 * capstone.ROUND_TRIP_MS
    assert capstone.modelled_ms(1, 1000, 1, True) == (
        capstone.ROUND_TRIP_MS + 1000 * capstone.ROW_SCAN_MS + capstone.MAIL_MS + capstone.POOL_WAIT_MS)


def test_fixes_default_to_the_planted_parts():
    fixes = capstone.Fixes(indexes=...)
    assert fixes.part("order_history") is capstone.planted_order_history
    assert fixes.part("indexes") == ()
    assert fixes.part("search_cache") is capstone.UnboundedCache


def test_a_stub_falls_back_to_the_planted_part():
    def order_history(session, user_id):
        raise NotImplementedError

    shop = capstone.SlowShop(fixes=capstone.Fixes(order_history=order_history),
                             engine=memory_copy("tiny"), name="ch10test")
    try:
        record = shop.request("order_history", 5)
        assert "order_history" in shop.unfixed
        assert len(record.statements) > 4  # the planted N+1
    finally:
        shop.close()


def test_requests_are_measured_per_request(shop):
    history = shop.request("order_history", 5)
    assert len(history.statements) > 4
    mail = shop.request("checkout", 3)
    assert mail.inline_mails == 1
    assert shop.cache.llen(shop.outbox_key) == 1


def test_plans_charge_full_scans_by_table_rows(shop):
    record = shop.request("day_report", date(2024, 5, 1))
    sql, params = record.statements[0]
    assert capstone.plan_rows_scanned(shop.engine, sql, params, shop.table_rows) == shop.table_rows["orders"]
    record = shop.request("product", 3)
    assert all(capstone.plan_rows_scanned(shop.engine, s, p, shop.table_rows) == 0
               for s, p in record.statements)


def test_planted_cache_serves_stale_pages_after_an_update(shop):
    shop.product_page(7)
    shop.update_price(7, 999)
    assert shop.stale_pages([7]) == 1


def test_pool_trial_counts_timeouts(tmp_path):
    url = f"sqlite:///{tmp_path / 'pool.sqlite'}"
    assert capstone.pool_trial(url, {"pool_size": 2, "max_overflow": 0}, 5) == {
        "connected": 2, "timeouts": 3, "errors": 0}
    assert capstone.pool_trial(url, {"pool_size": 3, "max_overflow": 2}, 5)["timeouts"] == 0


def test_cache_growth_of_the_unbounded_cache_grows():
    growth = capstone.cache_growth(capstone.UnboundedCache, keys=800, checkpoints=4)
    assert list(growth.keys_seen) == [200, 400, 600, 800]
    assert growth.retained_bytes.iloc[-1] > 3 * growth.retained_bytes.iloc[0]


def test_run_reports_routes_and_the_mail_queue_delivers(shop):
    requests = capstone.workload(shop.engine, 40, seed=3)
    assert requests == capstone.workload(shop.engine, 40, seed=3)
    table = shop.run(requests, threads=4)
    assert len(table) == 40
    summary = capstone.summarize_run(table)
    assert summary.route.iloc[-1] == "all"
    assert table.attrs["pool_timeouts"] == 2  # the planted pool: 2 connections for 4 threads
    comparison = capstone.compare_runs(table, table)
    assert (comparison.p95_ms_before == comparison.p95_ms_after).all()
    job = shop.mail_queue.enqueue(capstone.send_receipt, shop.outbox_key, "a@b.test", 1)
    assert capstone.deliver_mail(shop.mail_queue) == 1
    assert job.id and shop.cache.lrange(shop.outbox_key, -1, -1) == [b"a@b.test|1"]


def test_close_removes_everything():
    source = db.engine("sqlite", scale="tiny")
    shop = capstone.SlowShop(source, name="ch10test_copy")
    shop.product_page(1)
    prefix = shop.prefix
    shop.close()
    source.dispose()
    assert not list(services.redis_client().scan_iter(match=prefix + "*"))
    assert not db.sqlite_path("ch10test_copy").exists()
