"""Grader tests for chapter 07 (infrastructure scaling): right answers written another way pass,
plausible wrong ones fail with a hint naming the mistake. The post_fork checks start a real
gunicorn each (a few seconds): few of them, and every server is stopped (checked at the end)."""

from __future__ import annotations

import pytest

from perfcourse import web
from perfcourse.chapters import infrastructure_scaling as infra

from .kit import fails, passes

# --------------------------------------------------------------------------------------------
# Choice questions


@pytest.mark.parametrize("form", ["B", " b "], ids=["upper", "spaces"])
def test_q5_right_key_passes(form):
    passes("07.q5", form)


@pytest.mark.parametrize(("key", "why"), [
    ("a", "same socket"), ("c", "ends the master's session"), ("d", "copy-on-write"),
], ids=["a", "c", "d"])
def test_q5_wrong_key_fails_with_its_explanation(key, why):
    fails("07.q5", key, why)


@pytest.mark.parametrize(("qid", "right", "wrong"), [
    ("07.q1", {"a", "c", "d", "f", "g"}, {"b": "GIL", "e": "pins a user", "h": "take turns"}),
    ("07.q2", {"b", "c", "e", "f", "h"}, {"a": "stuck requests", "d": "exhaust memory",
                                          "g": "oversized pools"}),
], ids=["07.q1", "07.q2"])
def test_multi_choice(qid, right, wrong):
    passes(qid, {k.upper() for k in right})
    passes(qid, " " + ", ".join(sorted(right)) + " ")
    for key, why in wrong.items():
        fails(qid, right | {key}, why)
    fails(qid, set(sorted(right)[:-1]), "1 more option")
    fails(qid, {"a", "b", "c", "d", "e"}, "")  # the old leading block


# --------------------------------------------------------------------------------------------
# 07.q3: workers for cores and memory, threads from a measured profile


def size_by_totals(cores, memory_mb, worker_mb, samples):
    cpu = sum(s[0] for s in samples)
    total = sum(s[0] + s[1] for s in samples)
    workers = max(1, min(cores, memory_mb // worker_mb))
    return (workers, 32) if cpu == 0 else (workers, max(1, min(32, round(total / cpu))))


def size_with_loop(cores, memory_mb, worker_mb, samples):
    cpu = wait = 0
    for cpu_ms, wait_ms in samples:
        cpu += cpu_ms
        wait += wait_ms
    fits = int(memory_mb / worker_mb)
    workers = fits if fits < cores else cores
    if workers < 1:
        workers = 1
    io_fraction = wait / (cpu + wait)
    threads = 32 if io_fraction >= 1 else round(1 / (1 - io_fraction))
    return [workers, min(max(threads, 1), 32)]


def size_ignoring_memory(cores, memory_mb, worker_mb, samples):
    return size_by_totals(cores, 10**9, worker_mb, samples)


def size_memory_rounded_up(cores, memory_mb, worker_mb, samples):
    return size_by_totals(cores, -(-memory_mb // worker_mb) * worker_mb, worker_mb, samples)


def size_mean_of_fractions(cores, memory_mb, worker_mb, samples):
    fraction = sum(w / (c + w) for c, w in samples) / len(samples)
    threads = 32 if fraction >= 1 else min(32, max(1, round(1 / (1 - fraction))))
    return max(1, min(cores, memory_mb // worker_mb)), threads


def size_without_thread_cap(cores, memory_mb, worker_mb, samples):
    cpu = sum(c for c, _ in samples)
    total = sum(c + w for c, w in samples)
    return max(1, min(cores, memory_mb // worker_mb)), (10_000 if cpu == 0 else max(1, round(total / cpu)))


def size_zero_workers(cores, memory_mb, worker_mb, samples):
    workers, threads = size_by_totals(cores, memory_mb, worker_mb, samples)
    return min(cores, memory_mb // worker_mb), threads


def size_lesson_rule(cores, memory_mb, worker_mb, samples):  # the lesson's rule, io_fraction 0.9
    return max(1, cores), 10


def size_hard_coded_example(cores, memory_mb, worker_mb, samples):  # the visible example's output
    return (3, 5)


@pytest.mark.parametrize("answer", [size_by_totals, size_with_loop], ids=["totals", "loop-and-list"])
def test_q3_right_answers_pass(answer):
    passes("07.q3", answer)


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(size_ignoring_memory, "limited by memory", id="ignores-memory"),
    pytest.param(size_memory_rounded_up, "round memory_mb / worker_mb down", id="memory-rounded-up"),
    pytest.param(size_mean_of_fractions, "weight the profile by time", id="mean-of-fractions"),
    pytest.param(size_without_thread_cap, "cap the threads at 32", id="threads-uncapped"),
    pytest.param(size_zero_workers, "at least 1", id="zero-workers"),
    pytest.param(size_lesson_rule, "expected", id="lesson-rule-fixed-fraction"),
    pytest.param(size_hard_coded_example, "expected", id="hard-coded-example"),
])
def test_q3_wrong_answers_fail_with_hint(answer, hint):
    fails("07.q3", answer, hint)


# --------------------------------------------------------------------------------------------
# 07.q4: least connections among the healthy backends, ties broken round robin


def least_by_sort(healthy, active, previous):
    n = len(healthy)
    ring = [(previous + k) % n for k in range(1, n + 1)]
    candidates = [i for i in ring if healthy[i]]
    return min(candidates, key=lambda i: active[i]) if candidates else -1


def least_by_rank(healthy, active, previous):
    n = len(healthy)
    ranked = sorted((active[i], (i - previous - 1) % n, i) for i in range(n) if healthy[i])
    return ranked[0][2] if ranked else -1


def least_ignoring_health(healthy, active, previous):
    return least_by_sort([True] * len(healthy), active, previous)


def least_ties_to_lowest(healthy, active, previous):
    candidates = [i for i, up in enumerate(healthy) if up]
    return min(candidates, key=lambda i: active[i]) if candidates else -1


def least_round_robin_only(healthy, active, previous):  # the lesson's balancer choice
    return infra.next_healthy(healthy, previous)


def least_busiest(healthy, active, previous):
    return least_by_sort(healthy, [-a for a in active], previous)


def least_none_when_down(healthy, active, previous):
    choice = least_by_sort(healthy, active, previous)
    return None if choice == -1 else choice


def least_hard_coded_example(healthy, active, previous):
    return 2


@pytest.mark.parametrize("answer", [least_by_sort, least_by_rank], ids=["ring-then-min", "rank-tuples"])
def test_q4_right_answers_pass(answer):
    passes("07.q4", answer)


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(least_ignoring_health, "is down", id="ignores-health"),
    pytest.param(least_ties_to_lowest, "lowest index", id="ties-to-lowest-index"),
    pytest.param(least_round_robin_only, "plain round robin", id="round-robin-only"),
    pytest.param(least_busiest, "busiest", id="most-connections"),
    pytest.param(least_none_when_down, "-1", id="none-when-all-down"),
    pytest.param(least_hard_coded_example, "expected", id="hard-coded-example"),
])
def test_q4_wrong_answers_fail_with_hint(answer, hint):
    fails("07.q4", answer, hint)


@pytest.mark.parametrize(("healthy", "active", "previous", "expected"), [
    ([True, True, True], [0, 0, 0], -1, 0),
    ([True, True, True], [0, 0, 0], 0, 1),
    ([True, True, True], [0, 0, 0], 2, 0),
    ([True, False, True], [4, 0, 1], 0, 2),
    ([True, True, True, True], [2, 1, 3, 1], 1, 3),
    ([False, False], [0, 0], 1, -1),
], ids=["first", "after-0", "wraps", "skips-down", "tie-after-previous", "none-up"])
def test_q4_model_answer_on_hand_computed_cases(healthy, active, previous, expected):
    # Independent expected values: the model answer from the bank, run on hand-worked inputs.
    from perfcourse.grading import question
    namespace: dict = {}
    exec(question("07.q4").model_answer(), namespace)
    assert namespace["choose_backend"](healthy, active, previous) == expected
    assert least_by_sort(healthy, active, previous) == expected


# --------------------------------------------------------------------------------------------
# 07.q6: post_fork for a preloaded app with a primary and a replica engine (real gunicorn)


def hook_loop(server, worker):
    from perfcourse.chapters import infrastructure_scaling as infra
    for engine in (infra.ENGINE, infra.READ_ENGINE):
        if engine is not None:
            engine.dispose(close=False)


def reset_pools(server, worker):
    # not a stub: a written hook may mention NotImplementedError in a comment
    import perfcourse.chapters.infrastructure_scaling as app
    engines = [getattr(app, name) for name in ("ENGINE", "READ_ENGINE")]
    [e.dispose(close=False) for e in engines if e]


def hook_primary_only(server, worker):  # the lesson's hook
    from perfcourse.chapters import infrastructure_scaling as infra
    if infra.ENGINE is not None:
        infra.ENGINE.dispose(close=False)


def hook_closing(server, worker):
    from perfcourse.chapters import infrastructure_scaling as infra
    for engine in (infra.ENGINE, infra.READ_ENGINE):
        if engine is not None:
            engine.dispose()


def hook_empty(server, worker):
    pass


def hook_stub(server, worker):
    """gunicorn calls this in each new worker process, right after fork."""
    raise NotImplementedError("write the hook")


@pytest.mark.parametrize("answer", [hook_loop, reset_pools], ids=["loop", "getattr-comprehension"])
def test_q6_right_hooks_pass(answer):
    passes("07.q6", answer)
    assert web.running_servers() == 0


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(hook_primary_only, "READ_ENGINE", id="primary-only"),
    pytest.param(hook_closing, "close=False", id="dispose-closes"),
    pytest.param(hook_empty, "neither engine", id="empty-hook"),
    pytest.param(hook_stub, "not written yet", id="stub"),
])
def test_q6_wrong_hooks_fail_with_hint(answer, hint):
    fails("07.q6", answer, hint)
    assert web.running_servers() == 0


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in infra.__all__ if callable(getattr(infra, n))])
def test_no_chapter_function_passes_q3_or_q4(name):
    for qid in ("07.q3", "07.q4"):
        fails(qid, getattr(infra, name))
