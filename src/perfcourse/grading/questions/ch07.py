"""Chapter 07, infrastructure scaling: workers and threads, preload and fork, load balancing.

Practical questions are graded by behaviour on inputs the learner has not seen: the sizing rule
on hidden (cores, I/O fraction) pairs, and the round-robin choice on hidden sequences of backend
health (the backend chosen for every request and the count per backend). No server is started:
these checks run in well under a second.
"""

from __future__ import annotations

import inspect
import math
import random
import re
import textwrap
from collections import Counter

from perfcourse.chapters import infrastructure_scaling as infra
from perfcourse.chapters.infrastructure_scaling import next_healthy

from ..bank import Question
from ..checkers import (
    NOT_WRITTEN,
    Checker,
    Choice,
    FunctionCheck,
    Incorrect,
    MultiChoice,
    NoAnswer,
    call_learner,
    short_repr,
    shorten,
    type_name,
)

__all__ = [
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# 07.q3: workers and threads from cores and the I/O fraction


def _workers_and_threads(cores, io_fraction):
    workers = max(1, int(cores))
    if io_fraction >= 1:
        return (workers, 32)
    return (workers, min(32, max(1, round(1 / (1 - max(0.0, io_fraction))))))


def _sizing_cases(rng):
    cases = [(2, 0.0), (1, 0.5), (4, 0.9), (2, 0.75), (8, 0.99), (3, 1.0), (16, 0.2)]
    while len(cases) < 40:
        f = round(rng.uniform(0, 0.995), 3)
        x = 1 / (1 - f)
        if abs(x - math.floor(x) - 0.5) < 0.01:  # no half-way rounding ambiguity
            continue
        cases.append((rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 32, 64]), f))
    return cases


def _same_pair(got, expected):
    try:
        return tuple(int(v) for v in got) == tuple(expected) and len(tuple(got)) == 2
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# 07.q4: round robin over the healthy backends


def _next_healthy(healthy, previous):
    return next_healthy(healthy, previous)


def _health_sequences(rng):
    """(number of backends, health per request): outages that start and end at hidden times."""
    sequences = [(2, [[True, True]] * 6), (3, [[True, False, True]] * 7), (2, [[False, False]] * 2)]
    for _ in range(6):
        n = rng.randint(2, 5)
        state = [True] * n
        steps = []
        for _ in range(rng.randint(30, 60)):
            if rng.random() < 0.15:
                k = rng.randrange(n)
                state[k] = not state[k]
            steps.append(list(state))
        sequences.append((n, steps))
    return sequences


class _ChooseBackendCheck(Checker):
    def grade(self, answer):
        if not callable(answer):
            raise Incorrect(f'Pass your function itself: check("07.q4", choose_backend) (got a {type_name(answer)}).')
        for n, steps in _health_sequences(random.Random(7004)):
            previous = -1
            served, expected_served = Counter(), Counter()
            for request, healthy in enumerate(steps):
                expected = _next_healthy(healthy, previous)
                got = call_learner(answer, list(healthy), previous)
                if got != expected:
                    raise Incorrect(
                        f"Request {request + 1} of a hidden sequence over {n} backends: health "
                        f"{short_repr(healthy, 60)}, previous choice {previous}: you chose "
                        f"{short_repr(got, 30)}, round robin chooses {expected}"
                        + (" (no backend is healthy)" if expected == -1 else "") + ".")
                if expected >= 0:
                    served[got] += 1
                    expected_served[expected] += 1
                    previous = expected
            if served != expected_served:  # unreachable when every choice matched; kept as a guard
                raise Incorrect(f"Requests per backend {dict(served)}, expected {dict(expected_served)}.")

    def model_answer(self):
        return ("def choose_backend(healthy, previous):\n"
                "    n = len(healthy)\n"
                "    for step in range(1, n + 1):\n"
                "        index = (previous + step) % n\n"
                "        if healthy[index]:\n"
                "            return index\n"
                "    return -1\n")


# --------------------------------------------------------------------------------------------
# 07.q6: a post_fork hook, run in a real gunicorn


class _PostForkCheck(Checker):
    requests = 12

    def grade(self, answer):


        if not callable(answer):
            raise Incorrect(f'Pass your hook itself: check("07.q6", post_fork) (got a {type_name(answer)}).')
        try:
            source = textwrap.dedent(inspect.getsource(answer))
        except (OSError, TypeError):
            raise Incorrect("The grader cannot read your hook's source: define it with `def` in a cell "
                            "and run that cell.") from None
        if "NotImplementedError" in source:
            raise NoAnswer(NOT_WRITTEN)
        if getattr(answer, "__name__", "") != "post_fork":
            source += f"\npost_fork = {answer.__name__}\n"
        try:
            origins = infra.connection_origins(preload=True, hooks=source, requests=self.requests,
                                               startup_timeout_s=15.0)
        except (RuntimeError, TimeoutError) as exc:
            lines = str(exc).strip().splitlines()
            errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)]
            raise Incorrect("gunicorn's workers did not boot with your hook: "
                            + shorten(errors[-1] if errors else lines[-1], 200)) from None
        inherited, own = origins["inherited_connection"], origins["own_connection"]
        if inherited:
            raise Incorrect(f"{inherited} of {self.requests} requests were still answered over the connection "
                            "the master opened before fork: the workers' pool was not reset.")
        if own != self.requests:
            raise Incorrect(f"Only {own} of {self.requests} requests were answered.")

    def model_answer(self):
        return _hook_source()


def _hook_source() -> str:
    return infra.POST_FORK_DISPOSE.strip() + "\n"


QUESTIONS = [
    Question(
        id="07.q1",
        title="How do you scale a web application? (interview question 4)",
        checker=MultiChoice(
            options={
                "a": "Horizontal: more identical, stateless app servers behind a load balancer",
                "b": "Vertical: a bigger machine, with worker processes sized to its cores",
                "c": "Database scaling: read replicas, connection pooling, sharding when writes outgrow one server",
                "d": "Caching at several layers, so most requests never reach the database",
                "e": "Background jobs for slow work, and a CDN for static files",
                "f": "More threads per worker for CPU-bound Python code, since threads use every core",
                "g": "Keep sessions and uploads on the local disk of each app server",
            },
            correct={"a", "b", "c", "d", "e"},
            explanations={
                "f": "The GIL lets one thread of a process run Python at a time: CPU-bound work "
                "needs processes (workers), as the processes-vs-threads experiment showed.",
                "g": "Local state pins a user to one server: the balancer can no longer send a "
                "request anywhere, and a server that dies takes the data with it. Keep it in a "
                "shared store (database, Redis, object storage).",
            },
        ),
        explanation="The guide's five levers: app servers out (horizontal) or up (vertical), "
        "the database (replicas, pools, shards), caches, and moving work off the request path "
        "(jobs, CDN). Horizontal scaling needs stateless app servers.",
    ),
    Question(
        id="07.q2",
        title="How do you handle high traffic? (interview question 10)",
        checker=MultiChoice(
            options={
                "a": "A load balancer with health checks spreading requests over several app servers",
                "b": "Caching (Redis, HTTP, CDN) so repeated requests cost little",
                "c": "Database relief: replicas for reads, a connection pool sized to the workers",
                "d": "Background jobs for the slow parts of a request",
                "e": "Measure first: load-test to find where throughput stops growing",
                "f": "Raise every timeout so that slow requests finish instead of failing",
                "g": "Start one thread per incoming request, without a limit",
            },
            correct={"a", "b", "c", "d", "e"},
            explanations={
                "f": "Longer timeouts keep workers busy with stuck requests: the queue grows and "
                "healthy requests wait too. Short timeouts and shedding load protect the rest.",
                "g": "Unbounded threads exhaust memory and database connections under a spike; "
                "a fixed pool (gunicorn threads, a bounded queue) keeps the server responsive.",
            },
        ),
        explanation="Spread (balancer), avoid work (caches, CDN), protect the database "
        "(replicas, pools), defer work (jobs), and measure where the limit is before a spike "
        "finds it for you.",
    ),
    Question(
        id="07.q3",
        title="Workers and threads from cores and the I/O fraction",
        checker=FunctionCheck(reference=_workers_and_threads, cases=_sizing_cases, compare=_same_pair),
        answer="def workers_and_threads(cores, io_fraction):\n"
        "    workers = max(1, cores)\n"
        "    if io_fraction >= 1:\n"
        "        return workers, 32\n"
        "    return workers, min(32, max(1, round(1 / (1 - io_fraction))))\n",
        explanation="Processes are the unit of CPU parallelism (one per core); threads overlap "
        "waiting. A request that waits 90% of its time uses the CPU 10% of it: about 10 can share "
        "a core. The cap bounds memory and database connections.",
        hints=("workers = max(1, cores); if io_fraction >= 1 the threads are 32; otherwise "
               "threads = round(1 / (1 - io_fraction)), then clamp it between 1 and 32; return "
               "(workers, threads).",),
    ),
    Question(
        id="07.q4",
        title="Round robin that skips unhealthy backends",
        checker=_ChooseBackendCheck(),
        explanation="Start after the previous choice and walk at most once around the ring, "
        "returning the first healthy index: healthy backends share the load evenly and a dead "
        "one gets nothing until its health check passes again.",
        hints=("for step in 1..n: index = (previous + step) % n; return it if healthy[index]. "
               "After the loop, return -1.",),
    ),
    Question(
        id="07.q5",
        title="preload_app and connections opened before fork",
        checker=Choice(
            options={
                "a": "Nothing: each worker gets its own copy of the connection, so it is safe",
                "b": "Call engine.dispose(close=False) in a post_fork hook, so each worker opens "
                "its own connections and the master's stay untouched",
                "c": "Call engine.dispose() (closing) in every worker at the end of each request",
                "d": "Turn preload_app off: preloading cannot be combined with a database",
            },
            correct="b",
            explanations={
                "a": "The worker copies the Python object, not the connection: both processes "
                "then talk over the same socket (or SQLite file handle) and their messages "
                "interleave. The experiment counted every request on a connection the master opened.",
                "c": "Closing in a worker sends the server a goodbye on the master's socket, and "
                "disposing per request throws away the pool's benefit.",
                "d": "Preloading saves memory (copy-on-write) and boot time; it only needs the "
                "engine's pool reset after fork.",
            },
        ),
        explanation="With preload_app the app is imported once in the master and workers are "
        "forked from it. dispose(close=False) in post_fork drops the inherited pool without "
        "closing what the master uses; the worker's first query opens its own connection "
        "(Rails: establish_connection in on_worker_boot).",
    ),
    Question(
        id="07.q6",
        title="A post_fork hook that resets the inherited pool",
        checker=_PostForkCheck(),
        explanation="gunicorn calls post_fork(server, worker) in each new worker. Disposing the "
        "engine's pool there drops the connections copied from the master; close=False leaves "
        "the master's own connections intact (closing them from a child would end the master's "
        "session on a shared socket). The worker's first query opens its own connection.",
        hints=("Import the module that holds the engine (from perfcourse.chapters import "
               "infrastructure_scaling as infra); if infra.ENGINE is not None, call "
               "infra.ENGINE.dispose(close=False).",),
        time_limit=60.0,
    ),
]
