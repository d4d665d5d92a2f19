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

The lab (``06-background-jobs-lab``) adds a shop: :meth:`JobRun.shop` makes a :class:`Shop` (three
queues and a key prefix), whose jobs are :func:`charge_card` (a payment gateway that can time out
before or after charging, and that honours idempotency keys as Stripe does), :func:`send_receipt`
and :func:`bulk_task` (the nightly backlog). Each job run leaves an event (what, outcome, process
id) in run order, so the experiments :func:`latency_trial`, :func:`delivery_trial` and
:func:`backlog_trial` count what a checkout written in the notebook did, and when.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import redis
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.job import Job, JobStatus
from rq.scheduler import RQScheduler
from sqlalchemy import select
from sqlalchemy.engine import Engine

from .. import services
from ..models import Order, User

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
    #: Set once it was asked to stop: its exit is then expected, whatever its code.
    stopping: bool = False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal_stop(self) -> None:
        """Ask the worker to stop (SIGTERM: it finishes its job, takes no other, exits) without
        waiting for it to exit; :meth:`JobRun.stop_workers` and :meth:`JobRun.cleanup` wait."""
        self.stopping = True
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self, timeout_s: float = 5.0) -> int:
        """Terminate the worker (SIGTERM: a warm shutdown), kill it if it does not exit."""
        self.stopping = True
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
    #: First part of every name: ``ch06`` for the notebooks, another for a grader's own runs.
    namespace: str = NAMESPACE
    workers: list[WorkerProcess] = field(default_factory=list)
    _queue_names: set[str] = field(default_factory=set)
    _worker_count: int = 0

    @property
    def prefix(self) -> str:
        """Prefix of the run's queue and worker names, e.g. ``ch06-1a2b3c4d``."""
        return f"{self.namespace}-{self.run_id}"

    def key(self, name: str) -> str:
        """A key for the jobs' own data, e.g. ``ch06:1a2b3c4d:order``."""
        return f"{self.namespace}:{self.run_id}:{name}"

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
        keys += list(client.scan_iter(match=f"{self.namespace}:{self.run_id}:*", count=1000))
        deleted = 0
        for start in range(0, len(keys), 500):
            deleted += client.delete(*keys[start:start + 500])
        for member in client.smembers("rq:workers"):
            if self.prefix in member.decode(errors="replace"):
                client.srem("rq:workers", member)
        return deleted

    def leftovers(self) -> int:
        """Keys of this run still in Redis (0 after :meth:`cleanup`)."""
        return sum(1 for pattern in (f"rq:*{self.prefix}*", f"{self.namespace}:{self.run_id}:*")
                   for _ in self.connection.scan_iter(match=pattern, count=1000))

    def shop(self, name: str = "shop", *, gateway_s: float = 0.0, mail_s: float = 0.0,
             bulk_s: float = 0.0) -> Shop:
        """The lab's shop in this run: queues ``high``, ``default``, ``low`` and keys under
        ``key(name) + ":"``; the gateway takes ``gateway_s`` per call, a mail ``mail_s``, a
        backlog job ``bulk_s`` (seconds)."""
        shop = Shop(self, f"{self.key(name)}:", self.queues(PRIORITIES))
        self.connection.hset(f"{shop.key}settings", mapping={
            "gateway_s": gateway_s, "mail_s": mail_s, "bulk_s": bulk_s})
        self.connection.sadd(f"{shop.key}queues", *(q.name for q in shop.queues.values()))
        return shop

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


# --------------------------------------------------------------------------------------------
# The lab: a shop's checkout, its payment gateway, its mail and its nightly backlog
#
# The job functions below are what the lab's checkout enqueues (or, before the fix, calls
# inline). They keep what they did in Redis under the shop's key, so experiments and graders
# count it: the gateway's ledger and attempts, the outbox, and one event per job run, in the
# order the jobs ran, with the id of the process that ran it.


class GatewayTimeout(ConnectionError):
    """The payment gateway did not answer in time; it may have charged or not."""


class CardDeclined(ValueError):
    """The card was refused: retrying does not help."""


class IdempotencyKeyReused(ValueError):
    """An idempotency key came back with another order or amount than its first charge."""


def _shop_key(shop) -> str:
    if not isinstance(shop, str) or not shop.endswith(":"):
        raise TypeError("the first argument of a shop job is the shop's key prefix (shop.key, a str "
                        f"ending in ':'), not {type(shop).__name__} {str(shop)[:40]!r}")
    return shop


def _setting(client: redis.Redis, shop: str, name: str) -> float:
    value = client.hget(f"{shop}settings", name)
    return 0.0 if value is None else float(value)


def _event(client: redis.Redis, shop: str, **fields) -> None:
    if "order" in fields and not isinstance(fields["order"], (int, str)):
        fields["order"] = str(fields["order"])  # whatever a caller passed, readable back
    client.rpush(f"{shop}events", json.dumps({**fields, "pid": os.getpid()}))


def _number(text: str):
    """An id or amount read back from the ledger: an int when it is one, else as written."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def charge_card(shop: str, order_id: int, amount_cents: int,
                idempotency_key: str | None = None) -> str:
    """Charge an order's card at the payment gateway (a slow network call); the charge id.

    Like Stripe's API, the gateway charges each ``idempotency_key`` once: sent again with the
    same order and amount, the key gets the first charge's id back and nothing is charged. With
    no key, every call charges. A call can fail, as the shop's plan for the order says
    (:meth:`Shop.plan`): ``timeout`` (nothing charged), ``lost`` (charged, then the answer was
    lost: the caller sees a timeout) or ``declined``.
    """
    shop = _shop_key(shop)
    client = _redis()
    client.rpush(f"{shop}gateway:calls", f"{os.getpid()}:{threading.get_ident()}")  # who called
    time.sleep(_setting(client, shop, "gateway_s"))
    charge = f"{order_id}:{amount_cents}"
    if idempotency_key is not None:
        first = client.hget(f"{shop}gateway:keys", str(idempotency_key))
        if first is not None:
            return _replay(client, shop, first.decode(), charge, order_id, idempotency_key)
    outcome = (client.lpop(f"{shop}gateway:plan:{order_id}") or b"ok").decode()
    if outcome in ("timeout", "declined"):
        _event(client, shop, job="charge", order=order_id, outcome=outcome)
        if outcome == "declined":
            raise CardDeclined(f"order {order_id}: the card was declined")
        raise GatewayTimeout(f"order {order_id}: the gateway timed out; nothing was charged")
    charge_id = f"ch_{client.incr(f'{shop}gateway:sequence')}"
    if idempotency_key is not None and not client.hsetnx(
            f"{shop}gateway:keys", str(idempotency_key), f"{charge}:{charge_id}"):
        # another call with this key charged in the meantime: answer as it did
        first = client.hget(f"{shop}gateway:keys", str(idempotency_key)).decode()
        return _replay(client, shop, first, charge, order_id, idempotency_key)
    client.rpush(f"{shop}ledger", f"{charge}:{charge_id}")
    client.hincrby(f"{shop}charged", str(order_id), 1)
    _event(client, shop, job="charge", order=order_id, outcome="charged", charge=charge_id)
    if outcome == "lost":
        raise GatewayTimeout(f"order {order_id}: the gateway timed out after charging {charge_id} "
                             "(the answer was lost)")
    return charge_id


def _replay(client: redis.Redis, shop: str, first: str, charge: str, order_id: int,
            idempotency_key) -> str:
    """The gateway's answer to a key it has seen: the first charge, or an error if it differs."""
    first_charge, _, charge_id = first.rpartition(":")
    if first_charge != charge:
        _event(client, shop, job="charge", order=order_id, outcome="key reused")
        raise IdempotencyKeyReused(
            f"idempotency key {idempotency_key!r} was first sent for order:amount {first_charge}, "
            f"now for {charge}")
    _event(client, shop, job="charge", order=order_id, outcome="replayed", charge=charge_id)
    return charge_id


def send_receipt(shop: str, order_id: int, email: str) -> str:
    """Mail an order's receipt (a slow SMTP round trip). Notes whether the order had been
    charged when the mail left."""
    shop = _shop_key(shop)
    client = _redis()
    time.sleep(_setting(client, shop, "mail_s"))
    charged = bool(client.hexists(f"{shop}charged", str(order_id)))
    client.rpush(f"{shop}outbox", f"receipt for order {order_id} to {email}")
    _event(client, shop, job="receipt", order=order_id, charged=charged)
    return email


def bulk_task(shop: str, label: str) -> str:
    """A job of the nightly backlog (a newsletter, an export) that nobody is waiting for. Notes
    how many checkout jobs (charges, receipts) were waiting in the shop's queues when the worker
    took it (ready for :data:`READY_MARGIN_S` already: not one that arrived as it was taken)."""
    shop = _shop_key(shop)
    client = _redis()
    job = get_current_job()
    taken = job.started_at if job is not None and job.started_at else datetime.now(UTC)
    waiting = _checkout_jobs_ready(client, shop, taken - timedelta(seconds=READY_MARGIN_S))
    time.sleep(_setting(client, shop, "bulk_s"))
    _event(client, shop, job="bulk", label=label, waiting=waiting)
    return label


#: A checkout job counts as waiting behind a backlog job when it was queued this long before the
#: worker took the backlog job (a retry the scheduler queues at that very moment does not).
READY_MARGIN_S = 0.1
_CHECKOUT_JOBS = frozenset(f"{__name__}.{name}" for name in ("charge_card", "send_receipt"))


def _checkout_jobs_ready(client: redis.Redis, shop: str, before: datetime) -> int:
    """Charges and receipts in the shop's queues (not scheduled, not deferred) since ``before``."""
    ready = 0
    for name in _text(client.smembers(f"{shop}queues")):
        ids = _text(client.lrange(f"rq:queue:{name}", 0, -1))
        for job in Job.fetch_many(ids, connection=client):
            if job is not None and job.func_name in _CHECKOUT_JOBS and job.enqueued_at is not None:
                enqueued = job.enqueued_at if job.enqueued_at.tzinfo else job.enqueued_at.replace(tzinfo=UTC)
                ready += enqueued < before
    return ready


@dataclass
class Shop:
    """The lab's shop on the course's Redis: three queues and the keys its jobs write under.

    ``key`` is the prefix the job functions take as their first argument (``shop.key``);
    ``queues`` maps ``high``, ``default`` and ``low`` to RQ queues. Made by :meth:`JobRun.shop`
    and deleted with its run.
    """

    run: JobRun
    key: str
    queues: dict[str, Queue]

    @property
    def connection(self) -> redis.Redis:
        return self.run.connection

    # Setting up an experiment

    def plan(self, order_id: int, outcomes: Sequence[str]) -> None:
        """What the gateway does on the next calls for this order, one outcome per call:
        ``ok``, ``timeout``, ``lost`` or ``declined``; after the plan, ``ok``."""
        unknown = set(outcomes) - {"ok", "timeout", "lost", "declined"}
        if unknown:
            raise ValueError(f"unknown gateway outcomes {sorted(unknown)}")
        key = f"{self.key}gateway:plan:{order_id}"
        self.connection.delete(key)
        if outcomes:
            self.connection.rpush(key, *outcomes)

    def enqueue_backlog(self, newsletters: int, exports: int) -> list[Job]:
        """The nightly backlog: newsletters on ``default``, exports on ``low``."""
        return ([self.queues["default"].enqueue(bulk_task, self.key, f"newsletter {i}")
                 for i in range(1, newsletters + 1)]
                + [self.queues["low"].enqueue(bulk_task, self.key, f"export {i}")
                   for i in range(1, exports + 1)])

    # Reading what happened

    def gateway_calls(self) -> int:
        """Calls the gateway received so far (attempts, replays included)."""
        return self.connection.llen(f"{self.key}gateway:calls")

    def gateway_callers(self, start: int = 0) -> list[tuple[int, int]]:
        """(process id, thread id) of each call to the gateway from the ``start``-th on."""
        return [tuple(map(int, caller.split(":")))
                for caller in _text(self.connection.lrange(f"{self.key}gateway:calls", start, -1))]

    def ledger(self) -> list[tuple]:
        """The charges made: (order id, amount in cents, charge id), in order."""
        rows = []
        for entry in _text(self.connection.lrange(f"{self.key}ledger", 0, -1)):
            order_id, amount, charge_id = entry.rsplit(":", 2)
            rows.append((_number(order_id), _number(amount), charge_id))
        return rows

    def charges(self) -> Counter:
        """Charges per order id."""
        return Counter(order_id for order_id, _, _ in self.ledger())

    def outbox(self) -> list[str]:
        """The receipts mailed, in order."""
        return _text(self.connection.lrange(f"{self.key}outbox", 0, -1))

    def events(self) -> list[dict]:
        """One entry per job run (charge attempts, receipts, backlog jobs), in the order they ran."""
        return [json.loads(e) for e in _text(self.connection.lrange(f"{self.key}events", 0, -1))]

    def jobs(self) -> list[Job]:
        """Every job of the shop's queues, in whatever state (queued to failed)."""
        ids: list[str] = []
        for queue in self.queues.values():
            ids += queue.get_job_ids()
            for registry in (queue.started_job_registry, queue.scheduled_job_registry,
                             queue.deferred_job_registry, queue.finished_job_registry,
                             queue.failed_job_registry):
                ids += registry.get_job_ids(cleanup=False)
        found = Job.fetch_many(list(dict.fromkeys(ids)), connection=self.connection)
        return [job for job in found if job is not None]

    def charge_jobs(self, order_id: int) -> list[Job]:
        """The jobs of the shop's queues that run :func:`charge_card` for this order."""
        found = []
        for job in self.jobs():
            if job.func_name == f"{__name__}.charge_card":
                try:
                    bound = inspect.signature(charge_card).bind(*job.args, **job.kwargs)
                except TypeError:
                    continue
                if bound.arguments.get("order_id") == order_id:
                    found.append(job)
        return found

    # Running the workers

    def start_worker(self) -> WorkerProcess:
        """One worker on ``high default low`` (that order), a ``SimpleWorker`` (jobs run in the
        worker process, no fork per job). It keeps running until stopped; retries scheduled with
        an interval are queued again by :meth:`settle`, which plays rq's scheduler."""
        return self.run.start_worker(PRIORITIES, burst=False, simple=True, max_idle_s=120)

    def enqueue_due(self) -> int:
        """Queue the scheduled jobs (retries with an interval) whose time has come, as the
        scheduler of ``rq worker --with-scheduler`` does every second; how many."""
        now = time.time()
        due = [queue.name for queue in self.queues.values()
               if self.connection.zcount(queue.scheduled_job_registry.key, 0, now)]
        if not due:
            return 0
        scheduler = RQScheduler(due, connection=self.connection, logging_level=logging.WARNING)
        scheduler.acquire_locks()
        try:
            before = sum(self.queues[name].count for name in self.queues)
            scheduler.enqueue_scheduled_jobs()
            return sum(self.queues[name].count for name in self.queues) - before
        finally:
            scheduler.release_locks()

    def next_due(self) -> float | None:
        """Seconds until the earliest scheduled job of the shop's queues runs (None: none is)."""
        first = [score for queue in self.queues.values()
                 for _, score in self.connection.zrange(queue.scheduled_job_registry.key, 0, 0,
                                                        withscores=True)]
        return max(0.0, min(first) - time.time()) if first else None

    def busy(self) -> bool:
        """Whether a job is queued, running or scheduled (deferred ones wait for another job)."""
        with self.connection.pipeline(transaction=False) as pipe:  # one round trip
            for queue in self.queues.values():
                pipe.llen(queue.key)
                pipe.llen(queue.intermediate_queue_key)
                pipe.zcard(queue.started_job_registry.key)
                pipe.zcard(queue.scheduled_job_registry.key)
            return any(pipe.execute())

    def settle(self, timeout_s: float = 20.0, done: Callable[[], bool] | None = None,
               quiet_s: float = 0.2) -> bool:
        """Wait until ``done()`` is true or nothing has been queued, running or scheduled for
        ``quiet_s``, queuing due retries meanwhile (:meth:`enqueue_due`); False if neither
        happened within ``timeout_s``. Raises :class:`JobTimeout` with its log if a worker died."""
        deadline = time.perf_counter() + timeout_s
        quiet_since = None
        while True:
            if done is not None and done():
                return True
            self.enqueue_due()
            now = time.perf_counter()
            if self.busy():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                return True
            if now > deadline:
                return False
            dead = [w for w in self.run.workers if not w.stopping and w.process.poll() not in (0, None)]
            if dead:
                raise JobTimeout(f"worker {dead[0].name} exited with {dead[0].process.returncode}:\n"
                                 f"{dead[0].log()[-2000:]}")
            time.sleep(0.05)

    def work(self, timeout_s: float = 20.0, done: Callable[[], bool] | None = None) -> bool:
        """Start a worker, let it run until the queues settle (:meth:`settle`), tell it to stop
        (its exit is waited for by the run's clean-up)."""
        worker = self.start_worker()
        try:
            return self.settle(timeout_s, done)
        finally:
            worker.signal_stop()

    def redeliver(self, order_ids: Iterable[int]) -> int:
        """Put the finished charge jobs of these orders on their queue again, as a queue does
        when a worker dies after the work but before reporting it done; how many."""
        count = 0
        for order_id in order_ids:
            for job in self.charge_jobs(order_id):
                if job.get_status(refresh=True) == JobStatus.FINISHED:
                    Queue(job.origin, connection=self.connection).enqueue_job(job)
                    count += 1
        return count


# Experiments of the lab (the checkouts themselves are written in the notebook)


def lab_orders(engine: Engine, count: int) -> list[dict]:
    """``count`` pending orders of the shop dataset with their customer's email, as a checkout
    receives them: ``{"id", "amount_cents", "email"}``."""
    query = (select(Order.id, Order.total, User.email).join(User, User.id == Order.user_id)
             .where(Order.status == "pending").order_by(Order.id).limit(count))
    with engine.connect() as conn:
        return [{"id": order_id, "amount_cents": int(round(total * 100)), "email": email}
                for order_id, total, email in conn.execute(query)]


def latency_trial(checkout: Callable, shop: Shop, orders: Sequence[dict]) -> pd.DataFrame:
    """Call ``checkout(order, shop)`` once per order, as the web app would; one row per request:
    its response time, what had happened when it returned (gateway calls, receipts mailed, jobs
    enqueued) and the status it answered."""
    rows = []
    for order in orders:
        calls, mails = shop.gateway_calls(), len(shop.outbox())
        queued = sum(queue.count for queue in shop.queues.values())
        start = time.perf_counter()
        response = checkout(order, shop)
        elapsed = time.perf_counter() - start
        rows.append({"order": order["id"], "response_s": elapsed,
                     "gateway_calls": shop.gateway_calls() - calls,
                     "receipts_mailed": len(shop.outbox()) - mails,
                     "jobs_enqueued": sum(q.count for q in shop.queues.values()) - queued,
                     "status": (response or {}).get("status") if isinstance(response, dict) else None})
    return pd.DataFrame(rows)


#: What goes wrong, per order, in :func:`delivery_trial`.
SCENARIOS = ("plain", "timeout", "timeout twice", "answer lost", "double click", "redelivered")


def delivery_trial(checkout: Callable, shop: Shop, orders: Sequence[dict],
                   timeout_s: float = 20.0) -> pd.DataFrame:
    """At-least-once delivery and a flaky gateway, order by order, on one real worker.

    Order ``i`` meets ``SCENARIOS[i % 6]``: ``timeout`` (the gateway times out once before
    charging), ``timeout twice``, ``answer lost`` (it charges, then times out), ``double click``
    (the checkout is called twice), ``redelivered`` (its charge job runs a second time, as after
    a worker died before reporting it done). One row per order: charges and receipts.
    """
    plans = {"timeout": ["timeout"], "timeout twice": ["timeout", "timeout"],
             "answer lost": ["lost"]}
    scenario = {order["id"]: SCENARIOS[i % len(SCENARIOS)] for i, order in enumerate(orders)}
    for order in orders:
        shop.plan(order["id"], plans.get(scenario[order["id"]], []))
    for order in orders:
        for _ in range(2 if scenario[order["id"]] == "double click" else 1):
            checkout(order, shop)
    worker = shop.start_worker()
    try:
        shop.settle(timeout_s)
        shop.redeliver(o for o, s in scenario.items() if s == "redelivered")
        shop.settle(timeout_s)
    finally:
        worker.signal_stop()
    charges, receipts = shop.charges(), Counter(int(m.split()[3]) for m in shop.outbox())
    attempts = Counter(e["order"] for e in shop.events() if e["job"] == "charge")
    return pd.DataFrame([{"order": order["id"], "scenario": scenario[order["id"]],
                          "gateway_calls": attempts[order["id"]], "charges": charges[order["id"]],
                          "receipts": receipts[order["id"]]} for order in orders])


def backlog_trial(checkout: Callable, shop: Shop, orders: Sequence[dict], newsletters: int,
                  exports: int, declined: Iterable[int] = (), timeout_s: float = 20.0) -> pd.DataFrame:
    """The nightly backlog is waiting (newsletters on ``default``, exports on ``low``) when the
    checkouts come in; the cards of the ``declined`` orders are refused on every call. One
    worker on ``high default low`` runs everything; one row per job run, in the order they ran:
    ``job`` (charge, receipt, bulk), ``what``, ``outcome``, and the two things that must not
    happen: a backlog job started while checkout jobs were ready (``checkout_jobs_waiting``), a
    receipt mailed for an order not charged (``receipt_before_charge``). Stops once every backlog
    job and every receipt due has run."""
    declined = set(declined)
    shop.enqueue_backlog(newsletters, exports)
    for order_id in declined:
        shop.plan(order_id, ["declined"] * 20)
    for order in orders:
        checkout(order, shop)
    receipts_due = {order["id"] for order in orders} - declined

    def done() -> bool:  # every backlog job and every receipt due has run (retries may follow)
        events = shop.events()
        return (sum(e["job"] == "bulk" for e in events) == newsletters + exports
                and receipts_due <= {e["order"] for e in events if e["job"] == "receipt"})

    shop.work(timeout_s, done)
    rows = []
    for position, event in enumerate(shop.events(), start=1):
        rows.append({"position": position, "job": event["job"],
                     "what": event.get("label") or f"order {event['order']}",
                     "outcome": event.get("outcome", ""),
                     "checkout_jobs_waiting": event.get("waiting", 0),
                     "receipt_before_charge": event["job"] == "receipt" and not event["charged"]})
    return pd.DataFrame(rows)


__all__ = [
    "NAMESPACE", "PRIORITIES", "READY_MARGIN_S", "SCENARIOS", "CardDeclined", "CourseSimpleWorker", "CourseWorker",
    "GatewayTimeout", "IdempotencyKeyReused", "JobRun", "JobTimeout", "Shop", "WorkerProcess",
    "backlog_trial", "backoff_with_jitter", "bulk_task", "charge_card", "charge_order",
    "charge_order_once", "declined", "delays_between", "delivery_trial", "flaky", "io_task",
    "lab_orders", "latency_trial", "log_failure", "log_success", "process_task", "record",
    "registry_counts", "send_email", "send_receipt", "wait_for", "whoami",
]
