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


def test_one_worker_runs_high_before_default_before_low(run):
    enqueued, executed = jobs.priority_order(run, jobs_per_queue=2)
    assert enqueued[:3] == ["low-1", "default-1", "high-1"]
    assert executed == ["high-1", "high-2", "default-1", "default-2", "low-1", "low-2"]
    assert all(w.process.returncode == 0 for w in run.workers)


def test_forking_worker_uses_a_process_per_job_simple_worker_one(run):
    table = jobs.fork_or_not(run, jobs=3).set_index("worker")
    assert table.processes.tolist() == [3, 1]
    assert table.job_in_worker_process.tolist() == [False, True]


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
    table = jobs.duplicate_charges(run, [(1, 100), (2, 250), (3, 999)], deliveries=2)
    assert table.charges.tolist() == [6, 3]
    assert table.orders_charged_twice.tolist() == [3, 0]


def test_offloading_defers_the_side_task_but_runs_it(run):
    table = jobs.offload_latency(run, requests=4, email_s=0.01).set_index("case")
    assert table.mails_at_response.tolist() == [4, 0]
    assert table.mails_sent.tolist() == [4, 4]


def test_workers_process_every_job(run):
    table = jobs.workers_vs_time(run, [1, 2], jobs=4, seconds=0.01)
    assert table.finished.tolist() == [4, 4]
    assert all(w.process.poll() is not None for w in run.workers)


def test_wait_for_times_out_with_a_clear_error(run):
    job = run.queue("nobody").enqueue(jobs.record, run.key("x"), "never")
    with pytest.raises(jobs.JobTimeout, match="Is a worker listening"):
        jobs.wait_for([job], timeout_s=0.2)


def test_backoff():
    assert jobs.backoff_delays(5) == [1, 2, 4, 8, 16]
    assert jobs.backoff_delays(4, base_s=10, cap_s=45) == [10, 20, 40, 45]
    rng = random.Random(1)
    for attempt in range(1, 10):
        ceiling = min(60.0, 2 ** (attempt - 1))
        delays = [jobs.backoff_with_jitter(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
