"""Chapter 08, monitoring and profiling: what to watch, latency histograms, health checks, and
the lab's findings.

The practicals run the learner's code on hidden inputs, never on wall time. The middleware
(08.q3) serves a hidden request stream from a grader app that moves a fake clock by hidden
amounts while it answers (part before it returns, part while its body is sent, some requests
failing); the histogram it fills is compared bucket by bucket with the true durations. The
readiness check (08.q4) runs hidden dependency checks: a real SQLite ``SELECT 1``, a Redis client
on a port where nothing listens (a stopped dependency), checks that hang past the timeout or
answer ``False``, some of them optional. The lab's findings (08.q6, 08.q7) are compared with the
slow path of the lab app made last in the kernel. Reference answers live here, private.
"""

from __future__ import annotations

import math
import random
import re
import threading

import redis
import sqlalchemy as sa

from perfcourse.chapters import monitoring_and_profiling as chapter

from ..bank import Question
from ..checkers import (
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    call_learner,
    made_in_this_kernel,
    need_function,
    short_repr,
    type_name,
)

__all__ = [
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# 08.q3: a middleware that fills a route-labelled latency histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_ROUTES = {
    "/products/{}": "/products/:id",
    "/users/{}/orders": "/users/:id/orders",
    "/orders/{}/items/{}": "/orders/:id/items/:id",
    "/search": "/search",
}


class _AppCrash(Exception):
    """Raised by the grader's app for some requests (a bug in a handler)."""


class _FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def _stream(seed: int):
    """Hidden requests: path, route label, seconds before the app returns, seconds per body
    chunk, chunks, and where it fails (None, "call" or "body")."""
    rng = random.Random(seed)
    out = []
    templates = list(_ROUTES)
    for _ in range(240):
        template = rng.choice(templates)
        path = template.format(*(rng.randint(1, 99_999) for _ in range(template.count("{}"))))
        head = rng.choice([0.002, 0.004, 0.007, 0.02, 0.04])
        chunks = rng.randint(1, 4)
        tail = rng.choice([0.001, 0.01, 0.03, 0.09])
        if template == "/search":
            head, tail = head * 8, tail * 4
        fail = rng.choice([None] * 12 + ["call", "body"])
        out.append((path, _ROUTES[template], head, tail, chunks, fail))
    return out


def _expected_buckets(durations: list[float]) -> dict[float, int]:
    counts = {bound: sum(1 for d in durations if d <= bound + 1e-12) for bound in _BUCKETS}
    counts[math.inf] = len(durations)
    return counts


def _quantile(q: float, buckets: dict[float, float]) -> float:
    ordered = sorted(buckets.items())
    total = ordered[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    low_bound = low_count = 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == math.inf:
                return low_bound
            if count == low_count:
                return bound
            return low_bound + (bound - low_bound) * (rank - low_count) / (count - low_count)
        low_bound, low_count = bound, count
    return low_bound


def _histogram():
    from prometheus_client import CollectorRegistry, Histogram  # noqa: PLC0415 - optional, heavy

    registry = CollectorRegistry()
    return registry, Histogram("grader_request_seconds", "hidden", ["route"], buckets=_BUCKETS,
                               registry=registry)


def _observed(registry) -> tuple[dict[str, dict[float, float]], dict[str, float]]:
    buckets: dict[str, dict[float, float]] = {}
    sums: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            route = sample.labels.get("route")
            if sample.name.endswith("_bucket"):
                buckets.setdefault(route, {})[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                sums[route] = sample.value
    return buckets, sums


class _LatencyMiddlewareCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("08.q3", route_latency_middleware)')
        stream = _stream(8003)
        clock = _FakeClock()
        registry, histogram = _histogram()
        state = {}

        def app(environ, start_response):
            path, _route, head, tail, chunks, fail = state["request"]
            if environ.get("PATH_INFO") != path.split("?")[0]:
                raise Incorrect("Pass the WSGI environ on to the app unchanged.")
            clock.now += head
            if fail == "call":
                raise _AppCrash("handler bug")
            start_response("200 OK", [("Content-Type", "text/plain")])

            def body():
                for n in range(chunks):
                    clock.now += tail
                    if fail == "body" and n == chunks - 1:
                        raise _AppCrash("failed while streaming")
                    yield b"chunk"
            return body()

        middleware = call_learner(answer, app, histogram, clock)
        if not callable(middleware):
            raise Incorrect(f"route_latency_middleware must return a WSGI app (a callable), not a "
                            f"{type_name(middleware)}.")
        durations: dict[str, list[float]] = {}
        heads: dict[str, list[float]] = {}
        swallowed = 0

        def serve_one() -> bool:
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": state["request"][0].split("?")[0],
                       "QUERY_STRING": "", "wsgi.url_scheme": "http"}
            try:
                result = middleware(environ, lambda status, headers, exc_info=None: None)
                try:
                    for _chunk in result:
                        pass
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
            except _AppCrash:
                return True
            return False

        for request in stream:
            path, route, head, tail, chunks, fail = request
            state["request"] = request
            crashed = call_learner(serve_one)
            if fail and not crashed:
                swallowed += 1
            spent = head if fail == "call" else head + tail * chunks
            durations.setdefault(route, []).append(spent)
            heads.setdefault(route, []).append(head)
        if swallowed:
            raise Incorrect(f"{swallowed} requests whose app raised came back without the exception: "
                            "record the duration (in a finally block) and let the exception go on, "
                            "so the server answers 500 and the error tracker sees it.")
        observed, sums = _observed(registry)
        if not observed:
            raise Incorrect("Nothing was observed: call histogram.labels(route=...).observe(seconds) "
                            "once per request.")
        routes = set(observed)
        if len(routes) > 2 * len(_ROUTES) or any(r and re.search(r"/\d", r) for r in routes):
            raise Incorrect(
                f"The histogram has {len(routes)} label values, raw ids among them "
                f"({short_repr(sorted(r for r in routes if r)[0], 40)}): one time series per user or "
                "product grows without bound (cardinality). Label by the route, every numeric path "
                "segment replaced by :id.")
        if routes != set(durations):
            raise Incorrect(f"Routes seen: {sorted(map(str, routes))}; expected "
                            f"{sorted(durations)}: replace each all-digit path segment by :id, keep "
                            "the rest of the path.")
        for route, true in durations.items():
            got = observed[route]
            count = got.get(math.inf, 0)
            if count < len(true):
                raise Incorrect(
                    f"{route}: {len(true)} requests, {count:g} observed. Requests whose app raised "
                    "were not recorded: observe in a finally block.")
            if count > len(true):
                raise Incorrect(f"{route}: {len(true)} requests, {count:g} observations: observe "
                                "once per request.")
            total = sum(true)
            if sums[route] > 50 * total:
                raise Incorrect("The durations are about 1000 times too large: observe seconds "
                                "(Prometheus' base unit), not milliseconds.")
            if sums[route] < 1e-6 and total > 0:
                raise Incorrect("Every observed duration is about 0: time with the clock() you were "
                                "given, not time.perf_counter() or time.time().")
            if abs(sums[route] - sum(heads[route])) < 1e-9 < abs(total - sum(heads[route])):
                raise Incorrect(
                    "The durations stop when the app returns its body iterable, before the body is "
                    "sent: a streamed response is still running. Stop the clock when the body has "
                    "been iterated (or closed).")
            expected = _expected_buckets(true)
            if any(abs(got.get(b, -1) - n) > 1e-9 for b, n in expected.items()):
                raise Incorrect(
                    f"{route}: the bucket counts differ from the true durations (p95 "
                    f"{_quantile(0.95, got) * 1000:.1f} ms instead of "
                    f"{_quantile(0.95, expected) * 1000:.1f} ms): measure clock() from just before "
                    "the app is called until its body is finished, errors included.")

    def model_answer(self):
        return (
            "import re\n"
            "\n"
            "def route_latency_middleware(app, histogram, clock):\n"
            "    def timed(environ, start_response):\n"
            "        route = re.sub(r\"/\\d+(?=/|$)\", \"/:id\", environ[\"PATH_INFO\"])\n"
            "        started = clock()\n"
            "        body = None\n"
            "        try:\n"
            "            body = app(environ, start_response)\n"
            "            yield from body\n"
            "        finally:\n"
            "            if hasattr(body, \"close\"):\n"
            "                body.close()\n"
            "            histogram.labels(route=route).observe(clock() - started)\n"
            "    return timed")


# --------------------------------------------------------------------------------------------
# 08.q4: readiness with timeouts and optional dependencies


class _Hang:
    """A check that answers only after ``seconds`` (a dependency that accepts and never replies)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> bool:
        threading.Event().wait(self.seconds)
        return True


def _scenarios():
    # NullPool: each check opens and closes its connection in the thread that runs it
    engine = sa.create_engine("sqlite://", poolclass=sa.pool.NullPool)

    def database() -> bool:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT 1")).scalar() == 1

    stopped = redis.Redis.from_url(chapter.dead_redis_url(), socket_connect_timeout=0.2, socket_timeout=0.2)
    hang = _Hang(1.5)
    return engine, [
        ("all dependencies up", {"database": database, "queue": lambda: True}, (), 200, "ok",
         {"database": "ok", "queue": "ok"}),
        ("Redis stopped", {"database": database, "redis": stopped.ping}, (), 503, "unhealthy",
         {"database": "ok", "redis": "down"}),
        ("an optional search index that hangs", {"database": database, "search": hang}, ("search",),
         200, "degraded", {"database": "ok", "search": "timeout"}),
        ("a queue check answering False", {"queue": lambda: False, "database": database}, ("mailer",),
         503, "unhealthy", {"queue": "down", "database": "ok"}),
        ("an optional cache stopped and a database that hangs",
         {"cache": stopped.ping, "database": hang}, ("cache",), 503, "unhealthy",
         {"cache": "down", "database": "timeout"}),
    ]


class _ReadinessCheck(Checker):
    timeout_s = 0.3

    def grade(self, answer):
        need_function(answer, 'check("08.q4", readiness)')
        engine, scenarios = _scenarios()
        try:
            for what, checks, optional, code, status, details in scenarios:
                got = call_learner(answer, dict(checks), self.timeout_s, optional)
                self._compare(what, got, code, status, details, optional)
        finally:
            engine.dispose()

    @staticmethod
    def _compare(what, got, code, status, details, optional):
        if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
            raise Incorrect(f"Return a pair (status code, body dict), not {short_repr(got, 60)}.")
        got_code, body = got
        got_checks = body.get("checks")
        if not isinstance(got_checks, dict):
            raise Incorrect(f"With {what}, the body has no \"checks\" dict naming each dependency "
                            f"and its state: got {short_repr(body, 80)}.")
        for name, state in details.items():
            seen = got_checks.get(name)
            if seen == state:
                continue
            if state == "timeout" and seen == "ok":
                raise Incorrect(f"With {what}, {name} answered only after the timeout, yet it was "
                                "reported \"ok\": give each check the timeout (run it in a thread and "
                                "wait at most timeout_s); a probe that waits is a probe that fails.")
            if state == "down" and seen == "ok":
                raise Incorrect(f"With {what}, {name} answered False and was reported \"ok\": a "
                                "check that returns False is down too.")
            raise Incorrect(f"With {what}, {name} should be {state!r}, your body says "
                            f"{short_repr(seen, 30)} (\"ok\", \"down\" when it raised or returned "
                            "False, \"timeout\" when it did not answer in time).")
        if set(got_checks) != set(details):
            raise Incorrect(f"With {what}, the checks reported are {sorted(got_checks)}: report "
                            f"exactly the dependencies given ({sorted(details)}).")
        if got_code != code:
            failed = [n for n, s in details.items() if s != "ok"]
            if code == 200 and got_code == 503:
                raise Incorrect(f"With {what}, only optional dependencies failed ({', '.join(failed)}): "
                                "answer 200 with status \"degraded\"; 503 takes the instance out of "
                                "the load balancer for something it can work without.")
            if code == 503 and got_code == 500:
                raise Incorrect("Answer 503 Service Unavailable when a required dependency fails: "
                                "500 says the health endpoint itself is broken.")
            raise Incorrect(f"With {what} the status code should be {code}, not "
                            f"{short_repr(got_code, 20)}.")
        if body.get("status") != status:
            raise Incorrect(f"With {what} the body's \"status\" should be {status!r}, not "
                            f"{short_repr(body.get('status'), 30)}.")

    def model_answer(self):
        return (
            "from concurrent.futures import ThreadPoolExecutor, wait\n"
            "\n"
            "def readiness(checks, timeout_s, optional=()):\n"
            "    pool = ThreadPoolExecutor(max_workers=max(len(checks), 1))\n"
            "    futures = {name: pool.submit(check) for name, check in checks.items()}\n"
            "    wait(futures.values(), timeout=timeout_s)\n"
            "    pool.shutdown(wait=False, cancel_futures=True)\n"
            "    states = {}\n"
            "    for name, future in futures.items():\n"
            "        if not future.done():\n"
            "            states[name] = \"timeout\"\n"
            "        elif future.exception() is not None or future.result() is False:\n"
            "            states[name] = \"down\"\n"
            "        else:\n"
            "            states[name] = \"ok\"\n"
            "    failed = [name for name, state in states.items() if state != \"ok\"]\n"
            "    if any(name not in optional for name in failed):\n"
            "        return 503, {\"status\": \"unhealthy\", \"checks\": states}\n"
            "    return 200, {\"status\": \"degraded\" if failed else \"ok\", \"checks\": states}")


# --------------------------------------------------------------------------------------------
# 08.q6, 08.q7: the lab's findings


def _lab():
    return made_in_this_kernel(chapter.current_lab(), "lab app", "run the lab's setup cells first (LabApp(...)).")


def _route_of(text: str) -> str:
    path = text.strip().split("?")[0].rstrip("/")
    return re.sub(r"/(?:\d+|<[^>]*>|:\w+|\{\w*\})(?=/|$)", "/<id>", path)


class _SlowEndpointCheck(Checker):
    def grade(self, answer):
        if not isinstance(answer, str):
            raise Incorrect(f'Answer with the route as a string, e.g. "/orders/<id>" (got a '
                            f"{type_name(answer)}).")
        lab = _lab()
        route = _route_of(answer)
        if route not in lab.routes:
            raise Incorrect(f"{short_repr(answer, 40)} is none of the lab's routes "
                            f"({', '.join(lab.routes)}).")
        if route != lab._grading_key()["route"]:
            raise Incorrect(f"{route} is not where the time goes: compare p95 (not the mean) per "
                            "route in the histogram, and the durations of the request spans.")

    def model_answer(self):
        return "the route whose p95 stands out in the histogram (it depends on the hidden seed)"


def _normal_sql(sql: str) -> str:
    text = sql.lower()
    text = re.sub(r"'(?:[^']|'')*'", "?", text)
    text = re.sub(r":\w+|%\(\w+\)s|\$\d+", "?", text)
    text = re.sub(r"\b\d+(?:\.\d+)?\b", "?", text)
    text = re.sub(r"\(\s*\?(?:\s*,\s*\?)*\s*\)", "(?)", text)
    return " ".join(text.replace("(", " ( ").replace(")", " ) ").replace(",", " , ").split())


class _SlowFingerprintCheck(Checker):
    def grade(self, answer):
        if not isinstance(answer, str) or not answer.strip():
            raise Incorrect("Answer with the fingerprint as a string: the SQL with its literals and "
                            f"parameters replaced by ? (got {short_repr(answer, 30)}).")
        planted = _lab()._grading_key()
        mine = _normal_sql(answer)
        right = _normal_sql(planted["sql"])
        if mine == right:
            return
        others = {s.route: _normal_sql(s.sql) for s in chapter.LAB_SLOW_PATHS if s.route != planted["route"]}
        fast = [_normal_sql(s) for s in chapter.LAB_HEAD_SQL.values()]
        if mine in fast:
            raise Incorrect("That statement runs on every request of its route and is fast: rank "
                            "fingerprints by total and p95 time, not by count.")
        if any(mine == other for other in others.values()):
            raise Incorrect("That statement does not run in this lab app: take the fingerprints from "
                            "this run's query log.")
        if len(mine) >= 30 and mine in right:
            return
        raise Incorrect("That is not the slowest fingerprint of this app: group the query log by "
                        "fingerprint (literals and parameters as ?) and take the one with the largest "
                        "total time.")

    def model_answer(self):
        return "the fingerprint at the top of the DuckDB table by total time (seed-dependent)"


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="08.q1",
        title="What tools do you use for monitoring? (interview question 5)",
        checker=MultiChoice(
            options={
                "a": "Averages of response time per endpoint, as the one figure to alert on",
                "b": "An APM or tracing tool (New Relic, DataDog, OpenTelemetry) showing each "
                "request's SQL",
                "c": "Structured logs with a request id carried into SQL logs and jobs",
                "d": "A profiler attached to every request in production, the way it runs in "
                "development",
                "e": "A health check that runs the app's heaviest report query to be thorough",
                "f": "Latency histograms and counters scraped into a metrics system, with alerts "
                "on thresholds",
                "g": "Error tracking (Sentry) grouping exceptions, with breadcrumbs",
                "h": "Each user id as a metric label, to see every user's latency",
            },
            correct={"b", "c", "f", "g"},
            explanations={
                "a": "The mean hides the tail: in this chapter's load the mean stayed far below the "
                "p95. Alert on percentiles (p95, p99) and on the error rate.",
                "d": "A profiler slows every request and produces more data than anyone reads: "
                "sample it, or attach it only to slow requests as the chapter's middleware does.",
                "e": "Health checks run every few seconds from every balancer: they must be cheap "
                "(SELECT 1, PING) and bounded by a timeout, or they become the load.",
                "h": "Each label value is a separate time series: user ids make millions and "
                "swamp the metrics system (cardinality). Label by route and status.",
            },
        ),
        explanation="The guide's answer, made concrete: APM/tracing, structured logs with "
        "correlation ids, metrics with alert thresholds, error tracking, and cheap health checks "
        "of the dependencies. Each was built in this chapter.",
    ),
    Question(
        id="08.q2",
        title="What a mean latency hides",
        checker=Choice(
            options={
                "a": "About 1 request in 20 takes 900 ms or more: the many fast ones pull the "
                "mean down; alert on p95",
                "b": "The histogram's buckets are wrong: a correct one agrees with the mean, so "
                "re-bucket it",
                "c": "Nothing worth acting on: the mean is under budget, so the users are served "
                "well enough",
                "d": "The p95 is an outlier from one slow request: drop the top 5% and look at "
                "the rest",
                "e": "The server is overloaded: the mean would rise with the p95 if the code "
                "itself were slow",
            },
            correct="a",
            explanations={
                "b": "Bucket edges change how precisely a quantile is estimated, not whether the "
                "tail exists: no bucketing makes p95 agree with the mean of a skewed distribution.",
                "c": "A user who loads 20 pages meets the p95 about once per visit: the budget is "
                "about percentiles, and this one is 4.5 times over it.",
                "d": "p95 is by definition 5% of the requests, not one: 1 in 20 users' requests is a "
                "lot of traffic, and dropping them hides exactly what to fix.",
                "e": "A slow path used by few requests (a search, an N+1 page) raises the tail and "
                "barely moves the mean, with no overload at all: find the route first.",
            },
        ),
        explanation="Latencies are skewed: most requests are fast, a few are very slow. The mean "
        "mixes them into a figure no request had; p95 says what 1 request in 20 gets. The "
        "chapter's load showed a mean well under its p95.",
    ),
    Question(
        id="08.q3",
        title="A latency histogram labelled by route",
        checker=_LatencyMiddlewareCheck(),
        explanation="Time from just before the app is called until its body is finished (a "
        "streamed body is part of the request), in a finally block so failed requests count too, "
        "in seconds, with a bounded label: the route with ids as :id. Then the histogram's "
        "quantiles are the ones the users saw.",
        hints=("route = re.sub(r\"/\\d+(?=/|$)\", \"/:id\", environ[\"PATH_INFO\"]); started = clock(); "
               "in a generator: try: yield from app(environ, start_response) finally: "
               "histogram.labels(route=route).observe(clock() - started).",),
        time_limit=10.0,
    ),
    Question(
        id="08.q4",
        title="Readiness with timeouts and optional dependencies",
        checker=_ReadinessCheck(),
        explanation="Each check runs with a deadline (a thread and wait(timeout)); one that raises "
        "or answers False is down, one that has not answered is a timeout. A required dependency "
        "down means 503 (take me out of the balancer); only optional ones down means 200, "
        "degraded.",
        hints=("Submit every check to a ThreadPoolExecutor, wait(futures, timeout=timeout_s), then "
               "classify each future: not done -> timeout, exception or False -> down, else ok.",),
        time_limit=12.0,
    ),
    Question(
        id="08.q5",
        title="Liveness is not readiness",
        checker=Choice(
            options={
                "a": "Nothing: the probe is right to fail, and restarting clears the database's "
                "stale connections",
                "b": "Only the instance that noticed first restarts; the others take its traffic "
                "until it is back",
                "c": "The probe times out but the orchestrator ignores it while the app still "
                "answers other paths",
                "d": "Every instance is restarted, which cannot fix the database; keep dependencies "
                "in readiness only",
                "e": "The instances stop getting traffic until the database is back, which is "
                "exactly what liveness is for",
            },
            correct="d",
            explanations={
                "a": "Restarting does not make the database reachable: it adds boot time and "
                "connection storms to the outage. Pools reconnect on their own (pre_ping).",
                "b": "Every instance runs the same probe against the same database: they all fail "
                "together and all restart together.",
                "c": "A failing liveness probe is exactly what makes the orchestrator kill the "
                "container: it does not look at other paths.",
                "e": "Taking instances out of the balancer is readiness. Liveness failing means "
                "\"this process is stuck: kill it\".",
            },
        ),
        explanation="Liveness asks \"is this process stuck?\": answer it from the process alone. "
        "Readiness asks \"can I serve now?\": that is where the database, Redis and queue checks "
        "go, so an outage takes instances out of the balancer without killing them.",
    ),
    Question(
        id="08.q6",
        title="Lab: the slow endpoint",
        checker=_SlowEndpointCheck(),
        explanation="The route whose p95 stands apart in the latency histogram, and whose requests "
        "ran the costliest fingerprint of the SQL log: metrics and logs agree.",
    ),
    Question(
        id="08.q7",
        title="Lab: the slowest query fingerprint",
        checker=_SlowFingerprintCheck(),
        explanation="Grouping the query log by fingerprint and ranking by total (and p95) time "
        "names the statement to fix, whatever its parameters were.",
    ),
]
