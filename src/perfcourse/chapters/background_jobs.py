"""Chapter 06, background jobs: the harness of the lesson (private queues, real worker processes,
waiting with deadlines) and the job functions the workers run.

The experiments themselves (which queues a job goes to, how many workers drain a batch, a request
handler that enqueues instead of doing) are written in the notebook's cells; only what a worker
must import by name, and the plumbing around processes, lives here.

Everything a chapter run creates is private to it. :class:`JobRun` names its queues
``ch06-<run>-<name>`` (RQ stores them under ``rq:queue:ch06-<run>-<name>``), gives its workers
names starting with ``ch06-<run>``, and writes the jobs' own side effects under ``ch06:<run>:``;
:meth:`JobRun.cleanup` deletes all of it (queues, registries, jobs, results, keys).

Workers are real processes: ``python -m rq.cli worker`` started by :meth:`JobRun.start_worker`,
in burst mode (they exit once the queues are empty) unless they must keep running (a scheduler,
the workers a notebook keeps for its slider), and always waited for with a deadline or stopped by
:meth:`JobRun.stop_workers` / :meth:`JobRun.cleanup`. The job functions below
live in this module because a worker imports a job's function by its dotted name
(``perfcourse.chapters.background_jobs.record``): a function defined in a notebook cell cannot be run by a worker.

Job functions find Redis through the job that runs them (:func:`rq.get_current_job`); called
directly (inline, in a request handler) they use the course's client.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.job import Job, JobStatus

from .. import services

NAMESPACE = "ch06"
#: The priority queues of the chapter, most urgent first: the order a worker listens in.
PRIORITIES = ("high", "default", "low")

_local_clients: dict[str, redis.Redis] = {}


def _redis() -> redis.Redis:
    """The Redis of the running job, or the course's client when called inline."""
    job = get_current_job()
    if job is not None:
        return job.connection
    url = services.redis_url()
    if url not in _local_clients:
        _local_clients[url] = services.redis_client()
    return _local_clients[url]


def _text(values: Iterable) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# --------------------------------------------------------------------------------------------
# Job functions (imported by the workers by dotted name)


def record(log_key: str, label: str) -> str:
    """Append ``label`` to the list ``log_key``: the jobs write down the order they ran in."""
    _redis().rpush(log_key, label)
    return label


def io_task(log_key: str, seconds: float) -> float:
    """An I/O-bound job: wait ``seconds`` (a slow API, a mail server) and log start and end."""
    start = time.time()
    time.sleep(seconds)
    _redis().rpush(log_key, f"{start:.6f} {time.time():.6f} {os.getpid()}")
    return seconds


def flaky(attempts_key: str, fail_times: int) -> int:
    """Fail the first ``fail_times`` attempts (a gateway timing out), then succeed.

    Each attempt increments ``attempts_key`` and logs its time under ``attempts_key:at``; the
    return value is the attempt that succeeded.
    """
    client = _redis()
    attempt = client.incr(attempts_key)
    client.rpush(f"{attempts_key}:at", f"{time.time():.6f}")
    if attempt <= fail_times:
        raise ConnectionError(f"attempt {attempt}: payment gateway timed out")
    return attempt


def declined(log_key: str, order_id: int) -> None:
    """A job that always fails: the card is declined."""
    _redis().incr(log_key)
    raise ValueError(f"order {order_id}: card declined")


def charge_order(ledger_key: str, order_id: int, amount_cents: int) -> bool:
    """Charge an order: one ledger entry per call. Not idempotent: run twice, charge twice."""
    _redis().rpush(ledger_key, f"{order_id}:{amount_cents}")
    return True


def charge_order_once(ledger_key: str, order_id: int, amount_cents: int,
                      idempotency_key: str) -> bool:
    """Charge an order at most once per ``idempotency_key``.

    ``SET key 1 NX EX`` succeeds for the first caller only (atomically, in Redis): a second
    delivery of the same job finds the key and does nothing. Returns whether it charged.
    """
    client = _redis()
    if not client.set(f"{ledger_key}:idem:{idempotency_key}", 1, nx=True, ex=86_400):
        return False
    client.rpush(ledger_key, f"{order_id}:{amount_cents}")
    return True


def send_email(outbox_key: str, user_id: int, seconds: float) -> int:
    """A slow side task of a request (an SMTP round trip): wait, then put a mail in the outbox."""
    time.sleep(seconds)
    _redis().rpush(outbox_key, f"welcome mail to user {user_id}")
    return user_id


def process_task(task: dict) -> str:
    """A generic job taking one task description (the routing exercise enqueues it)."""
    return str(task.get("kind", ""))


def whoami(log_key: str) -> int:
    """Log the id of the process that runs the job (work horse or worker)."""
    _redis().rpush(log_key, os.getpid())
    return os.getpid()


# Hooks (RQ callbacks): called by the worker after the job, with the job and its connection.


def log_success(job: Job, connection: redis.Redis, result, *args, **kwargs) -> None:
    """``on_success`` hook: note the job's function and result under ``<first arg>:hooks``."""
    name = job.func_name.rsplit(".", 1)[-1]
    connection.rpush(f"{job.args[0]}:hooks", f"success {name} -> {result}")


def log_failure(job: Job, connection: redis.Redis, exc_type, exc_value, traceback) -> None:
    """``on_failure`` hook: note the exception under ``<first arg>:hooks`` (an error tracker)."""
    name = job.func_name.rsplit(".", 1)[-1]
    connection.rpush(f"{job.args[0]}:hooks", f"failure {name}: {exc_type.__name__}: {exc_value}")


# --------------------------------------------------------------------------------------------
# Backoff


def backoff_with_jitter(attempt: int, rng: random.Random, base_s: float = 1.0,
                        cap_s: float = 60.0) -> float:
    """Delay before retry ``attempt`` (1-based): "equal jitter" between half and all of
    ``min(cap, base * 2**(attempt-1))``, so jobs that failed together do not retry together."""
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


# --------------------------------------------------------------------------------------------
# Workers and queues of one run


class CourseWorker(Worker):
    """RQ's forking worker, importing this module before it forks.

    A work horse imports the job's function by name. When the worker process has not imported
    it, every horse imports it again after the fork (here: a few hundred milliseconds for the
    course package, per job). Importing the application once in the worker, before forking, is
    the counterpart of gunicorn's ``--preload``; the horses share those pages copy-on-write.
    """


class CourseSimpleWorker(SimpleWorker):
    """RQ's ``SimpleWorker`` (no fork: jobs run in the worker process), preloaded likewise."""


class JobTimeout(RuntimeError):
    """Jobs or workers did not finish before the deadline."""


@dataclass
class WorkerProcess:
    """One ``rq worker`` process; its output goes to a log file read when something fails."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> int:
        """Terminate the worker (SIGTERM: a warm shutdown), kill it if it does not exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        return self.process.returncode


@dataclass
class JobRun:
    """The queues, workers and keys of one run of the chapter, all under a fresh random id."""

    connection: redis.Redis
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[WorkerProcess] = field(default_factory=list)
    _queue_names: set[str] = field(default_factory=set)
    _worker_count: int = 0

    @property
    def prefix(self) -> str:
        """Prefix of the run's queue and worker names, e.g. ``ch06-1a2b3c4d``."""
        return f"{NAMESPACE}-{self.run_id}"

    def key(self, name: str) -> str:
        """A key for the jobs' own data, e.g. ``ch06:1a2b3c4d:order``."""
        return f"{NAMESPACE}:{self.run_id}:{name}"

    def queue(self, name: str = "default", **kwargs) -> Queue:
        """The RQ queue ``<prefix>-<name>`` on the course's Redis."""
        full = f"{self.prefix}-{name}"
        self._queue_names.add(full)
        return Queue(full, connection=self.connection, **kwargs)

    def queues(self, names: Sequence[str] = PRIORITIES) -> dict[str, Queue]:
        return {name: self.queue(name) for name in names}

    def start_worker(self, names: Sequence[str] = ("default",), *, burst: bool = True,
                     scheduler: bool = False, simple: bool = False,
                     max_idle_s: int | None = None) -> WorkerProcess:
        """Start ``python -m rq.cli worker`` listening to the queues ``names``, in that order.

        ``burst``: exit when the queues are empty. ``scheduler``: also move due scheduled jobs
        (``enqueue_in``, retries with an interval) onto their queues; a burst worker does that
        once at start, so scheduling needs a long-running worker, stopped by :meth:`stop_workers`.
        ``simple``: run jobs in the worker process itself (``SimpleWorker``) instead of forking
        a work horse per job.
        """
        self._worker_count += 1
        name = f"{self.prefix}-w{self._worker_count}"
        full = [f"{self.prefix}-{n}" for n in names]
        self._queue_names.update(full)
        command = [sys.executable, "-m", "rq.cli", "worker", "--url", services.redis_url(),
                   "--name", name, "--logging_level", "WARNING"]
        if burst:
            command.append("--burst")
        if scheduler:
            command.append("--with-scheduler")
        command += ["--worker-class",
                    f"perfcourse.chapters.background_jobs.{'CourseSimpleWorker' if simple else 'CourseWorker'}"]
        if max_idle_s is not None:
            command += ["--max-idle-time", str(max_idle_s)]
        log_path = Path(tempfile.gettempdir()) / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([*command, *full], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        worker = WorkerProcess(name, process, log_path)
        self.workers.append(worker)
        return worker

    def wait_workers(self, workers: Iterable[WorkerProcess], timeout_s: float = 30.0) -> float:
        """Wait for burst workers to exit; seconds waited. Terminates them all on timeout."""
        workers = list(workers)
        start = time.perf_counter()
        deadline = start + timeout_s
        try:
            for worker in workers:
                try:
                    worker.process.wait(max(0.01, deadline - time.perf_counter()))
                except subprocess.TimeoutExpired:
                    raise JobTimeout(
                        f"worker {worker.name} still running after {timeout_s:g} s; it was "
                        f"stopped. Its log:\n{worker.log()[-2000:]}") from None
        finally:
            for worker in workers:
                worker.stop()
        return time.perf_counter() - start

    def run_workers(self, count: int, names: Sequence[str] = ("default",),
                    timeout_s: float = 30.0, **options) -> float:
        """Start ``count`` burst workers on ``names``, wait until all exited; wall seconds."""
        start = time.perf_counter()
        workers = [self.start_worker(names, burst=True, **options) for _ in range(count)]
        self.wait_workers(workers, timeout_s)
        return time.perf_counter() - start

    def wait_registered(self, queue: Queue, count: int, timeout_s: float = 30.0) -> None:
        """Wait until ``count`` workers listen to ``queue`` (started and registered in Redis), so a
        measurement that follows does not include their start-up. Raises :class:`JobTimeout`
        with the log of a worker that died instead."""
        deadline = time.perf_counter() + timeout_s
        while Worker.count(connection=self.connection, queue=queue) < count:
            dead = [w for w in self.workers if w.process.poll() is not None
                    and w.process.returncode not in (0, None)]
            if dead:
                raise JobTimeout(f"worker {dead[0].name} exited with {dead[0].process.returncode}:\n"
                                 f"{dead[0].log()[-2000:]}")
            if time.perf_counter() > deadline:
                raise JobTimeout(f"{count} workers did not register on {queue.name} within "
                                 f"{timeout_s:g} s")
            time.sleep(0.02)

    def logged(self, name: str) -> list[str]:
        """The list the jobs wrote under :meth:`key` ``(name)``, as text."""
        return _text(self.connection.lrange(self.key(name), 0, -1))

    def stop_workers(self) -> int:
        """Stop every worker of the run still running; how many were running."""
        running = [w for w in self.workers if w.process.poll() is None]
        for worker in running:  # signal them all first: they shut down side by side
            worker.process.terminate()
        for worker in running:
            worker.stop()
        return len(running)

    def cleanup(self) -> int:
        """Stop the workers; delete the run's queues, registries, jobs, results and keys."""
        self.stop_workers()
        for worker in self.workers:
            worker.log_path.unlink(missing_ok=True)
        client = self.connection
        job_ids: set[str] = set()
        for name in self._queue_names:
            queue = Queue(name, connection=client)
            job_ids.update(queue.get_job_ids())
            for registry in (queue.started_job_registry, queue.finished_job_registry,
                             queue.failed_job_registry, queue.deferred_job_registry,
                             queue.scheduled_job_registry, queue.canceled_job_registry):
                job_ids.update(registry.get_job_ids(cleanup=False))
            client.srem("rq:queues", queue.key)
        # One pass over RQ's keys (not one SCAN per job): a key belongs to the run when it names
        # the run's prefix or one of its jobs (rq:job:<id>, rq:results:<id>, ...).
        keys = [key for key in client.scan_iter(match="rq:*", count=1000)
                if self.prefix in key.decode(errors="replace")
                or job_ids.intersection(key.decode(errors="replace").split(":"))]
        keys += list(client.scan_iter(match=f"{NAMESPACE}:{self.run_id}:*", count=1000))
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += client.delete(*keys[start:start + 500])
        for member in client.smembers("rq:workers"):
            if self.prefix in member.decode(errors="replace"):
                client.srem("rq:workers", member)
        return deleted

    def leftovers(self) -> int:
        """Keys of this run still in Redis (0 after :meth:`cleanup`)."""
        return sum(1 for pattern in (f"rq:*{self.prefix}*", f"{NAMESPACE}:{self.run_id}:*")
                   for _ in self.connection.scan_iter(match=pattern, count=1000))

    def __enter__(self) -> JobRun:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()


def wait_for(jobs: Sequence[Job], timeout_s: float = 20.0, poll_s: float = 0.05) -> list[str]:
    """Poll the jobs until each is finished or failed (or stopped/canceled); their statuses.

    Raises :class:`JobTimeout` naming the jobs still pending at the deadline: is a worker
    listening to their queue (and a scheduler running, for scheduled jobs)?
    """
    done = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
    deadline = time.perf_counter() + timeout_s
    while True:
        statuses = [job.get_status(refresh=True) for job in jobs]
        if all(status in done for status in statuses):
            return [status.value for status in statuses]
        if time.perf_counter() > deadline:
            pending = [f"{job.id} ({status.value}, queue {job.origin})"
                       for job, status in zip(jobs, statuses) if status not in done]
            raise JobTimeout(f"{len(pending)} job(s) not done after {timeout_s:g} s: "
                             f"{', '.join(pending[:5])}. Is a worker listening to that queue "
                             "(with --with-scheduler for scheduled jobs and retries)?")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# Monitoring


def registry_counts(queue: Queue) -> dict[str, int]:
    """Jobs per state of one queue: what a dashboard (rq-dashboard, ``rq info``) shows."""
    return {"queued": queue.count, "started": queue.started_job_registry.count,
            "scheduled": queue.scheduled_job_registry.count,
            "finished": queue.finished_job_registry.count,
            "failed": queue.failed_job_registry.count}


def delays_between(timestamps: Sequence[str | bytes]) -> list[float]:
    """Seconds between consecutive logged timestamps (the wait before each retry)."""
    times = [float(t) for t in _text(timestamps)]
    return [b - a for a, b in zip(times, times[1:])]


__all__ = [
    "NAMESPACE", "PRIORITIES", "CourseSimpleWorker", "CourseWorker", "JobRun", "JobTimeout",
    "WorkerProcess", "backoff_with_jitter", "charge_order", "charge_order_once", "declined",
    "delays_between", "flaky", "io_task", "log_failure", "log_success", "process_task", "record",
    "registry_counts", "send_email", "wait_for", "whoami",
]
