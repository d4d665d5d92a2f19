"""Chapter 06, background jobs: queues, priorities, retries, idempotency, workers and forks.

Practical questions run the learner's code against the course's real Redis under a private key
prefix of the grader (``grader06:<random>:``) or private RQ queues (``grader06-<random>-high``
...), all deleted afterwards; no worker is needed. They are graded by behaviour the learner
cannot hard-code: refunds made on a hidden sequence of deliveries and on duplicates delivered
concurrently (a client that pauses after every read, so a check-then-act race always shows),
delays replayed draw by draw from hidden seeds, and the queue each hidden task landed in.

The lab's questions (06.q7-06.q9) grade one checkout handler three ways, each on a real RQ worker
of the grader's own shop (:meth:`perfcourse.chapters.background_jobs.JobRun.shop`, namespace
``grader06``): what had happened when the handler returned and which process did the work; the
charges per hidden order under gateway timeouts, lost answers, double clicks and redelivered
jobs; the order one worker ran a hidden backlog and the checkout jobs in, and whether a receipt
left before its charge. Reference answers are private to this module.
"""

from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager

from rq import Queue
from rq.job import JobStatus

from perfcourse.chapters.background_jobs import JobRun, process_task
from perfcourse.errors import BackendUnavailable
from perfcourse.services import redis_client

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    NoAnswer,
    call_learner,
    need_function,
    short_repr,
    time_limit,
    type_name,
    values_equal,
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
# 06.q2: an idempotent refund job, keyed by the refund request


#: Redis commands that only read: the grader's client pauses after each, as a busy server would
#: between a worker's GET and its SET, so a check-then-act sequence races every time.
_READS = frozenset({
    "get", "exists", "sismember", "smismember", "smembers", "scard", "hget", "hexists",
    "hgetall", "hkeys", "hlen", "lrange", "llen", "lindex", "lpos", "mget", "ttl", "pttl",
    "type", "keys", "scan", "scan_iter", "getbit", "strlen", "zscore", "zrange",
})
_RACE_PAUSE_S = 0.05


class _PausingClient:
    """The grader's Redis client for concurrent deliveries: every read command returns after a
    short pause. Atomic commands (SET NX, SETNX, INCR, a MULTI/EXEC pipeline) are unaffected."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name.lower() not in _READS or not callable(attr):
            return attr

        def paused(*args, **kwargs):
            value = attr(*args, **kwargs)
            time.sleep(_RACE_PAUSE_S)
            return value

        return paused


def _refunds(rng):
    """Hidden refund requests: (refund_id, order_id, amount_cents); some orders get several."""
    orders = [rng.randint(10_000, 99_999) for _ in range(5)]
    refunds = []
    for number in range(9):
        order_id = orders[number % len(orders)] if number < 7 else orders[0]
        refunds.append((f"rf-{rng.randint(100_000, 999_999)}-{number}", order_id,
                        rng.randint(100, 20_000)))
    return refunds


def _entry(refund):
    refund_id, order_id, amount_cents = refund
    return f"{refund_id}:{order_id}:{amount_cents}"


def _deliver_together(answer, client, prefix, refund, copies, seconds):
    """``copies`` threads, released together by a barrier, each delivering the same refund."""
    barrier = threading.Barrier(copies)
    results: list = [None] * copies
    errors: list = [None] * copies

    def deliver(slot):
        try:
            barrier.wait(timeout=5)
            with time_limit(seconds):
                results[slot] = call_learner(answer, client, prefix, *refund)
        except Incorrect as exc:
            errors[slot] = exc
        except threading.BrokenBarrierError:
            errors[slot] = Incorrect("The grader could not start the duplicate deliveries together.")

    threads = [threading.Thread(target=deliver, args=(slot,), daemon=True,
                                name=f"grader06-delivery-{slot}") for slot in range(copies)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds + 1
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise Incorrect(f"A delivery was still running after {seconds:g} s: look for a loop "
                        "that waits for a key that never appears.")
    for error in errors:
        if error is not None:
            raise error
    return results


class _RefundOnceCheck(Checker):
    copies = 4  # concurrent deliveries of one refund
    min_ttl_s = 86_400

    def _need_bool(self, value):
        if not isinstance(value, bool):
            raise Incorrect("Return True when this call refunded, False for a duplicate (got "
                            f"{short_repr(value, 40)}, a {type_name(value)}).")

    def grade(self, answer):
        need_function(answer, 'check("06.q2", refund_once)')
        rng = random.Random(6002)
        refunds = _refunds(rng)
        # Every refund delivered 1 to 3 times, interleaved: retries and duplicate deliveries.
        deliveries = [r for r in refunds for _ in range(rng.randint(1, 3))]
        rng.shuffle(deliveries)
        with _PrivateRedis() as redis_:
            ledger = redis_.prefix + "refunds"
            seen: set[str] = set()
            orders_refunded: set[int] = set()
            for refund in deliveries:
                refund_id, order_id, _ = refund
                done = call_learner(answer, redis_.client, redis_.prefix, *refund)
                self._need_bool(done)
                expected = refund_id not in seen
                if done != expected:
                    if expected and order_id in orders_refunded:
                        raise Incorrect(
                            f"Refund {refund_id!r} was delivered for the first time and you "
                            f"returned False: order {order_id} had another refund before. Key "
                            "the idempotency on the refund id, not the order id: an order may "
                            "be refunded in several parts.")
                    raise Incorrect(
                        f"Delivery of refund {refund_id!r} returned {done}, expected {expected}: "
                        "the first delivery of a refund id refunds (True), every later one is a "
                        "duplicate (False).")
                seen.add(refund_id)
                orders_refunded.add(order_id)
            entries = [v.decode() for v in redis_.client.lrange(ledger, 0, -1)]
            expected_entries = sorted(_entry(r) for r in refunds)
            if sorted(entries) != expected_entries:
                twice = sorted({e for e in entries if entries.count(e) > 1})
                raise Incorrect(
                    f"{len(deliveries)} deliveries of {len(refunds)} refunds left {len(entries)} "
                    f"entries in the ledger (expected {len(refunds)}, one per refund, each "
                    "f\"{refund_id}:{order_id}:{amount_cents}\" on key_prefix + \"refunds\")"
                    + (f"; refunded more than once: {', '.join(twice[:3])}." if twice else "."))
            keys = [k.decode() for k in redis_.client.scan_iter(match=redis_.prefix + "*")]
            markers = [k for k in keys if k != ledger]
            if len(markers) < len(refunds):
                raise Incorrect("Keep the idempotency state in Redis, one key per refund id under "
                                "key_prefix (not in a Python set: a second worker process would "
                                "not see it, and it is lost on restart).")
            for key in markers:
                ttl = redis_.client.ttl(key)
                if ttl == -1:
                    raise Incorrect(f"The key {key[len(redis_.prefix):]!r} never expires: give "
                                    "each idempotency key an expiry (SET ... NX EX), at least a "
                                    "day, so they do not pile up forever.")
                if 0 <= ttl < self.min_ttl_s - 60:
                    raise Incorrect(f"The key {key[len(redis_.prefix):]!r} expires after {ttl} s: "
                                    "keep it at least a day (86 400 s), longer than any retry "
                                    "window, or a late retry refunds again.")
            # Duplicates delivered at the same moment by several workers.
            racing = [(f"rf-race-{rng.randint(100_000, 999_999)}-{n}", rng.randint(10_000, 99_999),
                       rng.randint(100, 20_000)) for n in range(3)]
            client = _PausingClient(redis_.client)
            for refund in racing:
                results = _deliver_together(answer, client, redis_.prefix, refund, self.copies,
                                            seconds=5.0)
                for value in results:
                    self._need_bool(value)
                count = redis_.client.lrange(ledger, 0, -1).count(_entry(refund).encode())
                if count != 1 or results.count(True) != 1:
                    raise Incorrect(
                        f"{self.copies} workers delivered refund {refund[0]!r} at the same "
                        f"moment: it was refunded {count} times and {results.count(True)} "
                        "deliveries returned True. Checking first (GET or EXISTS) and then "
                        "setting is a race: both workers see no key. Claim the key in one atomic "
                        "command, SET with nx=True, and refund only if it succeeded.")

    def model_answer(self):
        return ("def refund_once(client, key_prefix, refund_id, order_id, amount_cents):\n"
                "    key = f\"{key_prefix}refund:{refund_id}\"\n"
                "    if not client.set(key, 1, nx=True, ex=7 * 86_400):\n"
                "        return False\n"
                "    client.rpush(f\"{key_prefix}refunds\", f\"{refund_id}:{order_id}:{amount_cents}\")\n"
                "    return True")


# --------------------------------------------------------------------------------------------
# 06.q3: decorrelated jitter, capped


def _decorrelated(previous_s, rng, base_s, cap_s):
    return min(cap_s, rng.uniform(base_s, 3 * previous_s))


def _decorrelated_mirrored(previous_s, rng, base_s, cap_s):  # the same draw, bounds swapped
    return min(cap_s, rng.uniform(3 * previous_s, base_s))


def _uncapped(previous_s, rng, base_s, cap_s):
    return rng.uniform(base_s, 3 * previous_s)


def _cap_inside(previous_s, rng, base_s, cap_s):
    return rng.uniform(base_s, min(cap_s, 3 * previous_s))


def _times_two(previous_s, rng, base_s, cap_s):
    return min(cap_s, rng.uniform(base_s, 2 * previous_s))


def _from_zero(previous_s, rng, base_s, cap_s):
    return min(cap_s, rng.uniform(0, 3 * previous_s))


def _from_base_only(previous_s, rng, base_s, cap_s):
    return min(cap_s, rng.uniform(base_s, 3 * base_s))


def _no_jitter(previous_s, rng, base_s, cap_s):
    return min(cap_s, 3 * previous_s)


_BACKOFF_MISTAKES = (
    (_no_jitter, "There is no jitter: draw the delay with rng.uniform(base_s, 3 * previous_s)."),
    (_uncapped, "The delay is not capped: return min(cap_s, the drawn delay)."),
    (_cap_inside, "Cap the drawn delay, min(cap_s, rng.uniform(base_s, 3 * previous_s)), not "
     "the upper bound of the draw: they differ once 3 * previous_s passes the cap."),
    (_times_two, "The upper bound of the draw is 3 * previous_s, not 2 * previous_s."),
    (_from_zero, "The lower bound of the draw is base_s, not 0: every retry waits at least base_s."),
    (_from_base_only, "Grow from the previous delay: the upper bound is 3 * previous_s, not "
     "3 * base_s."),
)

#: Hidden (base_s, cap_s) settings and seeds; the chain starts with previous_s = base_s.
_BACKOFF_SETTINGS = ((1.0, 30.0), (0.5, 20.0), (2.0, 90.0), (0.25, 5.0))


class _DecorrelatedJitterCheck(Checker):
    retries = 14

    def grade(self, answer):
        need_function(answer, 'check("06.q3", retry_delay)')
        for base_s, cap_s in _BACKOFF_SETTINGS:
            for seed in range(6003, 6003 + 5):
                rng_learner, rng_reference = random.Random(seed), random.Random(seed)
                previous = base_s
                for retry in range(1, self.retries + 1):
                    state = rng_reference.getstate()
                    expected = _decorrelated(previous, rng_reference, base_s, cap_s)
                    got = call_learner(answer, previous, rng_learner, base_s=base_s, cap_s=cap_s)
                    if isinstance(got, bool) or not isinstance(got, (int, float)):
                        raise Incorrect("Return the delay in seconds as a number (got a "
                                        f"{type_name(got)}).")
                    mirrored = _decorrelated_mirrored(previous, _replay(state), base_s, cap_s)
                    if values_equal(got, expected) or values_equal(got, mirrored):
                        if rng_learner.getstate() != rng_reference.getstate():
                            raise Incorrect(
                                "Right delays so far, but your code drew more than one number "
                                "from rng: draw once per call, so a retry's delay depends only "
                                "on the seed and the previous delay.")
                        previous = got
                        continue
                    shown = (f"retry_delay({previous:g}, rng, base_s={base_s:g}, "
                             f"cap_s={cap_s:g}) (retry {retry} of a hidden chain)")
                    if rng_learner.getstate() == state:
                        hint = _first_mistake(got, (previous, None, base_s, cap_s), _BACKOFF_MISTAKES[:1])
                        raise Incorrect(
                            f"{shown} returned {got:g} without drawing from the rng passed in."
                            + (hint or " Draw the random part with rng.uniform(...), not the "
                               "random module or the clock, so the grader can replay it."))
                    hint = ""
                    if rng_learner.getstate() != rng_reference.getstate():
                        hint = (" Your code drew more than one number from rng: draw once per "
                                "call, rng.uniform(base_s, 3 * previous_s).")
                    for mistake, text in _BACKOFF_MISTAKES[1:] if not hint else ():
                        if values_equal(got, mistake(previous, _replay(state), base_s, cap_s)):
                            hint = " " + text
                            break
                    raise Incorrect(f"{shown} returned {got:g}; the same draw gives {expected:g}."
                                    + (hint or " Return min(cap_s, rng.uniform(base_s, 3 * "
                                       "previous_s)), one draw per call."))

    def model_answer(self):
        return ("def retry_delay(previous_s, rng, base_s=1.0, cap_s=30.0):\n"
                "    return min(cap_s, rng.uniform(base_s, 3 * previous_s))")


def _replay(state):
    rng = random.Random()
    rng.setstate(state)
    return rng


def _first_mistake(got, args, mistakes):
    for mistake, hint in mistakes:
        try:
            made = mistake(*args)
        except Exception:  # noqa: BLE001 - a mistake that does not apply to this input
            continue
        if values_equal(got, made):
            return " " + hint
    return ""


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
                    if job.args[0]["id"] in landed:
                        raise Incorrect(f"Task {job.args[0]['id']} was enqueued twice (on "
                                        f"{landed[job.args[0]['id']]!r} and {name!r}): enqueue "
                                        "each task exactly once, on one queue.")
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


# --------------------------------------------------------------------------------------------
# The lab (06.q7-06.q9): one checkout handler, graded three ways on a real worker
#
# Each check builds a shop of its own (queues grader06-<run>-high/default/low, keys
# grader06:<run>:shop:), calls the learner's checkout(order, shop) for hidden orders, runs one
# real RQ worker on high, default, low (with a scheduler, for retries with an interval) until
# the queues settle, reads what the jobs recorded, and deletes it all.

_LAB_SETTLE_S = 12.0


@contextmanager
def _lab_shop(**settings):
    try:
        client = redis_client()
    except BackendUnavailable as exc:
        raise Incorrect(f"This check needs Redis and cannot reach it. {exc}") from None
    run = JobRun(client, namespace="grader06")
    try:
        shop = run.shop("shop", **settings)
        yield shop
    finally:
        try:
            _quiet(client, run)
            run.cleanup()
        finally:
            client.close()


def _quiet(client, run, still_s: float = 0.15, limit_s: float = 2.0) -> None:
    """Wait (a little) until nothing writes under the run's keys any more: a thread the learner's
    checkout started may still be charging or mailing, and must not write after the clean-up."""
    keys = [run.key(f"shop:{name}") for name in ("events", "outbox", "ledger", "gateway:calls")]
    deadline = time.monotonic() + limit_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        sizes = [client.llen(key) for key in keys]
        if sizes != last:
            last, since = sizes, time.monotonic()
        elif time.monotonic() - since >= still_s:
            return
        time.sleep(0.03)


def _hidden_orders(rng: random.Random, count: int) -> list[dict]:
    ids = rng.sample(range(20_000, 99_999), count)
    return [{"id": order_id, "amount_cents": rng.randint(500, 90_000),
             "email": f"customer{rng.randint(1000, 9999)}@shop.test"} for order_id in ids]


def _call_checkout(answer, order, shop, when="", threads=None):
    def calling(*args):
        if threads is not None:  # the thread the learner's code runs in (call_learner may use one)
            threads.add(threading.get_ident())
        return answer(*args)

    calls = shop.gateway_calls()
    try:
        return call_learner(calling, dict(order), shop)
    except NoAnswer:
        raise
    except Incorrect as exc:
        if shop.gateway_calls() > calls:  # the gateway failed inside the request
            raise Incorrect(_inline_hint("charge (the payment gateway was called)", order)
                            + " (06.q7)") from None
        if "pickle" in str(exc):
            exc = Incorrect(f"{exc} A job's arguments are pickled into Redis: pass shop.key, ids, "
                            "numbers and strings, not the shop or other live objects.")
        raise Incorrect(f"{when}{exc}" if when else str(exc)) from None


def _short(job_name: str) -> str:
    return job_name.rsplit(".", 1)[-1]


def _origins(shop) -> dict[str, set[str]]:
    """Queue (high, default, low) each kind of job went to, by function name."""
    by_name = {queue.name: name for name, queue in shop.queues.items()}
    found: dict[str, set[str]] = {}
    for job in shop.jobs():
        found.setdefault(_short(job.func_name), set()).add(by_name.get(job.origin, job.origin))
    return found


def _need_jobs_enqueued(shop, order, besides: str = "") -> None:
    if not [job for job in shop.jobs() if _short(job.func_name) != besides]:
        raise Incorrect(
            f"checkout({short_repr(order, 80)}, shop) put no job on the queues of the shop it was "
            "given: enqueue on shop.queues[\"high\"] (or \"default\", \"low\"), the shop passed as "
            "the second argument, not a queue of your own.")


def _inline_hint(what: str, order) -> str:
    return (f"checkout returned after the {what} of order {order['id']} had already happened: the "
            "customer waited for it. Enqueue the job instead of calling it: "
            "shop.queues[...].enqueue(jobs.charge_card, shop.key, ...) passes the function and its "
            "arguments to a worker; jobs.charge_card(shop.key, ...) runs it in the request (and so "
            "does enqueue(jobs.charge_card(...)), which enqueues its result).")


def _last_failure(shop, func: str, order_id=None) -> str:
    for job in shop.jobs():
        if _short(job.func_name) != func or job.get_status(refresh=True) != JobStatus.FAILED:
            continue
        if order_id is not None and order_id not in (list(job.args) + list(job.kwargs.values())):
            continue
        result = job.latest_result()
        if result is not None and result.exc_string:
            return result.exc_string.strip().splitlines()[-1]
    return ""


_THREAD_HINT = (
    "The {what} of order {order} ran in the web process (the one that called checkout), in another "
    "thread: a thread of the request's process is not a background job (it dies with the process "
    "on a deploy, is lost when it fails, and competes with requests). Enqueue it on the shop's "
    "queues for a worker.")


def _check_run_in_workers(shop, events) -> None:
    here = [e for e in events if e["pid"] == os.getpid()]
    if here:
        raise Incorrect(_THREAD_HINT.format(what=here[0]["job"], order=here[0]["order"]))


def _settle(shop, done=None) -> bool:
    """Let the shop's worker run until the queues settle (or ``done()``), giving up early when all
    that is left are retries scheduled past the deadline; whether nothing is left scheduled."""
    deadline = time.time() + _LAB_SETTLE_S

    def finished():
        if done is not None and done():
            return True
        due = shop.next_due()
        return (due is not None and time.time() + due > deadline
                and not any(q.count or q.started_job_registry.count for q in shop.queues.values()))

    shop.settle(_LAB_SETTLE_S, finished)
    return shop.next_due() is None or (done is not None and done())


def _settle_hint(shop) -> str:
    scheduled = sum(q.scheduled_job_registry.count for q in shop.queues.values())
    if scheduled:
        return (f" {scheduled} job(s) were still scheduled for a retry later than the grader waits "
                f"({_LAB_SETTLE_S:g} s): keep the retry intervals short in this lab (1 or 2 s; the "
                "gateway recovers at once).")
    return ""


class _OffloadCheck(Checker):
    """06.q7: the handler does no slow work inline, and the work still happens, in a worker."""

    def grade(self, answer):
        need_function(answer, 'check("06.q7", checkout)')
        orders = _hidden_orders(random.Random(6007), 5)
        with _lab_shop(gateway_s=0.01, mail_s=0.01) as shop:
            for order in orders:
                calls, mails, threads = shop.gateway_calls(), len(shop.outbox()), set()
                response = _call_checkout(answer, order, shop, threads=threads)
                callers = shop.gateway_callers(calls)
                if any(pid == os.getpid() and thread not in threads for pid, thread in callers):
                    raise Incorrect(_THREAD_HINT.format(what="charge", order=order["id"]))
                if callers:
                    raise Incorrect(_inline_hint("charge (the payment gateway was called)", order))
                if len(shop.outbox()) > mails:
                    raise Incorrect(_inline_hint("receipt mail", order))
                if not isinstance(response, dict) or response.get("order_id") != order["id"]:
                    raise Incorrect(
                        f"checkout returned {short_repr(response, 60)} for order {order['id']}: return "
                        f"the response, a dict {{\"order_id\": {order['id']}, \"status\": \"processing\"}}.")
                if response.get("status") != "processing":
                    raise Incorrect(
                        f"checkout answered status {short_repr(response.get('status'), 30)}: when it "
                        "returns, the charge has not run yet, so the page cannot say \"paid\"; answer "
                        "\"processing\" (the receipt tells the customer when it is paid).")
            _need_jobs_enqueued(shop, orders[0])
            worker = shop.start_worker()
            try:
                settled = _settle(shop)
            finally:
                worker.stop()
            time.sleep(0.05)  # a thread the handler started gets the time to write down its work
            events = shop.events()
            _check_run_in_workers(shop, events)
            charges = {order_id: amount for order_id, amount, _ in shop.ledger()}
            mailed = shop.outbox()
            for order in orders:
                if order["id"] not in charges:
                    failure = _last_failure(shop, "charge_card")
                    raise Incorrect(
                        f"After the worker ran, order {order['id']} was never charged: enqueue "
                        "jobs.charge_card(shop.key, order[\"id\"], order[\"amount_cents\"], ...) for each "
                        "checkout." + (f" A charge job failed: {failure}." if failure else "")
                        + ("" if settled else _settle_hint(shop)))
                if charges[order["id"]] != order["amount_cents"]:
                    raise Incorrect(f"Order {order['id']} was charged {charges[order['id']]} cents "
                                    f"instead of its amount_cents, {order['amount_cents']}.")
                receipt = f"receipt for order {order['id']} to {order['email']}"
                if receipt not in mailed:
                    failure = _last_failure(shop, "send_receipt")
                    raise Incorrect(
                        f"After the worker ran, no receipt was mailed for order {order['id']} to "
                        f"{order['email']}: enqueue jobs.send_receipt(shop.key, order[\"id\"], "
                        "order[\"email\"]) too." + (f" A receipt job failed: {failure}." if failure else "")
                        + ("" if settled else _settle_hint(shop)))

    def model_answer(self):
        return _LAB_MODEL_ANSWER


_LAB_MODEL_ANSWER = (
    "def checkout(order, shop):\n"
    "    charge = shop.queues[\"high\"].enqueue(\n"
    "        jobs.charge_card, shop.key, order[\"id\"], order[\"amount_cents\"],\n"
    "        idempotency_key=f\"charge-order-{order['id']}\",  # the same for every delivery\n"
    "        retry=Retry(max=3, interval=1))\n"
    "    shop.queues[\"high\"].enqueue(jobs.send_receipt, shop.key, order[\"id\"], order[\"email\"],\n"
    "                                depends_on=charge)  # only once the charge went through\n"
    "    return {\"order_id\": order[\"id\"], \"status\": \"processing\"}")

#: What goes wrong per hidden order in 06.q8, and what the gateway does on its calls.
_DELIVERY_PLANS = {"plain": [], "timeout": ["timeout"], "timeout twice": ["timeout", "timeout"],
                   "answer lost": ["lost"], "timeout, then answer lost": ["timeout", "lost"],
                   "double click": [], "redelivered": []}
#: The order in which mistakes are reported: missing charges first (retries), then doubles.
_DELIVERY_ORDER = ("timeout", "timeout twice", "timeout, then answer lost", "plain", "answer lost",
                   "double click", "redelivered")


class _ExactlyOnceCheck(Checker):
    """06.q8: every order charged exactly once, under gateway failures and duplicate deliveries."""

    def grade(self, answer):
        need_function(answer, 'check("06.q8", checkout)')
        rng = random.Random(6008)
        scenarios = [s for s in _DELIVERY_PLANS for _ in range(1 if s in ("plain", "timeout, then answer lost") else 2)]
        orders = _hidden_orders(rng, len(scenarios))
        rng.shuffle(scenarios)
        scenario = {order["id"]: s for order, s in zip(orders, scenarios)}
        with _lab_shop() as shop:
            for order in orders:
                shop.plan(order["id"], _DELIVERY_PLANS[scenario[order["id"]]])
            for order in orders:
                _call_checkout(answer, order, shop)
                if scenario[order["id"]] == "double click":
                    _call_checkout(answer, order, shop, when=(
                        f"checkout was called a second time for order {order['id']} (a double "
                        "click; the page must answer it too): "))
            if shop.gateway_calls():
                raise Incorrect(_inline_hint("charge (the payment gateway was called)", orders[0])
                                + " (06.q7)")
            _need_jobs_enqueued(shop, orders[0])
            worker = shop.start_worker()
            try:
                settled = _settle(shop)
                if settled:
                    shop.redeliver(o for o, s in scenario.items() if s == "redelivered")
                    settled = _settle(shop)
            finally:
                worker.stop()
            events = shop.events()
            _check_run_in_workers(shop, events)
            self._verdict(shop, orders, scenario, events, settled)

    def _verdict(self, shop, orders, scenario, events, settled):
        charges, amounts = shop.charges(), {o: a for o, a, _ in shop.ledger()}
        calls = {}
        reused = []
        for event in events:
            if event["job"] == "charge":
                calls[event["order"]] = calls.get(event["order"], 0) + 1
                if event["outcome"] == "key reused":
                    reused.append(event["order"])
        for kind in _DELIVERY_ORDER:
            for order in (o for o in orders if scenario[o["id"]] == kind):
                order_id, count = order["id"], charges[order["id"]]
                if count == 0:
                    if order_id in reused:
                        raise Incorrect(
                            f"Order {order_id} was never charged: the gateway refused its idempotency "
                            "key, already used for another order. One key per order: build it from "
                            "the order id, e.g. f\"charge-order-{order['id']}\".")
                    failures = _DELIVERY_PLANS[kind].count("timeout")
                    if failures:
                        raise Incorrect(
                            f"Order {order_id} was never charged: the gateway timed out {failures} "
                            f"time(s) in a row before charging, and the charge job ran "
                            f"{calls.get(order_id, 0)} time(s), then gave up. Let RQ retry it: "
                            "enqueue(..., retry=Retry(max=3, interval=1)); the gateway times out at "
                            "most twice in a row." + ("" if settled else _settle_hint(shop)))
                    failure = _last_failure(shop, "charge_card", order_id)
                    raise Incorrect(f"Order {order_id} was never charged."
                                    + (f" Its charge job failed: {failure}." if failure else "")
                                    + ("" if settled else _settle_hint(shop)))
                if amounts[order_id] != order["amount_cents"]:
                    raise Incorrect(f"Order {order_id} was charged {amounts[order_id]} cents instead of "
                                    f"its amount_cents, {order['amount_cents']}.")
                if count > 1:
                    raise Incorrect(f"Order {order_id} was charged {count} times: " + _twice_hint(kind))

    def model_answer(self):
        return _LAB_MODEL_ANSWER


def _twice_hint(kind: str) -> str:
    if kind == "double click":
        return ("checkout ran twice for it (a double click) and each charge looked new to the "
                "gateway. Send the gateway an idempotency_key that is the same for every checkout "
                "of one order: build it from the order id, not from uuid4(), the time or a job id.")
    if kind == "redelivered":
        return ("its charge job was delivered twice (as when a worker dies after the charge, "
                "before it reports the job done) and the gateway could not tell. Pass an "
                "idempotency_key with the job (enqueue(..., idempotency_key=...)) that names the "
                "order, so the gateway answers the second run with the first charge.")
    return ("the gateway charged it, then the answer was lost (a timeout), and the retry charged "
            "again. Pass an idempotency_key that names the order: the gateway answers a retry with "
            "the first charge instead of charging again.")


class _PriorityCheck(Checker):
    """06.q9: one worker on high, default, low with a backlog: no checkout job waits behind it,
    and no receipt leaves before its charge went through."""

    def grade(self, answer):
        need_function(answer, 'check("06.q9", checkout)')
        rng = random.Random(6009)
        orders = _hidden_orders(rng, 5)
        declined = orders[rng.randrange(1, 4)]["id"]
        newsletters, exports = rng.randint(5, 7), rng.randint(3, 5)
        with _lab_shop(bulk_s=0.03) as shop:
            shop.enqueue_backlog(newsletters, exports)
            shop.plan(declined, ["declined"] * 20)
            for order in orders:
                _call_checkout(answer, order, shop)
            if shop.gateway_calls():
                raise Incorrect(_inline_hint("charge (the payment gateway was called)", orders[0])
                                + " (06.q7)")
            _need_jobs_enqueued(shop, orders[0], besides="bulk_task")
            due = {order["id"] for order in orders} - {declined}

            def done():
                events = shop.events()
                return (sum(e["job"] == "bulk" for e in events) == newsletters + exports
                        and due <= {e["order"] for e in events if e["job"] == "receipt"})

            worker = shop.start_worker()
            try:
                settled = _settle(shop, done)
            finally:
                worker.stop()
            events = shop.events()
            _check_run_in_workers(shop, events)
            origins = _origins(shop)
            for event in events:
                if event["job"] == "bulk" and event["waiting"]:
                    raise Incorrect(
                        f"The worker (on high, default, low) started {event['label']} of the nightly "
                        f"backlog while {event['waiting']} checkout job(s) were waiting in the queues: "
                        + _where_hint(origins))
                if event["job"] == "receipt" and not event["charged"]:
                    if event["order"] == declined:
                        raise Incorrect(
                            f"A receipt was mailed for order {event['order']}, whose card was declined "
                            "(the charge never went through). Make the receipt wait for the charge: "
                            "enqueue it with depends_on=<the charge job>; RQ queues it only once the "
                            "charge has succeeded, and never if it fails for good.")
                    raise Incorrect(
                        f"The receipt of order {event['order']} was mailed before its charge went "
                        "through. Make it wait for the charge: enqueue it with depends_on=<the "
                        "charge job> (enqueue returns the job).")
            charged = shop.charges()
            mailed = {e["order"] for e in events if e["job"] == "receipt"}
            for order in orders:
                if order["id"] != declined and not charged[order["id"]]:
                    raise Incorrect(f"Order {order['id']} was never charged (06.q7 and 06.q8 first)."
                                    + ("" if settled else _settle_hint(shop)))
                if order["id"] != declined and order["id"] not in mailed:
                    failure = _last_failure(shop, "send_receipt")
                    raise Incorrect(f"Order {order['id']} was charged but no receipt was mailed."
                                    + (f" A receipt job failed: {failure}." if failure else "")
                                    + ("" if settled else _settle_hint(shop)))

    def model_answer(self):
        return _LAB_MODEL_ANSWER


def _where_hint(origins: dict[str, set[str]]) -> str:
    late = [f"{'charges' if name == 'charge_card' else 'receipts'} on {', '.join(sorted(queues - {'high'}))}"
            for name, queues in sorted(origins.items())
            if name in ("charge_card", "send_receipt") and queues - {"high"}]
    where = f" ({'; '.join(late)})" if late else ""
    return (f"they sat behind the newsletters (default) or the exports (low){where}. A customer "
            "waits for the charge and for the receipt; nobody waits for the backlog: put both on "
            "high.")


QUESTIONS = [
    Question(
        id="06.q1",
        title="How do you implement background job processing? (interview question 8)",
        checker=MultiChoice(
            options={
                "a": "A Redis-backed queue with separate worker processes that import the jobs by name",
                "b": "A thread pool inside the web process, so jobs start at once and need no broker",
                "c": "Several queues by priority, with workers listening to the urgent ones first",
                "d": "Pass the ORM objects themselves as job arguments, so the job needs no query",
                "e": "Retries with exponential backoff and jitter, and jobs written to be idempotent",
                "f": "Monitoring of queue lengths, failed jobs with their tracebacks, and job durations",
                "g": "Retry a failed job at once and until it passes, so a transient error loses no work",
                "h": "One scheduler process that enqueues the recurring jobs on a cron timetable",
            },
            correct={"a", "c", "e", "f", "h"},
            explanations={
                "b": "A thread in the web process dies with it (a deploy, a crash) and loses the "
                "job, and it competes with requests for that process. A queue in Redis survives "
                "and lets any worker pick the job up.",
                "d": "Arguments are pickled into Redis when the job is enqueued: the job would "
                "work on a stale copy, and large. Pass ids (send_welcome(user_id)) and load fresh "
                "data when the job runs.",
                "g": "Immediate, endless retries hammer a service that is already failing; back "
                "off exponentially with jitter, cap the attempts, then park the job in the "
                "failed registry.",
            },
        ),
        explanation="The guide's five points, each run in this chapter: a Redis queue and "
        "worker processes, priority queues, retries with backoff (plus idempotency, so a retry "
        "is safe), monitoring through the registries, and scheduling.",
    ),
    Question(
        id="06.q2",
        title="An idempotent refund job, keyed by the refund request",
        checker=_RefundOnceCheck(),
        explanation="SET with NX is one atomic command in Redis: of any number of deliveries "
        "(retries, a worker that died after refunding, two workers at once) exactly one creates "
        "the key and refunds. Checking with GET first and then setting leaves a gap in which a "
        "second worker sees no key too. The key is the refund request, since one order may be "
        "refunded in parts, and it expires once no retry can arrive.",
        hints=("key = f\"{key_prefix}refund:{refund_id}\"; if not client.set(key, 1, nx=True, "
               "ex=7 * 86_400): return False; then RPUSH the entry and return True.",),
        time_limit=15.0,
    ),
    Question(
        id="06.q3",
        title="Decorrelated jitter, capped",
        checker=_DecorrelatedJitterCheck(),
        explanation="Each delay is drawn between the base and three times the previous delay, "
        "then capped: it grows about exponentially, jobs that failed together drift apart at "
        "once (each chain depends on its own draws), and the cap bounds the longest wait.",
        hints=("return min(cap_s, rng.uniform(base_s, 3 * previous_s))",),
    ),
    Question(
        id="06.q4",
        title="Route jobs to priority queues",
        checker=_RouteCheck(),
        explanation="The queue is chosen when the job is enqueued (Rails `queue_as`); a worker "
        "listening to high, default, low then always serves the urgent work first. Anything a "
        "user is waiting for, and money, goes to high; bulk work to low.",
        hints=("Pick the name with if/elif, then return queues[name].enqueue(func, task).",),
        time_limit=15.0,
    ),
    Question(
        id="06.q5",
        title="Forked work horses and database connections",
        checker=Choice(
            options={
                "a": "Nothing: the work horse gets its own copy of the engine, so its pool is private",
                "b": "Reset the inherited pool in the horse with engine.dispose(close=False), or connect in the job",
                "c": "Call engine.dispose() in the horse, so the inherited connections are closed first",
                "d": "Open one connection when the worker starts and share it with every job as a global",
            },
            correct="b",
            explanations={
                "a": "The pool's sockets are copied into the child by fork, not reopened: two "
                "processes then talk over one connection and their messages interleave.",
                "c": "Closing in the child sends the database a goodbye on the socket the worker "
                "still uses: on PostgreSQL that ends the parent's session. Forget the inherited "
                "connections without closing them.",
                "d": "A connection opened before the fork is exactly what every work horse "
                "inherits and shares.",
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
                "a": "A scheduler process (rq cron, Celery beat, crontab) that enqueues the report job at 04:00",
                "b": "A report job that ends by enqueueing itself again with enqueue_in(timedelta(hours=24))",
                "c": "A check in the request handler that enqueues the report once the clock passes 04:00",
                "d": "A long-running job that calls time.sleep until 04:00, then builds the report itself",
            },
            correct="a",
            explanations={
                "b": "A self-rescheduling job drifts by its own run time each day and stops "
                "for good the first time it fails or is lost.",
                "c": "Requests are not a clock: nothing runs on a quiet night, and two requests "
                "at once would both enqueue the report.",
                "d": "A sleeping job blocks a worker for hours and is lost on every deploy.",
            },
        ),
        explanation="Scheduling and execution are separate: one scheduler process enqueues at "
        "the cron time (Sidekiq-cron, whenever); workers run the job with the usual retries and "
        "monitoring.",
    ),
    Question(
        id="06.q7",
        title="Lab: the checkout answers before the slow work",
        checker=_OffloadCheck(),
        explanation="The response needs neither the charge nor the mail: enqueuing both is one "
        "Redis round trip each, and a worker does the slow calls after the request has answered. "
        "The handler passes the function and its arguments (enqueue(jobs.charge_card, ...)); "
        "calling it, or a thread of the web process, keeps the work in the request's process. "
        "The page can only say \"processing\": the receipt confirms the payment later.",
        hints=("shop.queues[\"high\"].enqueue(jobs.charge_card, shop.key, order[\"id\"], "
               "order[\"amount_cents\"]), the same for jobs.send_receipt(shop.key, order[\"id\"], "
               "order[\"email\"]), then return {\"order_id\": order[\"id\"], \"status\": "
               "\"processing\"}.",),
        time_limit=15.0,
    ),
    Question(
        id="06.q8",
        title="Lab: each order charged exactly once",
        checker=_ExactlyOnceCheck(),
        explanation="Delivery is at least once, and a call that times out may have charged. "
        "Retries (Retry(max=3, interval=1)) make sure a charge that failed before charging is "
        "made; an idempotency key that names the order (f\"charge-order-{id}\"), the same for "
        "every delivery, every retry and every double click, lets the gateway answer the "
        "repeats with the first charge instead of charging again (Stripe's Idempotency-Key). A "
        "key made of uuid4(), the time or the job id changes between deliveries and protects "
        "nothing.",
        hints=("Add retry=Retry(max=3, interval=1) and idempotency_key=f\"charge-order-{order['id']}\" "
               "to the enqueue of jobs.charge_card.",),
        time_limit=15.0,
    ),
    Question(
        id="06.q9",
        title="Lab: checkout jobs before the backlog, the receipt after its charge",
        checker=_PriorityCheck(),
        explanation="One worker listening to high, default, low takes the first non-empty queue "
        "each time: whatever a customer waits for (the charge, the receipt) goes to high, so the "
        "nightly backlog on default and low never delays it. depends_on=charge keeps the receipt "
        "deferred until its charge has succeeded (and forever if the card is declined); RQ then "
        "queues it on its own queue.",
        hints=("Keep the job that enqueue returns for the charge, and enqueue the receipt on "
               "shop.queues[\"high\"] with depends_on=that job.",),
        time_limit=15.0,
    ),
]
