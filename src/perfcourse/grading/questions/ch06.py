"""Chapter 06, background jobs: queues, priorities, retries, idempotency, workers and forks.

Practical questions run the learner's code against the course's real Redis under a private key
prefix of the grader (``grader06:<random>:``) or private RQ queues (``grader06-<random>-high``
...), all deleted afterwards; no worker is needed. They are graded by behaviour the learner
cannot hard-code: charges made on a hidden sequence of deliveries, delays drawn for hidden
attempts and seeds (bounds and spread), and the queue each hidden task landed in.
"""

from __future__ import annotations

import random

from rq import Queue

from perfcourse.chapters.background_jobs import process_task

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    call_learner,
    need_function,
    short_repr,
    type_name,
)
from ..datasets import PrivateRedis

__all__ = [
    "QUESTIONS",
]


class _PrivateRedis(PrivateRedis):
    """A private prefix, plus the RQ queues (and their jobs) named after this run."""

    def __init__(self):
        super().__init__("grader06")

    def cleanup(self) -> None:
        for member in self.client.smembers("rq:queues"):
            name = member.decode(errors="replace")
            if f"grader06-{self.run}-" in name:
                Queue(name.removeprefix("rq:queue:"), connection=self.client).delete(
                    delete_jobs=True)
                self.client.srem("rq:queues", member)
        super().cleanup()
        self.delete_matching(f"rq:*grader06-{self.run}*")


# --------------------------------------------------------------------------------------------
# 06.q2: an idempotent charge


class _ChargeOnceCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("06.q2", charge_once)')
        rng = random.Random(6002)
        orders = {rng.randint(1000, 99_999): rng.randint(100, 50_000) for _ in range(8)}
        # Every order delivered 1 to 4 times, interleaved: retries and duplicate deliveries.
        deliveries = [o for o in orders for _ in range(rng.randint(1, 4))]
        rng.shuffle(deliveries)
        with _PrivateRedis() as redis_:
            ledger = redis_.prefix + "charges"
            first_seen: set[int] = set()
            for order_id in deliveries:
                charged = call_learner(answer, redis_.client, redis_.prefix, order_id,
                                       orders[order_id])
                expected = order_id not in first_seen
                first_seen.add(order_id)
                if not isinstance(charged, bool):
                    raise Incorrect(f"Return True when the order was charged, False for a "
                                    f"duplicate (got {short_repr(charged, 40)}).")
                if charged != expected:
                    raise Incorrect(
                        f"Delivery of order {order_id} returned {charged}, expected {expected}: "
                        "the first delivery charges (True), every later one is a duplicate "
                        "(False).")
            entries = [v.decode() for v in redis_.client.lrange(ledger, 0, -1)]
            expected_entries = sorted(f"{o}:{c}" for o, c in orders.items())
            if sorted(entries) != expected_entries:
                twice = sorted({e for e in entries if entries.count(e) > 1})
                raise Incorrect(
                    f"{len(deliveries)} deliveries of {len(orders)} orders left {len(entries)} "
                    f"charges in the ledger (expected {len(orders)}, one per order)"
                    + (f"; charged more than once: {', '.join(twice[:3])}." if twice else ".")
                    + " RPUSH f\"{order_id}:{amount_cents}\" to key_prefix + \"charges\" only "
                    "when SET NX on the order's idempotency key succeeded.")
            # A second process (another worker) must see the same keys: the state lives in Redis.
            again = call_learner(answer, redis_.client, redis_.prefix, deliveries[0],
                                 orders[deliveries[0]])
            if again is not False:
                raise Incorrect("A duplicate delivered later was charged again: keep the "
                                "idempotency key in Redis (not in a Python set), with a TTL "
                                "longer than any retry window.")
            keys = [k.decode() for k in redis_.client.scan_iter(match=redis_.prefix + "*")]
            if len(keys) < len(orders) + 1:
                raise Incorrect("Store one idempotency key per order under key_prefix "
                                "(e.g. key_prefix + f\"charged:{order_id}\") with SET NX.")

    def model_answer(self):
        return ("def charge_once(client, key_prefix, order_id, amount_cents):\n"
                "    key = f\"{key_prefix}charged:{order_id}\"\n"
                "    if not client.set(key, 1, nx=True, ex=86_400):\n"
                "        return False\n"
                "    client.rpush(f\"{key_prefix}charges\", f\"{order_id}:{amount_cents}\")\n"
                "    return True")


# --------------------------------------------------------------------------------------------
# 06.q3: exponential backoff with jitter


class _BackoffCheck(Checker):
    base_s, cap_s = 1.0, 60.0

    def grade(self, answer):
        need_function(answer, 'check("06.q3", retry_delay)')
        for attempt in (1, 2, 3, 4, 5, 6, 7, 9, 12, 20):
            ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
            delays = []
            for seed in range(40):
                rng = random.Random(6003 * 1000 + seed)
                delay = call_learner(answer, attempt, rng)
                if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                    raise Incorrect(f"Return the delay in seconds as a number (got a "
                                    f"{type_name(delay)}).")
                if not ceiling / 2 - 1e-9 <= delay <= ceiling + 1e-9:
                    raise Incorrect(
                        f"For attempt {attempt} you returned {delay:.3f} s; it must lie between "
                        f"{ceiling / 2:g} and {ceiling:g} s: half to all of min(cap, "
                        "base * 2**(attempt - 1)). Attempts count from 1.")
                delays.append(delay)
            if len(set(round(d, 9) for d in delays)) < 10:
                raise Incorrect(
                    f"For attempt {attempt}, 40 different seeds gave only {len(set(delays))} "
                    "distinct delays: draw the jitter from the rng you are given "
                    "(rng.uniform), so jobs that failed together retry apart.")
            if max(delays) - min(delays) < ceiling / 4:
                raise Incorrect(f"For attempt {attempt} the delays spread over less than a "
                                "quarter of the allowed range: use the whole upper half.")
        rng_a, rng_b = random.Random(7), random.Random(7)
        if call_learner(answer, 3, rng_a) != call_learner(answer, 3, rng_b):
            raise Incorrect("The same seed gave two different delays: use only the rng passed "
                            "in, not the random module or the clock.")

    def model_answer(self):
        return ("def retry_delay(attempt, rng, base_s=1.0, cap_s=60.0):\n"
                "    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))\n"
                "    return ceiling / 2 + rng.uniform(0, ceiling / 2)")


# --------------------------------------------------------------------------------------------
# 06.q4: route jobs to priority queues


def _tasks() -> list[dict]:
    rng = random.Random(6004)
    kinds = ["payment", "receipt", "report", "export", "welcome-email", "thumbnail", "refund"]
    tasks = []
    for i in range(24):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        tasks.append({"id": 6000 + i, "kind": kind, "user_waiting": rng.random() < 0.35})
    return tasks


def _expected_queue(task: dict) -> str:
    if task["kind"] in ("payment", "refund") or task["user_waiting"]:
        return "high"
    if task["kind"] in ("report", "export"):
        return "low"
    return "default"


class _RouteCheck(Checker):
    def grade(self, answer):


        need_function(answer, 'check("06.q4", enqueue_routed)')
        with _PrivateRedis() as redis_:
            queues = {name: Queue(f"grader06-{redis_.run}-{name}", connection=redis_.client)
                      for name in ("high", "default", "low")}
            tasks = _tasks()
            for task in tasks:
                job = call_learner(answer, queues, process_task, dict(task))
                if job is None or not hasattr(job, "id"):
                    raise Incorrect("Return the job that queue.enqueue gave back (got "
                                    f"{short_repr(job, 40)}).")
            landed = {}
            for name, queue in queues.items():
                for job in queue.get_jobs():
                    if job.func_name != "perfcourse.chapters.background_jobs.process_task" or len(job.args) != 1:
                        raise Incorrect(f"A job on {name} runs {job.func_name}{job.args}: "
                                        "enqueue func with the task as its one argument.")
                    landed[job.args[0]["id"]] = name
            if len(landed) != len(tasks):
                raise Incorrect(f"{len(tasks)} tasks, {len(landed)} jobs on the three queues: "
                                "enqueue each task exactly once.")
            for task in tasks:
                want, got = _expected_queue(task), landed[task["id"]]
                if want != got:
                    raise Incorrect(
                        f"A {task['kind']!r} task with user_waiting={task['user_waiting']} went "
                        f"to {got!r}, expected {want!r}: payments, refunds and anything a user "
                        "waits for are high; reports and exports low; the rest default.")
            for queue in queues.values():
                queue.delete(delete_jobs=True)

    def model_answer(self):
        return ("def enqueue_routed(queues, func, task):\n"
                "    if task[\"kind\"] in (\"payment\", \"refund\") or task[\"user_waiting\"]:\n"
                "        name = \"high\"\n"
                "    elif task[\"kind\"] in (\"report\", \"export\"):\n"
                "        name = \"low\"\n"
                "    else:\n"
                "        name = \"default\"\n"
                "    return queues[name].enqueue(func, task)")


QUESTIONS = [
    Question(
        id="06.q1",
        title="How do you implement background job processing? (interview question 8)",
        checker=MultiChoice(
            options={
                "a": "A Redis-backed queue with separate worker processes (Sidekiq; RQ or Celery "
                "in Python)",
                "b": "Several queues by priority, workers listening to the urgent ones first",
                "c": "Retries with exponential backoff, and jobs written to be idempotent",
                "d": "Monitoring: queue lengths, failed jobs and their errors, job durations",
                "e": "Cron-like scheduling that enqueues recurring jobs",
                "f": "A thread started in the request handler, so no extra process is needed",
                "g": "Retrying failed jobs immediately and forever until they pass",
            },
            correct={"a", "b", "c", "d", "e"},
            explanations={
                "f": "A thread dies with the web process (a deploy, a crash) and loses the job; "
                "it also competes with requests for that process. A queue in Redis survives and "
                "lets any worker pick the job up.",
                "g": "Immediate, endless retries hammer a service that is already failing; back "
                "off exponentially, cap the attempts, then park the job in the failed registry.",
            },
        ),
        explanation="The guide's five points, each run in this chapter: a Redis queue and "
        "worker processes, priority queues, retries with backoff (plus idempotency, so a retry "
        "is safe), monitoring through the registries, and scheduling.",
    ),
    Question(
        id="06.q2",
        title="An idempotent charge job",
        checker=_ChargeOnceCheck(),
        explanation="SET with NX is atomic in Redis: of any number of deliveries (retries, a "
        "worker that died after charging, a duplicate enqueue), exactly one creates the key and "
        "charges; the others see it and return. A Python set would be lost with the process and "
        "not shared between workers.",
        hints=("if not client.set(f\"{key_prefix}charged:{order_id}\", 1, nx=True, ex=86_400): "
               "return False; then RPUSH the charge and return True.",),
        time_limit=20.0,
    ),
    Question(
        id="06.q3",
        title="Exponential backoff with jitter",
        checker=_BackoffCheck(),
        explanation="The ceiling doubles per attempt up to a cap; drawing the delay from its "
        "upper half (equal jitter) keeps a minimum wait while spreading jobs that failed "
        "together, so they do not all retry in the same second.",
        hints=("ceiling = min(cap_s, base_s * 2 ** (attempt - 1)); return ceiling / 2 + "
               "rng.uniform(0, ceiling / 2)",),
    ),
    Question(
        id="06.q4",
        title="Route jobs to priority queues",
        checker=_RouteCheck(),
        explanation="The queue is chosen when the job is enqueued (Rails `queue_as`); a worker "
        "listening to high, default, low then always serves the urgent work first. Anything a "
        "user is waiting for, and money, goes to high; bulk work to low.",
        hints=("Pick the name with if/elif, then return queues[name].enqueue(func, task).",),
        time_limit=20.0,
    ),
    Question(
        id="06.q5",
        title="Forked work horses and database connections",
        checker=Choice(
            options={
                "a": "Nothing: SQLAlchemy engines are safe to share between processes",
                "b": "Dispose of the engine's inherited pool in the child (engine.dispose("
                "close=False)) or create connections in the job, never reuse the parent's",
                "c": "Use SimpleWorker in production so that nothing is forked",
                "d": "Open one connection at import time and share it through a global",
            },
            correct="b",
            explanations={
                "a": "The pool's sockets are copied into the child by fork; two processes then "
                "talk over one connection and their messages interleave.",
                "c": "SimpleWorker avoids forks but loses the isolation: a job that leaks "
                "memory or crashes takes the worker down with it, and it cannot kill a stuck "
                "job cleanly.",
                "d": "A global connection opened before the fork is exactly what gets shared "
                "by every work horse.",
            },
        ),
        explanation="RQ's default worker forks a work horse per job: the child inherits the "
        "parent's open sockets. As after gunicorn's fork (chapter 03), give the child its own "
        "connections: dispose the pool without closing the parent's sockets, or connect lazily.",
    ),
    Question(
        id="06.q6",
        title="A report every night at 04:00",
        checker=Choice(
            options={
                "a": "A job that ends with enqueue_in(timedelta(hours=24)) of itself",
                "b": "A cron entry (rq cron, rq-scheduler, Celery beat, or the system crontab) "
                "that enqueues the report job at 04:00; a worker runs it like any other job",
                "c": "A request handler that checks the clock on every request",
                "d": "time.sleep until 04:00 inside a worker",
            },
            correct="b",
            explanations={
                "a": "A self-rescheduling job drifts by its own run time each day and stops "
                "for good the first time it fails or is lost.",
                "c": "Requests are not a clock: nothing runs on a quiet night, and two requests "
                "at once would both start the report.",
                "d": "A sleeping job blocks a worker for hours and is lost on every deploy.",
            },
        ),
        explanation="Scheduling and execution are separate: a scheduler process enqueues at the "
        "cron time (Sidekiq-cron, whenever); workers run the job with the usual retries and "
        "monitoring.",
    ),
]
