"""Chapter 07, infrastructure scaling: workers and threads, preload and fork, load balancing.

Practical questions are graded by behaviour on inputs the learner has not seen: the sizing rule
on hidden servers (cores, memory) and measured request profiles, the least-connections choice on
hidden sequences of backend health and load (every choice compared, a known mistake named in the
hint), and the post_fork hook in a real 2-worker gunicorn whose preloaded app opened its primary
and its replica engine at boot. Reference answers are private to this module.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
import re
import textwrap
from collections.abc import Callable

from perfcourse.chapters import infrastructure_scaling as infra

from ..bank import Question
from ..checkers import (
    NOT_WRITTEN,
    Checker,
    Choice,
    Incorrect,
    MultiChoice,
    NoAnswer,
    call_learner,
    is_unwritten,
    need_function,
    short_repr,
    shorten,
    values_equal,
)

__all__ = [
    "QUESTIONS",
]


def _first_mistake(got, args: tuple, mistakes: tuple[tuple[Callable, str], ...]) -> str:
    """The hint of the first known mistake that gives ``got`` on ``args`` (called only when
    ``got`` is not the right answer)."""
    for mistake, hint in mistakes:
        try:
            made = mistake(*copy.deepcopy(args))
        except Exception:  # noqa: BLE001 - a mistake that does not apply to this input
            continue
        if values_equal(got, made):
            return " " + hint
    return ""


# --------------------------------------------------------------------------------------------
# 07.q3: workers and threads for a memory limit and a measured request profile


def _io_fraction(samples):
    cpu = sum(c for c, _ in samples)
    wait = sum(w for _, w in samples)
    return wait / (cpu + wait)


def _threads_for(fraction):
    if fraction >= 1:
        return 32
    return min(32, max(1, round(1 / (1 - fraction))))


def _size_server(cores, memory_mb, worker_mb, samples):
    workers = max(1, min(cores, memory_mb // worker_mb))
    return (workers, _threads_for(_io_fraction(samples)))


def _ignores_memory(cores, memory_mb, worker_mb, samples):
    return (max(1, cores), _threads_for(_io_fraction(samples)))


def _memory_rounded_up(cores, memory_mb, worker_mb, samples):
    return (max(1, min(cores, math.ceil(memory_mb / worker_mb))), _threads_for(_io_fraction(samples)))


def _no_floor_of_one(cores, memory_mb, worker_mb, samples):
    return (min(cores, memory_mb // worker_mb), _threads_for(_io_fraction(samples)))


def _mean_of_fractions(cores, memory_mb, worker_mb, samples):
    fractions = [w / (c + w) for c, w in samples]
    return (max(1, min(cores, memory_mb // worker_mb)), _threads_for(sum(fractions) / len(fractions)))


def _wait_over_cpu(cores, memory_mb, worker_mb, samples):
    cpu = sum(c for c, _ in samples)
    wait = sum(w for _, w in samples)
    threads = 32 if cpu == 0 else min(32, max(1, round(wait / cpu)))
    return (max(1, min(cores, memory_mb // worker_mb)), threads)


_SIZING_MISTAKES = (
    (_ignores_memory, "Workers are limited by memory as well as cores: at most "
     "memory_mb // worker_mb of them fit."),
    (_memory_rounded_up, "A worker that does not fit completely in the memory left does not fit: "
     "round memory_mb / worker_mb down (//), not up."),
    (_no_floor_of_one, "Even when one worker does not fit in memory_mb, run 1 worker (at least 1)."),
    (_mean_of_fractions, "Weight the profile by time: io_fraction is the total wait over the total "
     "time of all samples, not the mean of each request's fraction (long requests count more)."),
    (_wait_over_cpu, "The threads are round(1 / (1 - io_fraction)), with io_fraction = wait / "
     "(cpu + wait), not wait / cpu."),
)


def _near_half(fraction):
    if fraction >= 1:
        return False
    x = 1 / (1 - fraction)
    return abs(x - math.floor(x) - 0.5) < 0.02


def _sizing_cases(rng):
    # Edge cases first: one worker does not fit, memory exactly for two, requests that never
    # use the CPU, requests that never wait, a long request among short ones (weighting).
    cases = [
        (4, 1500, 2000, [(10, 10), (20, 20)]),
        (8, 4000, 2000, [(5, 45), (5, 45)]),
        (2, 8000, 500, [(0, 30), (0, 70)]),
        (6, 5000, 700, [(12, 0), (8, 0), (30, 0)]),
        (16, 3000, 350, [(10, 10), (10, 10), (10, 10), (2, 398)]),
    ]
    while len(cases) < 40:
        samples = [(rng.choice([0, 1, 2, 5, 8, 15, 40]), rng.choice([0, 3, 10, 25, 60, 150, 400]))
                   for _ in range(rng.randint(1, 6))]
        if sum(c + w for c, w in samples) == 0:
            continue
        fractions = [w / (c + w) for c, w in samples if c + w]
        if _near_half(_io_fraction(samples)) or _near_half(sum(fractions) / len(fractions)):
            continue
        cases.append((rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 32, 64]), rng.randrange(300, 65_000, 50),
                      rng.choice([150, 250, 400, 600, 900, 1500]), samples))
    return cases


def _as_pair(got):
    try:
        pair = tuple(got)
        if len(pair) != 2 or any(isinstance(v, bool) or int(v) != v for v in pair):
            return None
        return (int(pair[0]), int(pair[1]))
    except (TypeError, ValueError, OverflowError):
        return None


class _SizingCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("07.q3", size_server)')
        for cores, memory_mb, worker_mb, samples in _sizing_cases(random.Random(7003)):
            shown = f"size_server({cores}, {memory_mb}, {worker_mb}, {short_repr(samples, 80)})"
            expected = _size_server(cores, memory_mb, worker_mb, [tuple(s) for s in samples])
            got = call_learner(answer, cores, memory_mb, worker_mb, [tuple(s) for s in samples])
            pair = _as_pair(got)
            if pair is None:
                raise Incorrect(f"Return a tuple of two whole numbers (workers, threads); {shown} "
                                f"returned {short_repr(got, 60)}.")
            if pair != expected:
                hint = _first_mistake(pair, (cores, memory_mb, worker_mb, samples), _SIZING_MISTAKES)
                if not hint and pair[1] > 32:
                    hint = " Cap the threads at 32 (and use 32 when the requests never use the CPU)."
                elif not hint and pair[0] < 1:
                    hint = " Run at least 1 worker, even when one does not fit in memory_mb."
                raise Incorrect(f"{shown} returned {pair}, expected {expected}.{hint}")

    def model_answer(self):
        return ("def size_server(cores, memory_mb, worker_mb, samples):\n"
                "    workers = max(1, min(cores, memory_mb // worker_mb))\n"
                "    cpu = sum(c for c, _ in samples)\n"
                "    wait = sum(w for _, w in samples)\n"
                "    io_fraction = wait / (cpu + wait)\n"
                "    if io_fraction >= 1:\n"
                "        return workers, 32\n"
                "    return workers, min(32, max(1, round(1 / (1 - io_fraction))))\n")


# --------------------------------------------------------------------------------------------
# 07.q4: least connections over the healthy backends, ties broken round robin


def _least_connections(healthy, active, previous):
    n = len(healthy)
    best = -1
    for step in range(1, n + 1):
        index = (previous + step) % n
        if healthy[index] and (best < 0 or active[index] < active[best]):
            best = index
    return best


def _ignores_health(healthy, active, previous):
    return _least_connections([True] * len(healthy), active, previous)


def _ties_to_lowest(healthy, active, previous):
    candidates = [i for i in range(len(healthy)) if healthy[i]]
    return min(candidates, key=lambda i: (active[i], i)) if candidates else -1


def _most_connections(healthy, active, previous):
    return _least_connections(healthy, [-a for a in active], previous)


def _plain_round_robin(healthy, active, previous):
    return _least_connections(healthy, [0] * len(active), previous)


def _ties_from_previous(healthy, active, previous):  # starts the walk at previous itself
    return _least_connections(healthy, active, previous - 1)


_BALANCER_MISTAKES = (
    (_ignores_health, "That backend is down (healthy is False): choose among the healthy ones only."),
    (_plain_round_robin, "That is plain round robin: choose the healthy backend with the fewest "
     "active connections; round robin only breaks ties."),
    (_most_connections, "You chose the busiest backend: least connections means the fewest active."),
    (_ties_to_lowest, "On a tie you chose the lowest index: break ties by round robin, the first "
     "tied backend after previous (wrapping around), so tied backends take turns."),
    (_ties_from_previous, "On a tie, start after previous: previous itself is the last candidate, "
     "not the first."),
)


def _balancer_sequences(rng):
    """(backends, [(healthy, active), ...]): load and outages that change at hidden times."""
    sequences = [
        (3, [([True, True, True], [0, 0, 0])] * 6),
        (4, [([True, False, True, True], [2, 0, 2, 5]), ([True, False, True, True], [3, 0, 2, 5]),
             ([True, False, True, True], [3, 0, 3, 5]), ([False, True, True, True], [3, 9, 3, 1])]),
        (2, [([False, False], [1, 0])] * 2),
    ]
    for _ in range(8):
        n = rng.randint(2, 6)
        healthy = [True] * n
        active = [rng.randint(0, 3) for _ in range(n)]
        steps = []
        for _ in range(rng.randint(25, 50)):
            if rng.random() < 0.12:
                k = rng.randrange(n)
                healthy[k] = not healthy[k]
            for k in range(n):  # requests finish
                if active[k] and rng.random() < 0.3:
                    active[k] -= 1
            steps.append((list(healthy), list(active)))
            chosen = _least_connections(healthy, active, -1)
            if chosen >= 0:
                active[chosen] += 1  # the request this step sends
        sequences.append((n, steps))
    return sequences


class _LeastConnectionsCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("07.q4", choose_backend)')
        for n, steps in _balancer_sequences(random.Random(7004)):
            previous = -1
            for request, (healthy, active) in enumerate(steps):
                expected = _least_connections(healthy, active, previous)
                got = call_learner(answer, list(healthy), list(active), previous)
                if isinstance(got, bool) or not isinstance(got, int):
                    raise Incorrect(f"Return the index of the backend as an int, or -1 (got "
                                    f"{short_repr(got, 40)} for healthy={healthy}, active={active}, "
                                    f"previous={previous}).")
                if got != expected:
                    if expected == -1:
                        hint = " No backend is healthy: return -1."
                    else:
                        hint = _first_mistake(got, (healthy, active, previous), _BALANCER_MISTAKES)
                    raise Incorrect(
                        f"Request {request + 1} of a hidden sequence over {n} backends: "
                        f"choose_backend({healthy}, {active}, {previous}) returned {got}, expected "
                        f"{expected}.{hint}")
                if expected >= 0:
                    previous = expected

    def model_answer(self):
        return inspect.getsource(_least_connections).replace("_least_connections", "choose_backend")


# --------------------------------------------------------------------------------------------
# 07.q6: a post_fork hook, run in a real gunicorn whose app opened two engines at boot


class _PostForkCheck(Checker):
    requests = 12

    def grade(self, answer):
        need_function(answer, 'check("07.q6", post_fork)')
        if is_unwritten(answer):
            raise NoAnswer(NOT_WRITTEN)
        try:
            source = textwrap.dedent(inspect.getsource(answer))
        except (OSError, TypeError):
            raise Incorrect("The grader cannot read your hook's source: define it with `def` in a cell "
                            "and run that cell.") from None
        name = getattr(answer, "__name__", "")
        if name != "post_fork":
            if not name.isidentifier():
                raise Incorrect("Define the hook with `def post_fork(server, worker):` (a lambda "
                                "cannot be written into gunicorn's config file).")
            source += f"\npost_fork = {name}\n"
        try:
            origins = infra.connection_origins(preload=True, hooks=source, requests=self.requests,
                                               replica=True, startup_timeout_s=10.0)
        except (RuntimeError, TimeoutError) as exc:
            lines = str(exc).strip().splitlines() or ["(no output)"]
            errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)]
            raise Incorrect("gunicorn's workers did not boot with your hook: "
                            + shorten(errors[-1] if errors else lines[-1], 200)) from None
        inherited, own = origins["inherited_connection"], origins["own_connection"]
        replica = origins["inherited_replica"]
        if inherited:
            which = ("the replica engine, infra.READ_ENGINE, was not reset"
                     if replica == inherited else
                     "the primary engine, infra.ENGINE, was not reset" if not replica else
                     "neither engine's pool was reset")
            raise Incorrect(f"{inherited} of {self.requests} requests were still answered over a "
                            f"connection the master opened before fork: {which}.")
        if origins["closed_inherited"]:
            raise Incorrect("Your hook closed connections the master opened (dispose() closes "
                            "them): on PostgreSQL that ends the master's session on the shared "
                            "socket. Forget them without closing: dispose(close=False).")
        if own != self.requests:
            raise Incorrect(f"Only {own} of {self.requests} requests were answered.")

    def model_answer(self):
        return ("def post_fork(server, worker):\n"
                "    from perfcourse.chapters import infrastructure_scaling as infra\n"
                "    for engine in (infra.ENGINE, infra.READ_ENGINE):\n"
                "        if engine is not None:\n"
                "            engine.dispose(close=False)\n")


QUESTIONS = [
    Question(
        id="07.q1",
        title="How do you scale a web application? (interview question 4)",
        checker=MultiChoice(
            options={
                "a": "Horizontal: more identical, stateless app servers behind a load balancer",
                "b": "More threads per worker for CPU-bound Python code, so that every core is kept busy",
                "c": "Vertical: a bigger machine, with worker processes sized to its cores",
                "d": "Database scaling: read replicas, connection pooling, sharding when writes outgrow one server",
                "e": "Keep sessions and uploads on the local disk of each app server, saving a network hop",
                "f": "Caching at several layers, so most requests never reach the database",
                "g": "Background jobs for slow work, and a CDN for static files",
                "h": "Many more worker processes than cores, so CPU-bound requests never wait their turn",
            },
            correct={"a", "c", "d", "f", "g"},
            explanations={
                "b": "The GIL lets one thread of a process run Python at a time: CPU-bound work "
                "needs processes (workers), as the processes-vs-threads experiment showed.",
                "e": "Local state pins a user to one server: the balancer can no longer send a "
                "request anywhere, and a server that dies takes the data with it. Keep it in a "
                "shared store (database, Redis, object storage).",
                "h": "Past the core count, extra processes only take turns on the same cores: "
                "CPU-bound throughput stayed flat in the workers experiment, while each process "
                "costs memory and database connections.",
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
                "a": "Raise every timeout so that slow requests finish instead of failing",
                "b": "A load balancer with health checks spreading requests over several app servers",
                "c": "Caching (Redis, HTTP, CDN) so repeated requests cost little",
                "d": "Start one thread per incoming request, without a limit, so no request waits",
                "e": "Database relief: replicas for reads, a connection pool sized to the workers",
                "f": "Background jobs for the slow parts of a request",
                "g": "Give every worker the largest database pool the server allows, so no query waits",
                "h": "Measure first: load-test to find where throughput stops growing",
            },
            correct={"b", "c", "e", "f", "h"},
            explanations={
                "a": "Longer timeouts keep workers busy with stuck requests: the queue grows and "
                "healthy requests wait too. Short timeouts and shedding load protect the rest.",
                "d": "Unbounded threads exhaust memory and database connections under a spike; "
                "a fixed pool (gunicorn threads, a bounded queue) keeps the server responsive.",
                "g": "Workers times pool size is what the database must hold at once: oversized "
                "pools exhaust its connections (chapter 03). Size the pool to the threads that "
                "use it.",
            },
        ),
        explanation="Spread (balancer), avoid work (caches, CDN), protect the database "
        "(replicas, pools), defer work (jobs), and measure where the limit is before a spike "
        "finds it for you.",
    ),
    Question(
        id="07.q3",
        title="Workers and threads for a memory limit and a measured request profile",
        checker=_SizingCheck(),
        explanation="Processes are the unit of CPU parallelism, but each holds a copy of the app: "
        "the smaller of cores and what fits in memory decides the workers. Threads cover the "
        "waiting, and the profile must be weighted by time: a request waiting 90% of its time "
        "uses the CPU 10% of it, so about 10 share a core.",
        hints=("workers = max(1, min(cores, memory_mb // worker_mb)); io_fraction = total wait / "
               "total (cpu + wait) over the samples; threads = 32 if io_fraction >= 1 else "
               "min(32, max(1, round(1 / (1 - io_fraction)))).",),
    ),
    Question(
        id="07.q4",
        title="Least connections over the healthy backends",
        checker=_LeastConnectionsCheck(),
        explanation="Least connections sends each request to the healthy backend with the "
        "fewest requests in flight, so a backend slowed by long requests gets fewer new ones; "
        "walking the ring from after the previous choice breaks ties in turn, as round robin.",
        hints=("Walk index = (previous + step) % n for step in 1..n; keep the first healthy "
               "index with the smallest active[index] (a strict < keeps the earliest on a tie); "
               "-1 if none is healthy.",),
    ),
    Question(
        id="07.q5",
        title="preload_app and connections opened before fork",
        checker=Choice(
            options={
                "a": "Nothing: each worker process gets a copy of the connection object, which makes it private",
                "b": "Reset the pool in a post_fork hook with engine.dispose(close=False); workers then reconnect",
                "c": "Call engine.dispose() in a post_fork hook, closing the inherited connections in each worker",
                "d": "Turn preload_app off for good: a preloaded app can never hold a database connection",
            },
            correct="b",
            explanations={
                "a": "The worker copies the Python object, not the connection: both processes "
                "then talk over the same socket (or SQLite file handle) and their messages "
                "interleave. The experiment counted every request on a connection the master opened.",
                "c": "Closing in a worker sends the server a goodbye on the socket the master "
                "still uses: on PostgreSQL that ends the master's session. Forget the inherited "
                "connections without closing them.",
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
        title="A post_fork hook for an app with a primary and a replica engine",
        checker=_PostForkCheck(),
        explanation="gunicorn calls post_fork(server, worker) in each new worker. Every pool the "
        "app filled before fork must be reset there, here the primary's and the replica's: "
        "dispose(close=False) drops the copied connections without closing the master's (closing "
        "them from a child would end the master's session on a shared socket).",
        hints=("Import the module that holds the engines (from perfcourse.chapters import "
               "infrastructure_scaling as infra); for each of infra.ENGINE and infra.READ_ENGINE "
               "that is not None, call engine.dispose(close=False).",),
        time_limit=15.0,
    ),
]
