"""Chapter 06 helpers: RQ queues and real worker processes on the embedded and configured Redis.

Every test runs in its own :class:`perfcourse.chapters.background_jobs.JobRun` (fresh queue names and keys), cleaned
up afterwards; counts and orders only, never wall time.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from rq import Callback, Retry

from perfcourse.chapters import background_jobs as jobs


@pytest.fixture
def run(redis_client):
    with jobs.JobRun(redis_client) as job_run:
        yield job_run
    assert job_run.leftovers() == 0


def _list(run, name):
    return [v.decode() for v in run.connection.lrange(run.key(name), 0, -1)]


def test_one_worker_on_several_queues_takes_them_in_order(run):
    queues = run.queues(jobs.PRIORITIES)
    for i in (1, 2):
        for name in reversed(jobs.PRIORITIES):
            queues[name].enqueue(jobs.record, run.key("log"), f"{name}-{i}")
    run.run_workers(1, jobs.PRIORITIES)
    assert run.logged("log") == ["high-1", "high-2", "default-1", "default-2", "low-1", "low-2"]
    assert all(w.process.returncode == 0 for w in run.workers)


def test_forking_worker_uses_a_process_per_job_simple_worker_one(run):
    pids = {}
    for name, simple in (("fork", False), ("simple", True)):
        for _ in range(3):
            run.queue(name).enqueue(jobs.whoami, run.key(f"pids-{name}"))
        worker = run.start_worker([name], simple=simple)
        run.wait_workers([worker])
        pids[name] = (set(run.logged(f"pids-{name}")), str(worker.process.pid))
    assert len(pids["fork"][0]) == 3 and pids["fork"][1] not in pids["fork"][0]
    assert pids["simple"][0] == {pids["simple"][1]}


def test_retries_count_attempts_and_call_hooks(run):
    queue = run.queue("retry")
    ok_key, bad_key = run.key("ok"), run.key("bad")
    hooks = {"on_success": Callback(jobs.log_success), "on_failure": Callback(jobs.log_failure)}
    ok = queue.enqueue(jobs.flaky, ok_key, 2, retry=Retry(max=2), **hooks)
    bad = queue.enqueue(jobs.flaky, bad_key, 5, retry=Retry(max=1), **hooks)
    run.run_workers(1, ["retry"])
    assert jobs.wait_for([ok, bad], timeout_s=10) == ["finished", "failed"]
    assert int(run.connection.get(ok_key)) == 3 and ok.return_value() == 3
    assert int(run.connection.get(bad_key)) == 2
    ok_hooks = _list(run, "ok:hooks")
    assert [h.split()[0] for h in ok_hooks] == ["failure", "failure", "success"]
    assert bad.id in queue.failed_job_registry.get_job_ids()
    assert "attempt 2: payment gateway timed out" in bad.latest_result().exc_string
    counts = jobs.registry_counts(queue)
    assert counts["finished"] == 1 and counts["failed"] == 1 and counts["queued"] == 0


def test_scheduled_job_and_backoff_run_with_the_scheduler(run):
    queue = run.queue("later")
    key = run.key("flaky")
    retried = queue.enqueue(jobs.flaky, key, 1, retry=Retry(max=1, interval=[1]))
    later = queue.enqueue_in(timedelta(seconds=1), jobs.record, run.key("log"), "scheduled")
    assert later.get_status().value == "scheduled"
    worker = run.start_worker(["later"], burst=False, scheduler=True, max_idle_s=20)
    try:
        assert jobs.wait_for([retried, later], timeout_s=15) == ["finished", "finished"]
    finally:
        worker.stop()
    assert _list(run, "log") == ["scheduled"]
    gaps = jobs.delays_between(run.connection.lrange(f"{key}:at", 0, -1))
    assert len(gaps) == 1 and gaps[0] >= 0.9


def test_idempotency_key_charges_each_order_once(run):
    queue = run.queue("payments")
    for _ in range(2):
        for order_id in (1, 2, 3):
            queue.enqueue(jobs.charge_order, run.key("plain"), order_id, 100)
            queue.enqueue(jobs.charge_order_once, run.key("once"), order_id, 100, f"order-{order_id}")
    run.run_workers(1, ["payments"])
    assert sorted(run.logged("plain")) == ["1:100", "1:100", "2:100", "2:100", "3:100", "3:100"]
    assert sorted(run.logged("once")) == ["1:100", "2:100", "3:100"]


def test_long_running_workers_register_and_share_a_queue(run):
    queue = run.queue("io")
    workers = [run.start_worker(["io"], burst=False) for _ in range(2)]
    try:
        run.wait_registered(queue, 2)
        batch = [queue.enqueue(jobs.io_task, run.key("io"), 0.01) for _ in range(4)]
        assert jobs.wait_for(batch, timeout_s=20) == ["finished"] * 4
    finally:
        assert run.stop_workers() == 2
    assert len(run.logged("io")) == 4 and all(w.process.poll() is not None for w in workers)


def test_send_email_inline_uses_the_course_client(run):
    assert jobs.send_email(run.key("outbox"), 7, 0.0) == 7
    assert run.logged("outbox") == ["welcome mail to user 7"]


def test_wait_for_times_out_with_a_clear_error(run):
    job = run.queue("nobody").enqueue(jobs.record, run.key("x"), "never")
    with pytest.raises(jobs.JobTimeout, match="Is a worker listening"):
        jobs.wait_for([job], timeout_s=0.2)


def test_equal_jitter_stays_between_half_and_all_of_the_ceiling():
    rng = random.Random(1)
    for attempt in range(1, 10):
        ceiling = min(60.0, 2 ** (attempt - 1))
        delays = [jobs.backoff_with_jitter(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


# --------------------------------------------------------------------------------------------
# The lab's shop: the gateway, the receipt, the backlog, the worker and the trials


def _orders(n=6, start=500):
    return [{"id": start + i, "amount_cents": 1000 + i, "email": f"c{i}@shop.test"} for i in range(n)]


def test_gateway_honours_idempotency_keys_and_plans(run):
    shop = run.shop("gw")
    shop.plan(1, ["timeout", "lost"])
    with pytest.raises(jobs.GatewayTimeout, match="nothing was charged"):
        jobs.charge_card(shop.key, 1, 500, "k1")
    with pytest.raises(jobs.GatewayTimeout, match="answer was lost"):
        jobs.charge_card(shop.key, 1, 500, "k1")
    first = shop.ledger()[0][2]
    assert jobs.charge_card(shop.key, 1, 500, "k1") == first  # a replay: the first charge's id
    with pytest.raises(jobs.IdempotencyKeyReused):
        jobs.charge_card(shop.key, 2, 700, "k1")
    jobs.charge_card(shop.key, 2, 700)
    jobs.charge_card(shop.key, 2, 700)  # no key: charged again
    shop.plan(3, ["declined"])
    with pytest.raises(jobs.CardDeclined):
        jobs.charge_card(shop.key, 3, 100, "k3")
    assert shop.charges() == {1: 1, 2: 2} and shop.gateway_calls() == 7
    assert [e["outcome"] for e in shop.events()] == [
        "timeout", "charged", "replayed", "key reused", "charged", "charged", "declined"]
    with pytest.raises(ValueError, match="unknown"):
        shop.plan(4, ["maybe"])


def test_shop_jobs_refuse_anything_but_the_shop_key(run):
    with pytest.raises(TypeError, match="shop.key"):
        jobs.send_receipt({"id": 1}, 1, "a@b")
    with pytest.raises(TypeError, match="shop.key"):
        jobs.bulk_task(run.shop("x"), "newsletter")


def test_receipt_notes_whether_its_order_was_charged(run):
    shop = run.shop("receipts")
    jobs.send_receipt(shop.key, 9, "nine@shop.test")
    jobs.charge_card(shop.key, 9, 900)
    jobs.send_receipt(shop.key, 9, "nine@shop.test")
    assert [e["charged"] for e in shop.events() if e["job"] == "receipt"] == [False, True]
    assert shop.outbox() == ["receipt for order 9 to nine@shop.test"] * 2


def test_latency_trial_counts_work_done_before_the_answer(run):
    shop = run.shop("latency")

    def inline(order, shop):
        jobs.charge_card(shop.key, order["id"], order["amount_cents"])
        return {"order_id": order["id"], "status": "paid"}

    def queued(order, shop):
        shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"])
        return {"order_id": order["id"], "status": "processing"}

    rows = {name: jobs.latency_trial(fn, shop, _orders(3)) for name, fn in [("inline", inline), ("queued", queued)]}
    assert rows["inline"].gateway_calls.tolist() == [1, 1, 1] and rows["inline"].jobs_enqueued.sum() == 0
    assert rows["queued"].gateway_calls.sum() == 0 and rows["queued"].jobs_enqueued.tolist() == [1, 1, 1]
    assert rows["queued"].status.unique().tolist() == ["processing"]


def _plain(order, shop):
    shop.queues["default"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"])
    shop.queues["default"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"])


def _retried_once(order, shop):
    charge = shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"],
                                         idempotency_key=f"o{order['id']}", retry=Retry(max=3, interval=1))
    shop.queues["high"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"], depends_on=charge)


def test_delivery_trial_shows_lost_and_double_charges_and_their_fix(run):
    plain = jobs.delivery_trial(_plain, run.shop("d1"), _orders()).set_index("scenario")
    assert plain.charges.to_dict() == {"plain": 1, "timeout": 0, "timeout twice": 0, "answer lost": 1,
                                       "double click": 2, "redelivered": 2}
    fixed = jobs.delivery_trial(_retried_once, run.shop("d2"), _orders()).set_index("scenario")
    assert fixed.charges.tolist() == [1] * 6
    assert fixed.gateway_calls.to_dict() == {"plain": 1, "timeout": 2, "timeout twice": 3, "answer lost": 2,
                                             "double click": 2, "redelivered": 2}


def test_backlog_trial_reads_the_run_order(run):
    orders = _orders(3)
    before = jobs.backlog_trial(_plain, run.shop("b1"), orders, 3, 2, declined=[orders[1]["id"]])
    assert before.job.tolist()[:3] == ["bulk"] * 3 and (before.checkout_jobs_waiting[:3] == 6).all()
    assert before.receipt_before_charge.sum() == 1
    after = jobs.backlog_trial(_retried_once, run.shop("b2"), orders, 3, 2, declined=[orders[1]["id"]])
    assert after.job.tolist()[:5] == ["charge"] * 3 + ["receipt"] * 2
    assert after.checkout_jobs_waiting.sum() == 0 and not after.receipt_before_charge.any()


def test_settle_queues_due_retries_and_redeliver_runs_a_job_again(run):
    shop = run.shop("settle")
    shop.plan(1, ["timeout"])
    job = shop.queues["high"].enqueue(jobs.charge_card, shop.key, 1, 100, "k", retry=Retry(max=1, interval=1))
    worker = shop.start_worker()
    try:
        assert shop.settle(15) and job.get_status(refresh=True).value == "finished"
        assert shop.next_due() is None and not shop.busy()
        assert [j.id for j in shop.charge_jobs(1)] == [job.id]
        assert shop.redeliver([1]) == 1 and shop.settle(15)
    finally:
        worker.stop()
    assert [e["outcome"] for e in shop.events()] == ["timeout", "charged", "replayed"]


def test_lab_orders_come_from_the_dataset(tiny):
    orders = jobs.lab_orders(tiny, 3)
    assert len(orders) == 3 and all(set(o) == {"id", "amount_cents", "email"} for o in orders)
    assert all(isinstance(o["amount_cents"], int) and "@" in o["email"] for o in orders)


def test_a_namespace_of_its_own(redis_client):
    with jobs.JobRun(redis_client, namespace="ch06test") as other:
        shop = other.shop("s")
        assert shop.key.startswith(f"ch06test:{other.run_id}:") and other.prefix.startswith("ch06test-")
        assert shop.queues["high"].name == f"ch06test-{other.run_id}-high"
    assert other.leftovers() == 0
