"""Chapter 07, infrastructure scaling: workers and threads, preload and fork, load balancing.

Practical questions are graded by behaviour on inputs the learner has not seen: the sizing rule
on hidden servers (cores, memory) and measured request profiles, the least-connections choice on
hidden sequences of backend health and load (every choice compared, a known mistake named in the
hint), and the post_fork hook in a real 2-worker gunicorn whose preloaded app opened its primary
and its replica engine at boot. The lab's practicals: a gunicorn configuration for hidden
weighted mixes of endpoints (each rule of the sizing it breaks named in the hint), and a balancer
class run in front of three real gunicorn backends, one being deployed and one killed mid-load at a
hidden moment: requests lost, POSTs sent twice, requests sent to a backend a health check found
down, and a backend never brought back up are counted. Never wall time or throughput. Reference
answers are private to this module.
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
from perfcourse.net import free_port

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
    time_limit,
    type_name,
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


# --------------------------------------------------------------------------------------------
# 07.q7 (lab): a gunicorn configuration for a weighted mix of endpoints


def _mix_fraction(endpoints):
    """The share of a request's time spent waiting, over the traffic: each endpoint weighs its
    share of the requests times its time."""
    cpu = sum(e["share"] * e["cpu_ms"] for e in endpoints)
    wait = sum(e["share"] * e["wait_ms"] for e in endpoints)
    return wait / (cpu + wait)


def _config_from(workers, fraction, db_connections):
    threads = _threads_for(fraction)
    threads = max(1, min(threads, db_connections // workers))
    return {"workers": workers, "threads": threads, "worker_class": "gthread" if threads > 1 else "sync"}


def _workers_for(cores, memory_mb, profile):
    return max(1, min(cores, int(memory_mb // profile["worker_mb"]), profile["db_connections"]))


def _size_gunicorn(cores, memory_mb, profile):
    workers = _workers_for(cores, memory_mb, profile)
    return _config_from(workers, _mix_fraction(profile["endpoints"]), profile["db_connections"])


def _unweighted(cores, memory_mb, profile):
    endpoints = [{**e, "share": 1} for e in profile["endpoints"]]
    return _size_gunicorn(cores, memory_mb, {**profile, "endpoints": endpoints})


def _share_weighted_fractions(cores, memory_mb, profile):
    endpoints = [e for e in profile["endpoints"] if e["cpu_ms"] + e["wait_ms"] > 0]
    fraction = (sum(e["share"] * e["wait_ms"] / (e["cpu_ms"] + e["wait_ms"]) for e in endpoints)
                / sum(e["share"] for e in endpoints))
    return _config_from(_workers_for(cores, memory_mb, profile), fraction, profile["db_connections"])


def _mean_of_endpoint_fractions(cores, memory_mb, profile):
    endpoints = [e for e in profile["endpoints"] if e["cpu_ms"] + e["wait_ms"] > 0]
    fraction = sum(e["wait_ms"] / (e["cpu_ms"] + e["wait_ms"]) for e in endpoints) / len(endpoints)
    return _config_from(_workers_for(cores, memory_mb, profile), fraction, profile["db_connections"])


_MIX_MISTAKES = (
    (_unweighted, "Weight each endpoint by its share of the traffic: sum share * cpu_ms and "
     "share * wait_ms over the endpoints (a rare endpoint counts little, however long it waits)."),
    (_share_weighted_fractions, "Weight by time, not by requests alone: the waiting share is "
     "sum(share * wait_ms) / sum(share * (cpu_ms + wait_ms)), not the share-weighted mean of each "
     "endpoint's fraction (a long request keeps a thread busy longer)."),
    (_mean_of_endpoint_fractions, "Weight each endpoint by its share of the traffic and by its "
     "time: sum(share * wait_ms) / sum(share * (cpu_ms + wait_ms)), not the mean of the "
     "endpoints' fractions."),
)


def _candidate_fractions(endpoints):
    """The waiting share, and the ones the known mistakes compute."""
    timed = [e for e in endpoints if e["cpu_ms"] + e["wait_ms"] > 0]
    each = [e["wait_ms"] / (e["cpu_ms"] + e["wait_ms"]) for e in timed]
    shares = sum(e["share"] for e in timed)
    found = [_mix_fraction(endpoints),
             sum(e["wait_ms"] for e in endpoints) / sum(e["cpu_ms"] + e["wait_ms"] for e in endpoints),
             sum(f for f in each) / len(each)]
    if shares:
        found.append(sum(e["share"] * f for e, f in zip(timed, each)) / shares)
    return found


def _endpoint(rng, name):
    kind = rng.choice(["cpu", "io", "io", "mixed"])
    cpu = {"cpu": rng.choice([4, 6, 9, 15, 25]), "io": rng.choice([0.5, 1, 2]),
           "mixed": rng.choice([3, 5, 8])}[kind]
    wait = {"cpu": rng.choice([0, 1, 2]), "io": rng.choice([10, 20, 40, 80, 150, 300]),
            "mixed": rng.choice([5, 8, 12, 20])}[kind]
    return {"endpoint": f"/{name}", "share": 0.0, "cpu_ms": float(cpu), "wait_ms": float(wait)}


def _mix_profiles(rng):
    """(cores, memory_mb, profile): edge cases first, then mixes where weighting matters."""
    def profile(worker_mb, db, endpoints):
        return {"worker_mb": worker_mb, "db_connections": db, "endpoints": endpoints}

    def e(path, share, cpu, wait):
        return {"endpoint": path, "share": share, "cpu_ms": cpu, "wait_ms": wait}

    cases = [
        # a busy CPU endpoint and a rare slow one: weighting by share decides
        (4, 4096, profile(150, 100, [e("/catalog", 0.9, 9.0, 1.0), e("/export", 0.1, 1.0, 400.0)])),
        # only CPU: one thread per worker, the sync worker
        (8, 8192, profile(200, 50, [e("/render", 0.7, 12.0, 0.0), e("/pdf", 0.3, 30.0, 0.0)])),
        # only waiting: 32 threads, unless the database allows fewer
        (2, 2048, profile(300, 200, [e("/proxy", 1.0, 0.0, 50.0)])),
        (2, 2048, profile(300, 20, [e("/proxy", 1.0, 0.0, 50.0)])),
        # memory allows fewer workers than cores; a worker needs whole megabytes
        (16, 1000, profile(180.5, 100, [e("/a", 0.5, 5.0, 15.0), e("/b", 0.5, 2.0, 18.0)])),
        # the database allows fewer connections than cores: workers too are capped
        (8, 16384, profile(250, 4, [e("/a", 0.6, 4.0, 40.0), e("/b", 0.4, 10.0, 10.0)])),
        # an endpoint nobody calls (share 0) changes nothing
        (4, 4096, profile(200, 64, [e("/home", 0.8, 6.0, 6.0), e("/legacy", 0.0, 1.0, 900.0),
                                    e("/search", 0.2, 2.0, 30.0)])),
        # shares as requests per second rather than fractions: only the proportions count
        (6, 3000, profile(400, 60, [e("/a", 30, 8.0, 2.0), e("/b", 90, 1.0, 24.0)])),
    ]
    while len(cases) < 40:
        endpoints = [_endpoint(rng, f"e{k}") for k in range(rng.randint(2, 5))]
        for endpoint in endpoints:
            endpoint["share"] = rng.choice([0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
        if sum(e["share"] * (e["cpu_ms"] + e["wait_ms"]) for e in endpoints) == 0:
            continue
        if any(_near_half(f) for f in _candidate_fractions(endpoints)):
            continue  # a waiting share where round() sits on .5: float noise would decide
        cases.append((rng.choice([1, 2, 4, 8, 16, 32]), rng.randrange(512, 32_768, 64),
                      profile(rng.choice([120, 180.5, 250, 400, 700]), rng.choice([4, 10, 20, 40, 100, 300]),
                              endpoints)))
    return cases


def _as_config(got):
    if not isinstance(got, dict) or set(got) != {"workers", "threads", "worker_class"}:
        return None
    workers, threads, worker_class = got["workers"], got["threads"], got["worker_class"]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (workers, threads)):
        return None
    if not isinstance(worker_class, str):
        return None
    return {"workers": workers, "threads": threads, "worker_class": worker_class.strip().lower()}


class _MixSizingCheck(Checker):
    def grade(self, answer):
        need_function(answer, 'check("07.q7", size_gunicorn)')
        for cores, memory_mb, profile in _mix_profiles(random.Random(7007)):
            shown = f"size_gunicorn({cores}, {memory_mb}, {short_repr(profile, 150)})"
            expected = _size_gunicorn(cores, memory_mb, profile)
            got = call_learner(answer, cores, memory_mb, copy.deepcopy(profile))
            config = _as_config(got)
            if config is None:
                raise Incorrect('Return a dict {"workers": int, "threads": int, "worker_class": str}; '
                                f"{shown} returned {short_repr(got, 80)}.")
            if config == expected:
                continue
            raise Incorrect(f"{shown} returned {short_repr(got, 90)}, expected {expected}."
                            + self._reason(cores, memory_mb, profile, config, expected))

    @staticmethod
    def _reason(cores, memory_mb, profile, config, expected) -> str:
        """The first rule of the sizing the configuration breaks, as a hint."""
        workers, threads, worker_class = config["workers"], config["threads"], config["worker_class"]
        db = profile["db_connections"]
        if worker_class not in ("sync", "gthread"):
            return ' Use the worker class "sync" (one request per process) or "gthread" (threads).'
        if threads > 1 and worker_class != "gthread":
            return (" A sync worker serves one request at a time: threads > 1 need worker_class "
                    '"gthread" (gunicorn would switch silently; say what runs).')
        if threads == 1 and worker_class != "sync":
            return ' With one thread per worker, use the plain "sync" worker.'
        if workers < 1 or threads < 1:
            return " Run at least 1 worker with at least 1 thread."
        if workers * profile["worker_mb"] > memory_mb:
            return (f" {workers} workers of {profile['worker_mb']} MB do not fit in {memory_mb} MB: "
                    "workers <= memory_mb // worker_mb.")
        if workers > cores:
            return (" More worker processes than cores only take turns on the same cores: cover "
                    "the waiting with threads instead (they cost less memory).")
        if workers * threads > db:
            return (f" {workers} workers x {threads} threads may hold {workers * threads} database "
                    f"connections at once, more than the {db} the database gives this app: cap the "
                    "threads at db_connections // workers (and the workers at db_connections).")
        if workers < expected["workers"]:
            return (" A core is left idle: run one worker per core, as many as memory and the "
                    "database allow.")
        if threads > 32:
            return " Cap the threads at 32."
        hint = _first_mistake(config, (cores, memory_mb, profile), _MIX_MISTAKES)
        if hint:
            return hint
        if threads < expected["threads"] and expected["threads"] == db // workers:
            return " The database allows more threads than that: db_connections // workers."
        return (" threads = round(1 / (1 - waiting share)) of the whole traffic, between 1 and 32, "
                "then capped by the database.")

    def model_answer(self):
        return ("def size_gunicorn(cores, memory_mb, profile):\n"
                "    endpoints, db = profile[\"endpoints\"], profile[\"db_connections\"]\n"
                "    workers = max(1, min(cores, int(memory_mb // profile[\"worker_mb\"]), db))\n"
                "    cpu = sum(e[\"share\"] * e[\"cpu_ms\"] for e in endpoints)\n"
                "    wait = sum(e[\"share\"] * e[\"wait_ms\"] for e in endpoints)\n"
                "    waiting = wait / (cpu + wait)\n"
                "    threads = 32 if waiting >= 1 else min(32, max(1, round(1 / (1 - waiting))))\n"
                "    threads = max(1, min(threads, db // workers))\n"
                "    return {\"workers\": workers, \"threads\": threads,\n"
                "            \"worker_class\": \"gthread\" if threads > 1 else \"sync\"}\n")


# --------------------------------------------------------------------------------------------
# 07.q8 (lab): a balancer that survives a backend killed mid-load


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def _reply_status(reply):
    status = getattr(reply, "status", None)
    if status is None and isinstance(reply, tuple) and reply:
        status = reply[0]
    return None if isinstance(status, bool) or not isinstance(status, int) else status


class _FailoverCheck(Checker):
    seed = 7008
    per_call_s = 5.0

    def _guarded(self, fn, *args):
        with time_limit(self.per_call_s):
            return call_learner(fn, *args)

    def grade(self, answer):
        need_function(answer, 'check("07.q8", Balancer)')
        self._dry_run(answer)
        try:
            trial = infra.failover_trial(answer, seed=self.seed, call=self._guarded,
                                         per_call_timeout_s=self.per_call_s)
        except (RuntimeError, TimeoutError) as exc:  # a backend did not start: not the learner's doing
            raise RuntimeError(f"the grader's backends did not start: {shorten(str(exc), 200)}") from None
        self._judge(trial)

    def _dry_run(self, answer):
        """Every backend down (nothing listens on their ports): no server needed to catch a stub,
        a wrong shape, code that raises or loops."""
        dead = {"a": free_port(), "b": free_port()}
        balancer = call_learner(answer, dict(dead), infra.send)
        missing = [m for m in ("check_health", "handle") if not callable(getattr(balancer, m, None))]
        if missing:
            raise Incorrect("check(\"07.q8\", Balancer) takes your class: Balancer(backends, send) must "
                            f"build an object with check_health() and handle(method, path); it built a "
                            f"{type_name(balancer)} without {' and '.join(missing)}.")
        call_learner(balancer.check_health)
        reply = call_learner(balancer.handle, "GET", "/io?ms=1")
        status = _reply_status(reply)
        if status is None:
            raise Incorrect("handle() must return the response for the client: what send() returned, "
                            f"or an HttpResponse(503, {{}}, b'...') (got {short_repr(reply, 60)}).")
        if status < 500:
            raise Incorrect(f"With every backend down (connections refused), handle() answered {status}: "
                            "answer 503 when no backend can take the request.")

    def _judge(self, trial):
        requests, roles = trial.requests, trial.roles
        errors = requests[requests.error.notna()]
        if len(errors):
            row = errors.iloc[0]
            exc = row.error
            what = str(exc) if isinstance(exc, Incorrect) else f"your code raised {type(exc).__name__}: {exc}"
            raise Incorrect(f"Request {row.request} ({row.method}) during the trial: {shorten(what, 220)}")
        attempts = trial.attempts
        load = attempts[attempts.request.notna()]
        strays = attempts[attempts.request.isna() & ~attempts.path.str.startswith("/health")]
        if len(strays) and not len(load):
            raise Incorrect("Forward the request's path unchanged to the backend (the grader follows "
                            "each request by its path).")
        unsafe = requests[requests.verdict == "unsafe retry"]
        if len(unsafe):
            raise Incorrect(
                f"{len(unsafe)} POST request(s) were sent again after the backend that received them died "
                "without answering (BackendNoResponse): the payment may already have gone through, so a "
                "retry can charge twice. After the request was sent, retry only idempotent methods (GET, "
                "HEAD, PUT, DELETE); answer 502 for the others.")
        lost = requests[requests.verdict == "lost"]
        if len(lost):
            raise Incorrect(f"{len(lost)} of {len(requests)} requests were lost. " + self._why_lost(lost, load))
        deployed, killed = roles["deployed"], roles["killed"]
        if trial.to_down[deployed]:
            raise Incorrect(
                f"{trial.to_down[deployed]} requests went to backend {deployed!r} after the start-up health "
                f"check, although its /health answered 503 (it was being deployed): a backend is up only when "
                "/health answers 200; send requests to those only.")
        if trial.to_down[killed]:
            raise Incorrect(
                f"{trial.to_down[killed]} requests went to backend {killed!r} after a health check found it "
                "dead (connection refused): check_health() must mark it down, and handle() must skip it.")
        idle = [name for name, served in trial.served_before_kill.items()
                if name not in (deployed,) and not served]
        if idle:
            raise Incorrect(f"Backend {idle[0]!r} was up but got none of the requests before the kill: "
                            "take the healthy backends in turn (round robin).")
        if not trial.revived:
            raise Incorrect(
                f"Backend {deployed!r} answered its health check with 200 again (its deploy ended) before "
                f"the last {int((requests.phase == 2).sum())} requests, but got none of them: check_health() "
                "must also mark a backend up again.")

    @staticmethod
    def _why_lost(lost, load) -> str:
        row = lost.iloc[0]
        mine = load[load.request == row.request]
        outcomes = list(mine.outcome)
        status = "no status" if row.status is None or row.status != row.status else int(row.status)
        if not outcomes:
            return (f"Request {row.request} ({row.method}) was answered {status} without being sent to any "
                    "backend, while one was up.")
        if outcomes[-1] == "refused":
            return (f"Request {row.request} ({row.method}) was answered {status} after a connection refused: "
                    "the request never reached that backend, so send it to another healthy one, whatever "
                    "its method.")
        if outcomes[-1] == "no response" and row.method in _IDEMPOTENT:
            return (f"Request {row.request} (GET) reached a backend that died without answering, and was "
                    f"answered {status}: a GET is idempotent (running it twice does no harm), so retry it "
                    "on another backend.")
        if outcomes[-1] == "no response":
            return (f"Request {row.request} (POST) reached a backend that died: answer it with a 5xx "
                    f"(502), not {status}.")
        return (f"Request {row.request} ({row.method}) got {outcomes[-1]} from a backend but the client got "
                f"{status}: return the backend's response.")

    def model_answer(self):
        return (
            "IDEMPOTENT = {\"GET\", \"HEAD\", \"PUT\", \"DELETE\", \"OPTIONS\"}\n\n"
            "class Balancer(RoundRobinBalancer):\n"
            "    def check_health(self):\n"
            "        for name, port in self.backends.items():\n"
            "            try:\n"
            "                up = self.send(port, \"GET\", \"/health\", 1.0).status == 200\n"
            "            except infra.BackendError:\n"
            "                up = False\n"
            "            self.up[name] = up\n\n"
            "    def handle(self, method, path):\n"
            "        tried = set()\n"
            "        while (name := self.pick(exclude=tried)) is not None:\n"
            "            tried.add(name)\n"
            "            try:\n"
            "                return self.send(self.backends[name], method, path)\n"
            "            except infra.BackendRefused:       # never sent: safe to send elsewhere\n"
            "                self.up[name] = False\n"
            "            except infra.BackendNoResponse:    # sent, no answer: retry only if idempotent\n"
            "                self.up[name] = False\n"
            "                if method not in IDEMPOTENT:\n"
            "                    return HttpResponse(502, {}, b\"no answer from the backend\")\n"
            "        return HttpResponse(503, {}, b\"no backend available\")\n")


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
    Question(
        id="07.q7",
        title="A gunicorn configuration for a weighted mix of endpoints (lab)",
        checker=_MixSizingCheck(),
        explanation="Processes give CPU parallelism, so one worker per core, as many as memory and "
        "the database allow. Threads cover the waiting of the whole traffic: each endpoint weighs "
        "its share of the requests times its time, so a rare slow endpoint moves the answer little. "
        "Every thread may hold a database connection, so workers x threads stays within what the "
        "database gives the app; and threads need the gthread worker.",
        hints=("workers = max(1, min(cores, memory_mb // worker_mb, db_connections)); waiting = "
               "sum(share * wait_ms) / sum(share * (cpu_ms + wait_ms)); threads = round(1 / (1 - "
               "waiting)) between 1 and 32 (32 if waiting is 1), then at most db_connections // "
               "workers; worker_class \"gthread\" if threads > 1 else \"sync\".",),
    ),
    Question(
        id="07.q8",
        title="A balancer that survives a backend killed mid-load (lab)",
        checker=_FailoverCheck(),
        explanation="A request refused at connect never reached the backend: any method can go to "
        "the next one. A request sent to a backend that then died may have been acted on: retry it "
        "only if running it twice is harmless (GET, HEAD, PUT, DELETE), otherwise answer 502 (an "
        "idempotency key would make the payment safe to retry). Active health checks take a backend "
        "out when /health fails, even while it still answers other requests, and put it back when "
        "it passes again.",
        hints=("check_health: up = send(port, 'GET', '/health').status == 200, False on "
               "infra.BackendError. handle: try the backends in turn, skipping those tried; on "
               "BackendRefused go on; on BackendNoResponse go on only for idempotent methods, else "
               "return a 502; return 503 when none is left.",),
        time_limit=15.0,
    ),
]
