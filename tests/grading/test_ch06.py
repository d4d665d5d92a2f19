"""Grader tests for chapter 06 (background jobs): right answers written another way pass, plausible
wrong ones fail with a hint naming the mistake. Runs against the course's Redis; every check uses
a private key prefix and private queues that it deletes itself (checked at the end)."""

from __future__ import annotations

import random
import threading
import uuid

import pytest
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError

from perfcourse.chapters import background_jobs as jobs
from perfcourse.services import redis_client

from .kit import fails, passes

# --------------------------------------------------------------------------------------------
# Choice questions

CHOICES = {
    "06.q5": ("b", {"a": "copied into the child", "c": "ends the parent's session",
                    "d": "inherits and shares"}),
    "06.q6": ("a", {"b": "drifts", "c": "not a clock", "d": "blocks a worker"}),
}


@pytest.mark.parametrize("qid", sorted(CHOICES))
@pytest.mark.parametrize("form", [str.upper, lambda k: f" {k} "], ids=["upper", "spaces"])
def test_choice_right_key_passes(qid, form):
    passes(qid, form(CHOICES[qid][0]))


@pytest.mark.parametrize(("qid", "key", "why"), [
    pytest.param(qid, key, why, id=f"{qid}-{key}")
    for qid, (_, wrong) in sorted(CHOICES.items()) for key, why in sorted(wrong.items())
])
def test_choice_wrong_key_fails_with_its_explanation(qid, key, why):
    fails(qid, key, why)


def test_multi_choice_q1():
    passes("06.q1", {"A", "c", "e", "f", "h"})
    passes("06.q1", " a, c, e, f, h ")
    fails("06.q1", {"a", "b", "c", "e", "f", "h"}, "dies with it")
    fails("06.q1", {"a", "c", "d", "e", "f", "h"}, "pass ids")
    fails("06.q1", {"a", "c", "e", "f", "g", "h"}, "back off")
    fails("06.q1", {"a", "c", "e", "f"}, "1 more option")
    fails("06.q1", {"a", "b", "c", "d", "e"}, "dies with it")  # the old leading block


# --------------------------------------------------------------------------------------------
# 06.q2: an idempotent refund, keyed by the refund id, atomic under concurrent delivery


def refund_set_nx(client, key_prefix, refund_id, order_id, amount_cents):
    if not client.set(f"{key_prefix}refund:{refund_id}", 1, nx=True, ex=7 * 86_400):
        return False
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return True


def refund_incr_in_pipeline(client, key_prefix, refund_id, order_id, amount_cents):
    key = f"{key_prefix}seen:{refund_id}"
    with client.pipeline() as pipe:  # MULTI/EXEC: INCR and EXPIRE as one
        pipe.incr(key)
        pipe.expire(key, 3 * 86_400)
        first = pipe.execute()[0] == 1
    if first:
        client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return first


def refund_setnx_then_expire(client, key_prefix, refund_id, order_id, amount_cents):
    key = key_prefix + "idempotency:" + str(refund_id)
    claimed = bool(client.setnx(key, order_id))
    if claimed:
        client.expire(key, 2 * 86_400)
        client.rpush(key_prefix + "refunds", ":".join(map(str, (refund_id, order_id, amount_cents))))
    return claimed


def refund_keyed_on_order(client, key_prefix, refund_id, order_id, amount_cents):
    if not client.set(f"{key_prefix}refund:{order_id}", 1, nx=True, ex=7 * 86_400):
        return False
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return True


def refund_get_then_set(client, key_prefix, refund_id, order_id, amount_cents):
    key = f"{key_prefix}refund:{refund_id}"
    if client.exists(key):
        return False
    client.set(key, 1, ex=7 * 86_400)
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return True


def refund_without_expiry(client, key_prefix, refund_id, order_id, amount_cents):
    if not client.set(f"{key_prefix}refund:{refund_id}", 1, nx=True):
        return False
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return True


def refund_short_expiry(client, key_prefix, refund_id, order_id, amount_cents):
    if not client.set(f"{key_prefix}refund:{refund_id}", 1, nx=True, ex=60):
        return False
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return True


_seen_in_python: set = set()


def refund_python_set(client, key_prefix, refund_id, order_id, amount_cents):
    if (key_prefix, refund_id) in _seen_in_python:
        return False
    _seen_in_python.add((key_prefix, refund_id))
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return True


def refund_push_before_claim(client, key_prefix, refund_id, order_id, amount_cents):
    client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")
    return bool(client.set(f"{key_prefix}refund:{refund_id}", 1, nx=True, ex=7 * 86_400))


def refund_returns_int(client, key_prefix, refund_id, order_id, amount_cents):
    if not client.set(f"{key_prefix}refund:{refund_id}", 1, nx=True, ex=7 * 86_400):
        return 0
    return client.rpush(f"{key_prefix}refunds", f"{refund_id}:{order_id}:{amount_cents}")


@pytest.mark.parametrize("answer", [refund_set_nx, refund_incr_in_pipeline, refund_setnx_then_expire],
                         ids=["set-nx-ex", "incr-in-pipeline", "setnx-then-expire"])
def test_q2_right_answers_pass(answer):
    passes("06.q2", answer)


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(refund_keyed_on_order, "not the order id", id="keyed-on-order-id"),
    pytest.param(refund_get_then_set, "race", id="check-then-set-race"),
    pytest.param(refund_without_expiry, "never expires", id="key-without-expiry"),
    pytest.param(refund_short_expiry, "at least a day", id="expiry-too-short"),
    pytest.param(refund_python_set, "python set", id="state-in-a-python-set"),
    pytest.param(refund_push_before_claim, "refunded more than once", id="refund-before-claiming"),
    pytest.param(refund_returns_int, "return true", id="returns-int-not-bool"),
    pytest.param(jobs.charge_order_once, "TypeError", id="lesson-charge-function"),
])
def test_q2_wrong_answers_fail_with_hint(answer, hint):
    fails("06.q2", answer, hint)


# --------------------------------------------------------------------------------------------
# 06.q3: decorrelated jitter, capped, replayed from hidden seeds


def delay_uniform(previous_s, rng, base_s=1.0, cap_s=30.0):
    return min(cap_s, rng.uniform(base_s, 3 * previous_s))


def delay_from_random(previous_s, rng, base_s=1.0, cap_s=30.0):
    delay = base_s + rng.random() * (3 * previous_s - base_s)
    return cap_s if delay > cap_s else delay


def delay_mirrored_bounds(previous_s, rng, base_s=1.0, cap_s=30.0):
    return min(rng.uniform(3 * previous_s, base_s), cap_s)


def delay_uncapped(previous_s, rng, base_s=1.0, cap_s=30.0):
    return rng.uniform(base_s, 3 * previous_s)


def delay_cap_inside(previous_s, rng, base_s=1.0, cap_s=30.0):
    return rng.uniform(base_s, min(cap_s, 3 * previous_s))


def delay_times_two(previous_s, rng, base_s=1.0, cap_s=30.0):
    return min(cap_s, rng.uniform(base_s, 2 * previous_s))


def delay_no_jitter(previous_s, rng, base_s=1.0, cap_s=30.0):
    return min(cap_s, 3 * previous_s)


def delay_random_module(previous_s, rng, base_s=1.0, cap_s=30.0):
    return min(cap_s, random.uniform(base_s, 3 * previous_s))


def delay_from_zero(previous_s, rng, base_s=1.0, cap_s=30.0):
    return min(cap_s, rng.uniform(0, 3 * previous_s))


def delay_two_draws(previous_s, rng, base_s=1.0, cap_s=30.0):
    rng.random()
    return min(cap_s, rng.uniform(base_s, 3 * previous_s))


@pytest.mark.parametrize("answer", [delay_uniform, delay_from_random, delay_mirrored_bounds],
                         ids=["uniform-then-min", "random-scaled-then-if", "mirrored-bounds"])
def test_q3_right_answers_pass(answer):
    passes("06.q3", answer)


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(delay_uncapped, "not capped", id="no-cap"),
    pytest.param(delay_cap_inside, "not the upper bound", id="cap-inside-the-draw"),
    pytest.param(delay_times_two, "not 2 * previous_s", id="multiplier-off-by-one"),
    pytest.param(delay_no_jitter, "no jitter", id="no-jitter"),
    pytest.param(delay_random_module, "random module", id="random-module"),
    pytest.param(delay_from_zero, "lower bound", id="lower-bound-zero"),
    pytest.param(delay_two_draws, "more than one number", id="two-draws"),
    pytest.param(jobs.backoff_with_jitter, "min(cap_s, rng.uniform", id="lesson-equal-jitter"),
])
def test_q3_wrong_answers_fail_with_hint(answer, hint):
    fails("06.q3", answer, hint)


# --------------------------------------------------------------------------------------------
# 06.q4: route to priority queues


def route_with_sets(queues, func, task):
    urgent = task["user_waiting"] or task["kind"] in {"payment", "refund"}
    bulk = task["kind"] in {"report", "export"}
    return queues["high" if urgent else "low" if bulk else "default"].enqueue(func, task)


def route_with_table(queues, func, task):
    by_kind = {"payment": "high", "refund": "high", "report": "low", "export": "low"}
    name = "high" if task["user_waiting"] else by_kind.get(task["kind"], "default")
    return queues[name].enqueue(func, args=(task,))


def route_ignores_waiting(queues, func, task):
    name = {"payment": "high", "refund": "high", "report": "low", "export": "low"}.get(task["kind"], "default")
    return queues[name].enqueue(func, task)


def route_bulk_first(queues, func, task):  # a waiting user's report still goes to low
    if task["kind"] in ("report", "export"):
        return queues["low"].enqueue(func, task)
    if task["kind"] in ("payment", "refund") or task["user_waiting"]:
        return queues["high"].enqueue(func, task)
    return queues["default"].enqueue(func, task)


def route_twice(queues, func, task):
    queues["default"].enqueue(func, task)
    return route_with_sets(queues, func, task)


def route_returns_nothing(queues, func, task):
    route_with_sets(queues, func, task)


@pytest.mark.parametrize("answer", [route_with_sets, route_with_table], ids=["sets", "lookup-table"])
def test_q4_right_answers_pass(answer):
    passes("06.q4", answer)


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(route_ignores_waiting, "user_waiting=True", id="ignores-user-waiting"),
    pytest.param(route_bulk_first, "expected 'high'", id="bulk-rule-before-urgent"),
    pytest.param(route_twice, "exactly once", id="enqueues-twice"),
    pytest.param(route_returns_nothing, "return the job", id="returns-none"),
])
def test_q4_wrong_answers_fail_with_hint(answer, hint):
    fails("06.q4", answer, hint)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in jobs.__all__ if callable(getattr(jobs, n))])
def test_no_chapter_function_passes_a_practical(name):
    for qid in ("06.q2", "06.q3", "06.q4", "06.q7", "06.q8", "06.q9"):
        fails(qid, getattr(jobs, name))



# --------------------------------------------------------------------------------------------
# The lab, 06.q7-06.q9: one checkout handler, graded on real workers of the grader's own shop


def checkout_model_like(order, shop):  # the shape of the model, written with other choices
    high = shop.queues["high"]
    charge = high.enqueue_call(
        jobs.charge_card, args=(shop.key, order["id"], order["amount_cents"]),
        kwargs={"idempotency_key": f"{order['id']}:{order['amount_cents']}"},
        retry=Retry(max=4, interval=[1, 2]))
    high.enqueue_call(jobs.send_receipt, args=(shop.key, order["id"], order["email"]), depends_on=charge.id)
    return {"order_id": order["id"], "status": "processing", "message": "Thank you!"}


def checkout_immediate_retries(order, shop):  # no interval, a job id of its own, a list of dependencies
    order_id = order["id"]
    urgent = shop.queues["high"]
    charge = urgent.enqueue(jobs.charge_card, shop.key, order_id, order["amount_cents"],
                            idempotency_key="order-" + str(order_id), retry=Retry(max=2),
                            job_id=f"charge-{order_id}-{uuid.uuid4().hex[:6]}")
    urgent.enqueue(jobs.send_receipt, shop.key, order_id, order["email"], depends_on=[charge])
    return dict(order_id=order_id, status="processing")


@pytest.mark.parametrize("answer", [checkout_model_like, checkout_immediate_retries],
                         ids=["enqueue-call-backoff-list", "immediate-retries-job-id"])
@pytest.mark.parametrize("qid", ["06.q7", "06.q8", "06.q9"])
def test_lab_right_answers_pass(qid, answer):
    passes(qid, answer)


def checkout_last_sprint(order, shop):  # offloaded, nothing more: right for q7 only
    shop.queues["default"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"])
    shop.queues["default"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"])
    return {"order_id": order["id"], "status": "processing"}


def test_q7_offloading_alone_passes_q7():
    passes("06.q7", checkout_last_sprint)


def checkout_inline(order, shop):
    jobs.charge_card(shop.key, order["id"], order["amount_cents"])
    jobs.send_receipt(shop.key, order["id"], order["email"])
    return {"order_id": order["id"], "status": "paid"}


def checkout_enqueues_the_result(order, shop):
    shop.queues["high"].enqueue(jobs.charge_card(shop.key, order["id"], order["amount_cents"]))
    shop.queues["high"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"])
    return {"order_id": order["id"], "status": "processing"}


def checkout_mail_inline(order, shop):
    shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"])
    jobs.send_receipt(shop.key, order["id"], order["email"])
    return {"order_id": order["id"], "status": "processing"}


def checkout_in_a_thread(order, shop):
    def work():
        jobs.charge_card(shop.key, order["id"], order["amount_cents"])
        jobs.send_receipt(shop.key, order["id"], order["email"])

    threading.Thread(target=work, daemon=True).start()
    shop.queues["low"].enqueue(jobs.bulk_task, shop.key, f"audit {order['id']}")  # a job, so the worker runs
    return {"order_id": order["id"], "status": "processing"}


def checkout_says_paid(order, shop):
    return {**checkout_last_sprint(order, shop), "status": "paid"}


def checkout_returns_nothing(order, shop):
    checkout_last_sprint(order, shop)


def checkout_no_receipt(order, shop):
    shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"])
    return {"order_id": order["id"], "status": "processing"}


def checkout_in_euros(order, shop):
    shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"] / 100)
    shop.queues["high"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"])
    return {"order_id": order["id"], "status": "processing"}


def checkout_passes_the_shop(order, shop):
    shop.queues["high"].enqueue(jobs.charge_card, shop, order["id"], order["amount_cents"])
    return {"order_id": order["id"], "status": "processing"}


_own_queue_names: list[str] = []


def checkout_own_queue(order, shop):
    name = f"test06-{uuid.uuid4().hex[:8]}"
    _own_queue_names.append(name)
    Queue(name, connection=shop.connection).enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"])
    return {"order_id": order["id"], "status": "processing"}


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(checkout_inline, "payment gateway was called", id="charges-inline"),
    pytest.param(checkout_enqueues_the_result, "enqueues its result", id="enqueues-the-result"),
    pytest.param(checkout_mail_inline, "receipt mail", id="mails-inline"),
    pytest.param(checkout_in_a_thread, "web process", id="thread-in-the-request-process"),
    pytest.param(checkout_says_paid, "processing", id="answers-paid"),
    pytest.param(checkout_returns_nothing, "return the response", id="returns-none"),
    pytest.param(checkout_no_receipt, "no receipt", id="no-receipt-job"),
    pytest.param(checkout_in_euros, "instead of its amount_cents", id="amount-not-in-cents"),
    pytest.param(checkout_own_queue, "shop.queues", id="a-queue-of-its-own"),
    pytest.param(checkout_passes_the_shop, "pickled", id="the-shop-as-a-job-argument"),
])
def test_q7_wrong_answers_fail_with_hint(answer, hint):
    try:
        fails("06.q7", answer, hint)
    finally:
        client = redis_client()
        for name in _own_queue_names:
            Queue(name, connection=client).delete(delete_jobs=True)
        _own_queue_names.clear()
        client.close()


def _high(order, shop, key=None, retry=None, **options):
    """Charge on high with the given key and retries, receipt after it: the other parts right."""
    charge = shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"],
                                         idempotency_key=key, retry=retry, **options)
    shop.queues["high"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"], depends_on=charge)
    return {"order_id": order["id"], "status": "processing"}


def checkout_no_retry(order, shop):
    return _high(order, shop, key=f"order-{order['id']}")


def checkout_retries_once(order, shop):
    return _high(order, shop, key=f"order-{order['id']}", retry=Retry(max=1))


def checkout_no_key(order, shop):
    return _high(order, shop, retry=Retry(max=3, interval=1))


def checkout_random_key(order, shop):
    return _high(order, shop, key=uuid.uuid4().hex, retry=Retry(max=3, interval=1))


def checkout_one_key_for_all(order, shop):
    return _high(order, shop, key="checkout", retry=Retry(max=3))


def checkout_unique_job_no_key(order, shop):  # a double click is refused by RQ, a redelivery is not
    try:
        return _high(order, shop, retry=Retry(max=3), job_id=f"charge-order-{order['id']}", unique=True)
    except DuplicateJobError:
        return {"order_id": order["id"], "status": "processing"}


def checkout_unique_job_unhandled(order, shop):
    return _high(order, shop, key=f"order-{order['id']}", retry=Retry(max=3),
                 job_id=f"charge-order-{order['id']}", unique=True)


def checkout_long_backoff(order, shop):
    return _high(order, shop, key=f"order-{order['id']}", retry=Retry(max=3, interval=[30, 60]))


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(checkout_last_sprint, "Retry(", id="no-retry-no-key"),
    pytest.param(checkout_no_retry, "timed out", id="key-without-retry"),
    pytest.param(checkout_retries_once, "2 time(s) in a row", id="too-few-retries"),
    pytest.param(checkout_no_key, "answer was lost", id="retry-without-key"),
    pytest.param(checkout_random_key, "double click", id="uuid4-key"),
    pytest.param(checkout_one_key_for_all, "another order", id="one-key-for-every-order"),
    pytest.param(checkout_unique_job_no_key, "idempotency_key", id="unique-job-id-without-key"),
    pytest.param(checkout_unique_job_unhandled, "a second time", id="duplicate-job-error-unhandled"),
    pytest.param(checkout_long_backoff, "retry intervals short", id="intervals-too-long"),
    pytest.param(checkout_inline, "06.q7", id="charges-inline"),
])
def test_q8_wrong_answers_fail_with_hint(answer, hint):
    fails("06.q8", answer, hint)


def checkout_all_high_no_dependency(order, shop):
    shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"],
                                idempotency_key=f"order-{order['id']}", retry=Retry(max=3))
    shop.queues["high"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"])
    return {"order_id": order["id"], "status": "processing"}


def checkout_receipt_on_default(order, shop):
    charge = shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"],
                                         idempotency_key=f"order-{order['id']}", retry=Retry(max=3))
    shop.queues["default"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"], depends_on=charge)
    return {"order_id": order["id"], "status": "processing"}


def checkout_receipt_first(order, shop):
    shop.queues["high"].enqueue(jobs.send_receipt, shop.key, order["id"], order["email"])
    shop.queues["high"].enqueue(jobs.charge_card, shop.key, order["id"], order["amount_cents"],
                                idempotency_key=f"order-{order['id']}", retry=Retry(max=3))
    return {"order_id": order["id"], "status": "processing"}


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(checkout_last_sprint, "behind the newsletters", id="everything-on-default"),
    pytest.param(checkout_all_high_no_dependency, "declined", id="receipt-without-depends-on"),
    pytest.param(checkout_receipt_on_default, "receipts on default", id="receipt-on-default"),
    pytest.param(checkout_receipt_first, "before its charge", id="receipt-enqueued-first"),
    pytest.param(checkout_inline, "06.q7", id="charges-inline"),
])
def test_q9_wrong_answers_fail_with_hint(answer, hint):
    fails("06.q9", answer, hint)


def test_checks_leave_no_keys_behind():  # last: after every check of this file
    client = redis_client()
    try:
        assert not list(client.scan_iter(match="grader06*", count=1000))
        assert not [m for m in client.smembers("rq:queues") if b"grader06" in m]
        assert not [m for m in client.smembers("rq:workers") if b"grader06" in m]
    finally:
        client.close()
