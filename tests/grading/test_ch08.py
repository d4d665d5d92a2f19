"""Grader tests of chapter 08 (monitoring and profiling): right answers written other ways pass,
usual mistakes fail with a hint that names them, choice keys are accepted in any case and spacing.

The middleware check runs on a fake clock and the readiness check on an in-memory SQLite and a
Redis port where nothing listens: no server is needed and nothing is timed.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from perfcourse.chapters import monitoring_and_profiling as mp
from perfcourse.grading import question

from .kit import fails, passes

# --------------------------------------------------------------------------------------------
# Choice questions


@pytest.mark.parametrize("qid", ["08.q1", "08.q2", "08.q5"])
def test_choices_accept_the_right_key_in_any_form(qid):
    checker = question(qid).checker
    right = checker.correct
    if isinstance(right, str):
        for typed in ("B".replace("B", right.upper()), f" {right} ", f"({right})"):
            passes(qid, typed)
    else:
        passes(qid, ", ".join(sorted(right)).upper())
        passes(qid, " ".join(sorted(right)))


def test_interview_question_5_wrong_options_explained_and_partial_answer_refused():
    checker = question("08.q1").checker
    right = sorted(checker.correct)
    for key in set(checker.options) - set(right):
        fails("08.q1", {*right, key}, checker.explanations[key][:50])
    fails("08.q1", set(right[1:]), "more")


# --------------------------------------------------------------------------------------------
# 08.q3: the route-labelled latency middleware


def middleware_generator(app, histogram, clock):
    def timed(environ, start_response):
        route = re.sub(r"/\d+(?=/|$)", "/:id", environ["PATH_INFO"])
        started = clock()
        body = None
        try:
            body = app(environ, start_response)
            yield from body
        finally:
            if hasattr(body, "close"):
                body.close()
            histogram.labels(route=route).observe(clock() - started)
    return timed


def middleware_wrapper_class(app, histogram, clock):
    class Timed:
        def __init__(self, body, route, started):
            self.body, self.route, self.started = body, route, started

        def __iter__(self):
            return iter(self.body)

        def close(self):
            try:
                if hasattr(self.body, "close"):
                    self.body.close()
            finally:
                histogram.labels(self.route).observe(clock() - self.started)

    def timed(environ, start_response):
        parts = environ["PATH_INFO"].split("/")
        route = "/".join(":id" if p.isdigit() else p for p in parts)
        started = clock()
        try:
            body = app(environ, start_response)
        except Exception:
            histogram.labels(route).observe(clock() - started)
            raise
        return Timed(body, route, started)
    return timed


def middleware_list_body(app, histogram, clock):
    """Buffers the body into a list (all chunks read before returning): still the right times."""
    def timed(environ, start_response):
        route = "/".join(":id" if seg.isdecimal() else seg for seg in environ["PATH_INFO"].split("/"))
        t0 = clock()
        try:
            return list(app(environ, start_response))
        finally:
            histogram.labels(route=route).observe(clock() - t0)
    return timed


@pytest.mark.parametrize("answer", [middleware_generator, middleware_wrapper_class, middleware_list_body])
def test_right_middlewares_pass(answer):
    passes("08.q3", answer)


def stops_before_the_body(app, histogram, clock):
    def timed(environ, start_response):
        route = re.sub(r"/\d+(?=/|$)", "/:id", environ["PATH_INFO"])
        started = clock()
        try:
            return app(environ, start_response)
        finally:
            histogram.labels(route=route).observe(clock() - started)
    return timed


def raw_path_label(app, histogram, clock):
    def timed(environ, start_response):
        started = clock()
        try:
            yield from app(environ, start_response)
        finally:
            histogram.labels(route=environ["PATH_INFO"]).observe(clock() - started)
    return timed


def no_finally(app, histogram, clock):
    def timed(environ, start_response):
        route = re.sub(r"/\d+(?=/|$)", "/:id", environ["PATH_INFO"])
        started = clock()
        yield from app(environ, start_response)
        histogram.labels(route=route).observe(clock() - started)
    return timed


def milliseconds(app, histogram, clock):
    def timed(environ, start_response):
        route = re.sub(r"/\d+(?=/|$)", "/:id", environ["PATH_INFO"])
        started = clock()
        try:
            yield from app(environ, start_response)
        finally:
            histogram.labels(route=route).observe((clock() - started) * 1000)
    return timed


def wall_clock(app, histogram, clock):
    def timed(environ, start_response):
        route = re.sub(r"/\d+(?=/|$)", "/:id", environ["PATH_INFO"])
        started = time.perf_counter()
        try:
            yield from app(environ, start_response)
        finally:
            histogram.labels(route=route).observe(time.perf_counter() - started)
    return timed


def swallows_errors(app, histogram, clock):
    def timed(environ, start_response):
        route = re.sub(r"/\d+(?=/|$)", "/:id", environ["PATH_INFO"])
        started = clock()
        try:
            yield from app(environ, start_response)
        except Exception:  # noqa: BLE001 - a learner answer catching everything, on purpose
            yield b"error"
        finally:
            histogram.labels(route=route).observe(clock() - started)
    return timed


@pytest.mark.parametrize(("answer", "named"), [
    (stops_before_the_body, "before the body is sent"),
    (raw_path_label, "cardinality"),
    (no_finally, "finally"),
    (milliseconds, "milliseconds"),
    (wall_clock, "clock()"),
    (swallows_errors, "let the exception go on"),
])
def test_wrong_middlewares_fail_naming_the_mistake(answer, named):
    fails("08.q3", answer, named)


def test_middleware_not_a_function():
    fails("08.q3", "middleware", "pass your function")


# --------------------------------------------------------------------------------------------
# 08.q4: readiness


def readiness_pool(checks, timeout_s, optional=()):
    pool = ThreadPoolExecutor(max_workers=max(len(checks), 1))
    futures = {name: pool.submit(check) for name, check in checks.items()}
    wait(futures.values(), timeout=timeout_s)
    pool.shutdown(wait=False, cancel_futures=True)
    states = {}
    for name, future in futures.items():
        if not future.done():
            states[name] = "timeout"
        elif future.exception() is not None or future.result() is False:
            states[name] = "down"
        else:
            states[name] = "ok"
    failed = [name for name, state in states.items() if state != "ok"]
    if any(name not in optional for name in failed):
        return 503, {"status": "unhealthy", "checks": states}
    return 200, {"status": "degraded" if failed else "ok", "checks": states}


def readiness_threads(checks, timeout_s, optional=()):
    """One daemon thread per check, a shared deadline."""
    import threading

    results = {}

    def run(name, check):
        try:
            results[name] = "ok" if check() is not False else "down"
        except Exception:  # noqa: BLE001 - a learner answer catching everything, on purpose
            results[name] = "down"

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in checks.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    states = {name: results.get(name, "timeout") for name in checks}
    required_down = [n for n, s in states.items() if s != "ok" and n not in set(optional)]
    degraded = any(s != "ok" for s in states.values())
    body = {"checks": states,
            "status": "unhealthy" if required_down else ("degraded" if degraded else "ok")}
    return (503 if required_down else 200), body


@pytest.mark.parametrize("answer", [readiness_pool, readiness_threads])
def test_right_readiness_checks_pass(answer):
    passes("08.q4", answer)


def no_timeout(checks, timeout_s, optional=()):
    states = {}
    for name, check in checks.items():
        try:
            states[name] = "ok" if check() is not False else "down"
        except Exception:  # noqa: BLE001 - a learner answer catching everything, on purpose
            states[name] = "down"
    bad = [n for n, s in states.items() if s != "ok" and n not in optional]
    return (503 if bad else 200), {"status": "unhealthy" if bad else ("degraded" if any(
        s != "ok" for s in states.values()) else "ok"), "checks": states}


def optional_ignored(checks, timeout_s, optional=()):
    code, body = readiness_pool(checks, timeout_s)
    return code, body


def false_is_ok(checks, timeout_s, optional=()):
    pool = ThreadPoolExecutor(max_workers=max(len(checks), 1))
    futures = {name: pool.submit(check) for name, check in checks.items()}
    wait(futures.values(), timeout=timeout_s)
    pool.shutdown(wait=False)
    states = {n: ("timeout" if not f.done() else "down" if f.exception() else "ok") for n, f in futures.items()}
    failed = [n for n, s in states.items() if s != "ok"]
    if any(n not in optional for n in failed):
        return 503, {"status": "unhealthy", "checks": states}
    return 200, {"status": "degraded" if failed else "ok", "checks": states}


def status_500(checks, timeout_s, optional=()):
    code, body = readiness_pool(checks, timeout_s, optional)
    return (500 if code == 503 else code), body


def exceptions_escape(checks, timeout_s, optional=()):
    states = {name: "ok" if check() else "down" for name, check in checks.items()}
    return 200, {"status": "ok", "checks": states}


@pytest.mark.parametrize(("answer", "named"), [
    (no_timeout, "timeout"),
    (optional_ignored, "optional"),
    (false_is_ok, "False"),
    (status_500, "503"),
    (exceptions_escape, "raised"),
])
def test_wrong_readiness_checks_fail_naming_the_mistake(answer, named):
    fails("08.q4", answer, named)


# --------------------------------------------------------------------------------------------
# The lab's findings


@pytest.fixture
def lab():
    import sqlalchemy as sa

    engine = sa.create_engine("sqlite://")
    made = mp.LabApp(engine, seed=1)  # seed 1: the second slow path
    yield made
    engine.dispose()


def test_lab_endpoint_right_in_any_form(lab):
    route = lab._grading_key()["route"]
    passes("08.q6", route)
    passes("08.q6", route.replace("<id>", "42"))
    passes("08.q6", route.replace("<id>", ":id") + "/")


def test_lab_endpoint_wrong(lab):
    other = next(r for r in lab.routes if r != lab._grading_key()["route"])
    fails("08.q6", other, "p95")
    fails("08.q6", "/nowhere", "none of the lab's routes")
    fails("08.q6", 3, "string")


def test_lab_fingerprint_right_in_any_form(lab):
    sql = lab._grading_key()["sql"]
    passes("08.q7", sql)
    passes("08.q7", re.sub(r":\w+", "?", sql).upper())
    passes("08.q7", re.sub(r":\w+", "42", sql).replace(" + 0", " + ?"))


def test_lab_fingerprint_wrong(lab):
    fast = mp.LAB_HEAD_SQL[lab._grading_key()["route"]]
    fails("08.q7", fast, "by total and p95 time")
    other = next(p.sql for p in mp.LAB_SLOW_PATHS if p.route != lab._grading_key()["route"])
    fails("08.q7", other, "does not run in this lab app")
    fails("08.q7", "SELECT 1", "not the slowest fingerprint")
    fails("08.q7", "", "fingerprint as a string")
