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
