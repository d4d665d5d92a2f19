"""Grader tests for chapter 07 (infrastructure scaling): right answers written another way pass,
plausible wrong ones fail with a hint naming the mistake. The post_fork checks start a real
gunicorn each, the lab's balancer checks three (a few seconds each): few of them, and every server
is stopped (checked at the end)."""

from __future__ import annotations

import threading

import pytest

from perfcourse import web
from perfcourse.chapters import infrastructure_scaling as infra
from perfcourse.web import HttpResponse

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


# --------------------------------------------------------------------------------------------
# 07.q7 (lab): a gunicorn configuration for a weighted mix of endpoints


def config_by_totals(cores, memory_mb, profile):
    endpoints = profile["endpoints"]
    shares = sum(e["share"] for e in endpoints)
    cpu = sum(e["share"] / shares * e["cpu_ms"] for e in endpoints)      # normalised shares
    total = sum(e["share"] / shares * (e["cpu_ms"] + e["wait_ms"]) for e in endpoints)
    db = profile["db_connections"]
    workers = max(1, min(cores, db, int(memory_mb / profile["worker_mb"])))
    threads = 32 if cpu == 0 else max(1, min(32, round(total / cpu)))
    threads = min(threads, max(1, db // workers))
    return {"worker_class": "sync" if threads == 1 else "gthread", "workers": workers, "threads": threads}


def config_with_loop(cores, memory_mb, profile):
    cpu = wait = 0.0
    for endpoint in profile["endpoints"]:
        cpu += endpoint["share"] * endpoint["cpu_ms"]
        wait += endpoint["share"] * endpoint["wait_ms"]
    workers = cores
    while workers > 1 and (workers * profile["worker_mb"] > memory_mb or workers > profile["db_connections"]):
        workers -= 1
    waiting = wait / (cpu + wait)
    threads = 32 if waiting >= 1 else round(1 / (1 - waiting))
    threads = max(1, min(threads, 32, profile["db_connections"] // workers))
    config = {"workers": workers, "threads": threads, "worker_class": "sync"}
    if threads > 1:
        config["worker_class"] = "gthread"
    return config


def _right_threads(cores, memory_mb, profile):
    return config_by_totals(cores, memory_mb, profile)


def config_unweighted(cores, memory_mb, profile):
    return config_by_totals(cores, memory_mb, {**profile, "endpoints": [
        {**e, "share": 1} for e in profile["endpoints"]]})


def config_mean_of_fractions(cores, memory_mb, profile):
    config = config_by_totals(cores, memory_mb, profile)
    timed = [e for e in profile["endpoints"] if e["cpu_ms"] + e["wait_ms"]]
    waiting = sum(e["wait_ms"] / (e["cpu_ms"] + e["wait_ms"]) for e in timed) / len(timed)
    threads = 32 if waiting >= 1 else max(1, min(32, round(1 / (1 - waiting))))
    threads = max(1, min(threads, profile["db_connections"] // config["workers"]))
    return {**config, "threads": threads, "worker_class": "gthread" if threads > 1 else "sync"}


def config_share_weighted_fractions(cores, memory_mb, profile):
    config = config_by_totals(cores, memory_mb, profile)
    timed = [e for e in profile["endpoints"] if e["cpu_ms"] + e["wait_ms"]]
    waiting = (sum(e["share"] * e["wait_ms"] / (e["cpu_ms"] + e["wait_ms"]) for e in timed)
               / sum(e["share"] for e in timed))
    threads = 32 if waiting >= 1 else max(1, min(32, round(1 / (1 - waiting))))
    threads = max(1, min(threads, profile["db_connections"] // config["workers"]))
    return {**config, "threads": threads, "worker_class": "gthread" if threads > 1 else "sync"}


def config_ignores_database(cores, memory_mb, profile):
    return config_by_totals(cores, memory_mb, {**profile, "db_connections": 10**6})


def config_sync_with_threads(cores, memory_mb, profile):
    return {**config_by_totals(cores, memory_mb, profile), "worker_class": "sync"}


def config_always_gthread(cores, memory_mb, profile):
    return {**config_by_totals(cores, memory_mb, profile), "worker_class": "gthread"}


def config_gunicorn_docs_rule(cores, memory_mb, profile):  # 2 x cores + 1 sync workers
    return {"workers": 2 * cores + 1, "threads": 1, "worker_class": "sync"}


def config_ignores_memory(cores, memory_mb, profile):
    return config_by_totals(cores, 10**9, profile)


def config_as_tuple(cores, memory_mb, profile):  # the shape of 07.q3's answer
    config = config_by_totals(cores, memory_mb, profile)
    return config["workers"], config["threads"]


def config_hard_coded(cores, memory_mb, profile):  # what the lab's machine gave
    return {"workers": 2, "threads": 5, "worker_class": "gthread"}


@pytest.mark.parametrize("answer", [config_by_totals, config_with_loop], ids=["totals", "loop"])
def test_q7_right_answers_pass(answer):
    passes("07.q7", answer)


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(config_unweighted, "share of the traffic", id="unweighted"),
    pytest.param(config_mean_of_fractions, "not the mean of the endpoints' fractions", id="mean-of-fractions"),
    pytest.param(config_share_weighted_fractions, "weight by time", id="share-weighted-fractions"),
    pytest.param(config_ignores_database, "database connections", id="ignores-database"),
    pytest.param(config_sync_with_threads, '"gthread"', id="sync-with-threads"),
    pytest.param(config_always_gthread, '"sync"', id="gthread-with-one-thread"),
    pytest.param(config_gunicorn_docs_rule, "memory_mb // worker_mb", id="2n+1-sync"),
    pytest.param(config_ignores_memory, "do not fit", id="ignores-memory"),
    pytest.param(config_as_tuple, "return a dict", id="tuple"),
    pytest.param(config_hard_coded, "expected", id="hard-coded"),
])
def test_q7_wrong_answers_fail_with_hint(answer, hint):
    fails("07.q7", answer, hint)


def test_q7_model_answer_on_a_hand_computed_case():
    from perfcourse.grading import question
    namespace: dict = {}
    exec(question("07.q7").model_answer(), namespace)
    profile = {"worker_mb": 300, "db_connections": 12, "endpoints": [
        {"endpoint": "/a", "share": 0.75, "cpu_ms": 4.0, "wait_ms": 4.0},     # 3 ms cpu, 3 ms wait
        {"endpoint": "/b", "share": 0.25, "cpu_ms": 4.0, "wait_ms": 52.0}]}   # 1 ms cpu, 13 ms wait
    # 4 cores, 1000 MB: 3 workers fit; waiting 16 of 20 ms: 1 / (1 - 0.8) = 5 threads; 12 // 3 = 4
    assert namespace["size_gunicorn"](4, 1000, profile) == {"workers": 3, "threads": 4, "worker_class": "gthread"}
    assert config_with_loop(4, 1000, profile) == namespace["size_gunicorn"](4, 1000, profile)


# --------------------------------------------------------------------------------------------
# 07.q8 (lab): a balancer in front of real backends, one deployed and one killed mid-load

IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


class TurnTaker:
    """The lab's given starting point: round robin over the backends marked up."""

    def __init__(self, backends, send):
        self.backends, self.send = dict(backends), send
        self.up = {name: True for name in self.backends}
        self.lock = threading.Lock()
        self.previous = -1

    def pick(self, exclude=()):
        names = list(self.backends)
        with self.lock:
            for step in range(1, len(names) + 1):
                index = (self.previous + step) % len(names)
                if self.up[names[index]] and names[index] not in exclude:
                    self.previous = index
                    return names[index]
        return None

    def check_health(self):
        pass

    def handle(self, method, path):
        name = self.pick()
        if name is None:
            return HttpResponse(503, {}, b"")
        try:
            return self.send(self.backends[name], method, path)
        except infra.BackendError:
            return HttpResponse(502, {}, b"")


class FailoverLoop(TurnTaker):
    def check_health(self):
        for name, port in self.backends.items():
            try:
                self.up[name] = self.send(port, "GET", "/health", 1.0).status == 200
            except infra.BackendError:
                self.up[name] = False

    def handle(self, method, path):
        tried = set()
        while (name := self.pick(exclude=tried)) is not None:
            tried.add(name)
            try:
                return self.send(self.backends[name], method, path)
            except infra.BackendRefused:
                self.up[name] = False
            except infra.BackendNoResponse:
                self.up[name] = False
                if method not in IDEMPOTENT:
                    return HttpResponse(502, {}, b"")
        return HttpResponse(503, {}, b"")


class FailoverOwnRing:
    """Written from scratch: its own ring and counter, health kept as a set, tuples returned."""

    def __init__(self, backends, send):
        self.ring = list(backends.items())
        self.send = send
        self.down = set()
        self.counter = 0
        self.lock = threading.Lock()

    def check_health(self):
        for name, port in self.ring:
            try:
                answer = self.send(port, "GET", "/health", timeout_s=0.5)
                healthy = answer.status == 200
            except OSError:
                healthy = False
            with self.lock:
                (self.down.discard if healthy else self.down.add)(name)

    def handle(self, method, path):
        with self.lock:
            start = self.counter
            self.counter += 1
            order = [self.ring[(start + k) % len(self.ring)] for k in range(len(self.ring))]
            order = [(n, p) for n, p in order if n not in self.down]
        for _name, port in order:
            try:
                response = self.send(port, method, path)
                return response.status, response.headers, response.body
            except infra.BackendRefused:
                continue
            except infra.BackendNoResponse:
                if method.upper() in ("GET", "HEAD"):
                    continue
                return 502, {}, b"the backend died while handling it"
        return 503, {}, b"no healthy backend"


class RetryEverything(FailoverLoop):  # sends a POST again after it reached a dying backend
    def handle(self, method, path):
        tried = set()
        while (name := self.pick(exclude=tried)) is not None:
            tried.add(name)
            try:
                return self.send(self.backends[name], method, path)
            except infra.BackendError:
                self.up[name] = False
        return HttpResponse(503, {}, b"")


class NoRetry(FailoverLoop):  # health checks, but an error goes back to the client
    def handle(self, method, path):
        return TurnTaker.handle(self, method, path)


class RetryOnlyRefused(FailoverLoop):
    def handle(self, method, path):
        tried = set()
        while (name := self.pick(exclude=tried)) is not None:
            tried.add(name)
            try:
                return self.send(self.backends[name], method, path)
            except infra.BackendRefused:
                self.up[name] = False
            except infra.BackendNoResponse:
                return HttpResponse(502, {}, b"")
        return HttpResponse(503, {}, b"")


class NoHealthCheck(FailoverLoop):  # retries right, never looks at /health
    def check_health(self):
        pass


class ConnectIsHealthy(FailoverLoop):  # any answer counts as up, even 503
    def check_health(self):
        for name, port in self.backends.items():
            try:
                self.send(port, "GET", "/health")
                self.up[name] = True
            except infra.BackendError:
                self.up[name] = False


class NeverBackUp(FailoverLoop):  # marks down, never up again
    def check_health(self):
        for name, port in self.backends.items():
            try:
                if self.send(port, "GET", "/health").status != 200:
                    self.up[name] = False
            except infra.BackendError:
                self.up[name] = False


class AlwaysFirst(FailoverLoop):  # fails over, but never balances
    def pick(self, exclude=()):
        return next((n for n in self.backends if self.up[n] and n not in exclude), None)


class AnswersOkWhenAllDown(FailoverLoop):
    def handle(self, method, path):
        response = super().handle(method, path)
        return HttpResponse(200, {}, b"") if response.status == 503 else response


class ReturnsTheBody(FailoverLoop):
    def handle(self, method, path):
        return super().handle(method, path).body


class BalancerStub(TurnTaker):
    def check_health(self):
        raise NotImplementedError("Your code here")

    def handle(self, method, path):
        raise NotImplementedError("Your code here")


@pytest.mark.parametrize("answer", [FailoverLoop, FailoverOwnRing], ids=["loop", "own-ring-tuples"])
def test_q8_right_balancers_pass(answer):
    passes("07.q8", answer)
    assert web.running_servers() == 0


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(RetryEverything, "charge twice", id="retries-posts"),
    pytest.param(NoRetry, "lost", id="no-retry"),
    pytest.param(RetryOnlyRefused, "idempotent", id="get-not-retried"),
    pytest.param(NoHealthCheck, "answered 503", id="no-health-check"),
    pytest.param(ConnectIsHealthy, "answered 503", id="any-status-is-up"),
    pytest.param(NeverBackUp, "up again", id="never-back-up"),
    pytest.param(AlwaysFirst, "round robin", id="no-balancing"),
    pytest.param(TurnTaker, "lost", id="the-given-starting-point"),
])
def test_q8_wrong_balancers_fail_with_hint(answer, hint):
    fails("07.q8", answer, hint)
    assert web.running_servers() == 0


@pytest.mark.parametrize(("answer", "hint"), [
    pytest.param(AnswersOkWhenAllDown, "answer 503", id="200-when-all-down"),
    pytest.param(ReturnsTheBody, "must return the response", id="returns-the-body"),
    pytest.param(BalancerStub, "not written yet", id="stub"),
])
def test_q8_wrong_shapes_fail_before_any_server_starts(answer, hint, monkeypatch):
    def no_trial(*args, **kwargs):
        raise AssertionError("a backend was started")

    monkeypatch.setattr(infra, "failover_trial", no_trial)
    fails("07.q8", answer, hint)


@pytest.mark.parametrize("name", [n for n in infra.__all__ if callable(getattr(infra, n)) and n != "serve"])
def test_no_chapter_function_passes_q7(name):
    fails("07.q7", getattr(infra, name))
