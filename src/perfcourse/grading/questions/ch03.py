"""Chapter 03, database scaling: replicas and read-your-writes, sharding, connection pools.

Practical questions are graded by behaviour the learner cannot hard-code: which engine each
statement went to (``count_queries`` on each of two private in-memory databases) for a hidden
sequence of reads and writes, and how many hidden keys move when a shard is added or removed.

The lab's questions (03.q8-03.q10): stale reads and the replica's share of reads for a hidden
browsing and editing sequence on the real primary/replica pair (in a schema of the grader's);
a cross-shard average on hidden shard contents, with the statements and rows each shard sent;
pool settings for hidden request profiles, run against the course's PostgreSQL with counted
connects, closes and timeouts.
"""

from __future__ import annotations

import math
import random
import sqlite3
from datetime import datetime
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from perfcourse import replicas
from perfcourse.chapters import database_scaling as scaling
from perfcourse.models import ORDER_STATUSES, Base, Order, User
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import Checker, Choice, Incorrect, Number, call_learner, short_repr, type_name

__all__ = [
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# 03.q2: a Session that routes writes to the primary and reads to the replica


def _memory_users(rows: list[dict]):


    engine = sa.create_engine("sqlite://", poolclass=StaticPool,
                              connect_args={"check_same_thread": False})
    User.__table__.create(engine)
    with engine.begin() as conn:
        conn.execute(User.__table__.insert(), rows)
    return engine


def _users(rng: random.Random, n: int) -> list[dict]:
    return [{"id": i, "email": f"u{i}@example.com", "first_name": f"F{i}", "last_name": f"L{i}",
             "active": True, "premium": rng.random() < 0.2, "created_at": datetime(2025, 1, 1)}
            for i in range(1, n + 1)]


def _routing_scenario(session_class, primary, replica, rng: random.Random) -> list[str]:
    """Run a hidden mix of reads and writes; return what each step expects ('p' or 'r')."""


    expected = []
    with session_class(primary, replica) as session:
        for _ in range(rng.randint(2, 4)):
            step = rng.choice(["get", "select", "count"])
            if step == "get":
                session.get(User, rng.randint(1, 30))
            elif step == "select":
                session.scalars(select(User).where(User.premium.is_(True))
                                .limit(rng.randint(1, 5))).all()
            else:
                session.execute(select(sa.func.count()).select_from(User)).scalar()
            expected.append("r")
        user = session.get(User, rng.randint(31, 40))
        expected.append("r")
        user.first_name = f"Changed{rng.randint(1, 99)}"
        session.commit()  # the flush sends one UPDATE
        expected.append("p")
        session.add(User(id=1000 + rng.randint(1, 99), email="new@example.com",
                         first_name="N", last_name="U", created_at=datetime(2025, 2, 1)))
        session.flush()
        expected.append("p")
        session.execute(sa.update(User).where(User.id == rng.randint(1, 10))
                        .values(active=False))
        expected.append("p")
        session.execute(sa.delete(User).where(User.id == rng.randint(41, 50)))
        expected.append("p")
        session.commit()
        session.scalars(select(User.email).where(User.id == rng.randint(1, 20))).all()
        expected.append("r")
    return expected


class _RoutingCheck(Checker):
    def grade(self, answer):


        if not (isinstance(answer, type) and issubclass(answer, Session)):
            raise Incorrect("Pass your Session subclass itself: check(\"03.q2\", "
                            f"MyRoutingSession) (got a {type_name(answer)}).")
        for seed in (301, 302, 303):
            rng = random.Random(seed)
            rows = _users(rng, 60)
            primary, replica = _memory_users(rows), _memory_users(rows)
            try:
                with count_queries(primary) as on_primary, count_queries(replica) as on_replica:
                    expected = call_learner(_routing_scenario, answer, primary, replica, rng)
                reads, writes = expected.count("r"), expected.count("p")
                wrong_reads = on_primary.select_count
                wrong_writes = on_replica.count - on_replica.select_count
                if wrong_writes:
                    kinds = sorted({s.kind for s in on_replica.statements if s.kind != "SELECT"})
                    raise Incorrect(
                        f"{wrong_writes} write statement(s) ({', '.join(kinds)}) went to the "
                        "replica: a replica is read-only. During a flush `self._flushing` is "
                        "true; Core writes arrive as `clause` (sa.Insert, sa.Update, sa.Delete).")
                if on_primary.count - wrong_reads != writes:
                    raise Incorrect(
                        f"The primary received {on_primary.count - wrong_reads} writes, "
                        f"{writes} were sent: route every write to self.primary.")
                if wrong_reads:
                    raise Incorrect(
                        f"{wrong_reads} of the {reads} reads went to the primary: send every "
                        "statement that is not a write to self.replica.")
                if on_replica.select_count != reads:
                    raise Incorrect(
                        f"The replica received {on_replica.select_count} reads, {reads} were "
                        "sent: return self.replica for reads.")
            finally:
                primary.dispose()
                replica.dispose()

    def model_answer(self):
        return ("def get_bind(self, mapper=None, clause=None, **kwargs):\n"
                "    if self._flushing or isinstance(clause, (sa.Insert, sa.Update, sa.Delete)):\n"
                "        return self.primary\n"
                "    return self.replica")


# --------------------------------------------------------------------------------------------
# 03.q3: a shard function that moves few keys when the shard list changes


def _hidden_shards(rng: random.Random, n: int) -> list[str]:
    return [f"db-{rng.randrange(16**4):04x}-{i}" for i in range(n)]


def _hidden_keys(rng: random.Random, n: int) -> list:
    keys = []
    for _ in range(n):
        keys.append(rng.randrange(1, 10**7) if rng.random() < 0.5
                    else f"user:{rng.randrange(10**6)}")
    return keys


class _ShardFunctionCheck(Checker):
    keys = 6000

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"03.q3\", choose_shard) "
                            f"(got a {type_name(answer)}).")
        rng = random.Random(303)
        four = _hidden_shards(rng, 4)
        five = [*four, _hidden_shards(rng, 5)[-1] + "-new"]
        keys = _hidden_keys(rng, self.keys)

        def route_all(shards):
            return call_learner(lambda: [answer(k, list(shards)) for k in keys])

        on_four = route_all(four)
        for key, shard in zip(keys, on_four):
            if shard not in four:
                raise Incorrect(f"For the key {key!r} and shards {four} your function returned "
                                f"{short_repr(shard, 40)}: return one of the shard names.")
        if call_learner(lambda: [answer(k, list(four)) for k in keys[:200]]) != on_four[:200]:
            raise Incorrect("Your function gave two answers for the same key: a router must be "
                            "deterministic (no random choice).")
        share = {s: on_four.count(s) / len(keys) for s in four}
        if min(share.values()) < 0.12:
            raise Incorrect(f"The keys are not spread: the emptiest of 4 shards got "
                            f"{min(share.values()):.0%} of them (aim for about 25%). "
                            "Hash the key together with each shard name.")
        on_five = route_all(five)
        moved = [(a, b) for a, b in zip(on_four, on_five) if a != b]
        if any(b != five[-1] for _, b in moved):
            raise Incorrect("Adding a shard moved keys between old shards: only keys taken over "
                            "by the new shard should move.")
        if len(moved) > 0.35 * len(keys):
            raise Incorrect(f"Adding a fifth shard moved {len(moved)} of {len(keys)} keys "
                            f"({len(moved) / len(keys):.0%}); about 20% should move.")
        if not moved:
            raise Incorrect("Adding a shard moved no key at all: the new shard gets nothing.")
        removed = five[2]
        four_again = [s for s in five if s != removed]
        on_removed = route_all(four_again)
        for key, before, after in zip(keys, on_five, on_removed):
            if before != removed and before != after:
                raise Incorrect(f"Removing the shard {removed!r} moved the key {key!r} from "
                                f"{before!r} to {after!r}: only the removed shard's keys "
                                "should move.")

    def model_answer(self):
        return ("def choose_shard(key, shards):\n"
                "    def score(shard):  # rendezvous (highest random weight) hashing\n"
                "        return hashlib.md5(f\"{shard}:{key}\".encode()).digest()\n"
                "    return max(shards, key=score)")


# --------------------------------------------------------------------------------------------
# 03.q8 (lab): read-your-writes on the real replica pair


class _ReadYourWritesCheck(Checker):
    schema = "ch03_grader"
    apply_delay_ms = 1000  # a read right after a commit is stale on any machine
    min_replica_share = 0.5
    seed, rounds = 308, 2

    def grade(self, answer):


        if not callable(answer):
            raise Incorrect("Pass your session class itself: check(\"03.q8\", "
                            f"ReadYourWritesSession) (got a {type_name(answer)}).")
        before = replicas.running_replica_pair()
        pair = replicas.start_replica_pair(self.apply_delay_ms)
        primary, replica = scaling.profile_engines(pair, self.schema)
        try:
            scaling.prepare_profiles(primary, replica, users=30)
            trial = call_learner(scaling.read_your_writes_trial, answer, primary, replica,
                                 self.seed, self.rounds)
        finally:
            try:
                scaling.drop_profiles(primary)
            except sa.exc.DBAPIError:
                pass  # a transaction the learner's session leaked holds the table: leave it
            finally:
                primary.dispose()
                replica.dispose()
                if before is None:
                    replicas.stop_replica_pair()
                else:
                    replicas.set_apply_delay(pair, before.apply_delay_ms)
        if trial["stale"]:
            raise Incorrect(
                f"{trial['stale']} of the {trial['checked']} reads of a user's own profile after "
                "their edit showed the old email: the replica had not replayed the edit yet. "
                "After a commit, keep the primary's LSN in the cookie; read from the primary "
                "until scaling.replica_has_replayed(self.replica, lsn) is true.")
        if trial["replica_share"] < self.min_replica_share:
            raise Incorrect(
                f"No stale read, but only {trial['replica_reads']} of the {trial['reads']} reads "
                f"went to the replica ({trial['replica_share']:.0%}; at least "
                f"{self.min_replica_share:.0%} should): send a read to the primary only while "
                "this user's last write has not reached the replica.")

    def model_answer(self):
        return (
            "class ReadYourWritesSession(scaling.RoutingSession):\n"
            "    def __init__(self, primary, replica, cookie, **kwargs):\n"
            "        super().__init__(primary, replica, **kwargs)\n"
            "        self.cookie = cookie\n"
            "        self.wrote = False\n\n"
            "    def get_bind(self, mapper=None, clause=None, **kwargs):\n"
            "        if kwargs.get(\"bind\") is not None:\n"
            "            return kwargs[\"bind\"]\n"
            "        if self.is_write(clause):\n"
            "            self.wrote = True\n"
            "            return self.primary\n"
            "        lsn = self.cookie.get(\"lsn\")\n"
            "        if self.wrote or (lsn and not scaling.replica_has_replayed(self.replica, lsn)):\n"
            "            return self.primary\n"
            "        return self.replica\n\n"
            "    def commit(self):\n"
            "        super().commit()\n"
            "        if self.wrote:\n"
            "            self.cookie[\"lsn\"] = scaling.current_lsn(self.primary)\n"
            "            self.wrote = False")


# --------------------------------------------------------------------------------------------
# 03.q9 (lab): an average across shards


class _CountingCursor(sqlite3.Cursor):
    """A cursor that adds every row it hands out to its connection's ``rows_fetched``."""

    def _count(self, rows: int) -> None:
        self.connection.rows_fetched += rows

    def fetchone(self):
        row = super().fetchone()
        if row is not None:
            self._count(1)
        return row

    def fetchmany(self, *args, **kwargs):
        rows = super().fetchmany(*args, **kwargs)
        self._count(len(rows))
        return rows

    def fetchall(self):
        rows = super().fetchall()
        self._count(len(rows))
        return rows

    def __next__(self):
        row = super().__next__()
        self._count(1)
        return row


class _CountingConnection(sqlite3.Connection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_fetched = 0

    def cursor(self, factory=_CountingCursor):
        return super().cursor(factory)


def _order_shards(rng: random.Random):
    """3-5 in-memory SQLite shards of very unequal size and spending; one empty, statuses missing.

    Returns ``(engines, connections, orders)``: ``orders`` is every ``(shard, status, total)``.
    """


    n = rng.randint(3, 5)
    sizes = [0, rng.randint(5, 15), rng.randint(60, 120), rng.randint(400, 700),
             rng.randint(150, 300)][:n]
    rng.shuffle(sizes)
    engines, connections, orders = {}, [], []
    next_id = 1
    for i, size in enumerate(sizes):
        connection = sqlite3.connect(":memory:", factory=_CountingConnection,
                                     check_same_thread=False)
        engine = sa.create_engine("sqlite://", creator=lambda c=connection: c,
                                  poolclass=StaticPool)
        Base.metadata.create_all(engine, tables=[User.__table__, Order.__table__])
        statuses = rng.sample(ORDER_STATUSES, rng.randint(2, len(ORDER_STATUSES)))
        spend = rng.choice([0.4, 1.0, 3.0, 8.0])  # shards of big and small accounts
        rows = []
        for _ in range(size):
            status = rng.choice(statuses)
            total = (Decimal(rng.randint(500, 20000)) * Decimal(str(spend)) / 100
                     ).quantize(Decimal("0.01"))
            rows.append({"id": next_id, "user_id": rng.randint(1, 999), "status": status,
                         "total": total, "created_at": datetime(2025, 3, 1)})
            orders.append((f"shard_{i}", status, total))
            next_id += 1
        if rows:
            with engine.begin() as conn:
                conn.execute(Order.__table__.insert(), rows)
        connection.rows_fetched = 0
        engines[f"shard_{i}"] = engine
        connections.append(connection)
    return engines, connections, orders


def _exact_averages(orders) -> dict[str, float]:
    sums, counts = {}, {}
    for _, status, total in orders:
        sums[status] = sums.get(status, Decimal(0)) + total
        counts[status] = counts.get(status, 0) + 1
    return {status: float(sums[status] / counts[status]) for status in sorted(sums)}


def _as_float(value):
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _ShardedAverageCheck(Checker):
    def grade(self, answer):


        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"03.q9\", "
                            f"average_total_by_status) (got a {type_name(answer)}).")
        for seed in (309, 310, 311):
            engines, connections, orders = _order_shards(random.Random(seed))
            try:
                expected = _exact_averages(orders)
                naive = scaling.average_total_by_status_naive(engines)
                for connection in connections:
                    connection.rows_fetched = 0  # count only the learner's rows
                counters = {name: count_queries(e).start() for name, e in engines.items()}
                try:
                    got = call_learner(answer, dict(engines))
                finally:
                    for counter in counters.values():
                        counter.stop()
                if not isinstance(got, dict):
                    raise Incorrect("Return a dict {status: average order total} "
                                    f"(got a {type_name(got)}).")
                if set(got) != set(expected):
                    raise Incorrect(
                        f"Your dict has the statuses {sorted(map(str, got))}, the shards' "
                        f"orders have {sorted(expected)}: one key per status that has orders.")
                for status, value in expected.items():
                    number = _as_float(got[status])
                    if number is None:
                        raise Incorrect(f"The average for {status!r} is a "
                                        f"{type_name(got[status])}: return numbers.")
                    if not math.isclose(number, value, rel_tol=1e-9, abs_tol=0.006):
                        if math.isclose(number, naive.get(status, math.nan), rel_tol=1e-6):
                            raise Incorrect(
                                f"For {status!r} you return {number:.2f}, the average of the "
                                f"shards' averages; the average of all its orders is {value:.2f}. "
                                "A shard with 10 orders must not weigh as much as one with "
                                "500: gather each shard's SUM and COUNT, then divide the totals.")
                        raise Incorrect(f"For {status!r} you return {number:.2f}, the average "
                                        f"of all its orders is {value:.2f}.")
                for (name, counter), connection in zip(counters.items(), connections):
                    if counter.count > 1:
                        raise Incorrect(
                            f"Right averages, but {name} received {counter.count} queries: one "
                            "query per shard (GROUP BY status) is enough.")
                    with_orders = len({s for shard, s, _ in orders if shard == name})
                    if connection.rows_fetched > with_orders:
                        raise Incorrect(
                            f"Right averages, but {name} sent {connection.rows_fetched} rows "
                            f"for its {with_orders} statuses: aggregate on the shard (SUM, "
                            "COUNT, GROUP BY) and send one row per status, not the orders.")
            finally:
                for engine in engines.values():
                    engine.dispose()
                for connection in connections:
                    connection.close()

    def model_answer(self):
        return (
            "def average_total_by_status(shards):\n"
            "    sums, counts = {}, {}\n"
            "    query = (select(Order.status, func.sum(Order.total), func.count())\n"
            "             .group_by(Order.status))\n"
            "    for engine in shards.values():            # scatter: one query per shard\n"
            "        with engine.connect() as conn:\n"
            "            for status, total, n in conn.execute(query):\n"
            "                sums[status] = sums.get(status, 0) + Decimal(str(total))\n"
            "                counts[status] = counts.get(status, 0) + n\n"
            "    return {s: sums[s] / counts[s] for s in sorted(sums)}   # gather: divide totals")


# --------------------------------------------------------------------------------------------
# 03.q10 (lab): pool settings from a request profile

#: Hidden request profiles: threads of one process, steady requests/s, seconds on a connection.
_POOL_PROFILES = (
    {"threads": 6, "requests_per_s": 130, "db_time_s": 0.018},
    {"threads": 9, "requests_per_s": 350, "db_time_s": 0.013},
    {"threads": 5, "requests_per_s": 90, "db_time_s": 0.016},
)


def _settings(value) -> tuple[int, int]:
    if isinstance(value, dict):
        if set(value) != {"pool_size", "max_overflow"}:
            raise Incorrect("Return a dict with exactly the keys 'pool_size' and 'max_overflow' "
                            f"(got the keys {sorted(map(str, value))}).")
        value = (value["pool_size"], value["max_overflow"])
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise Incorrect("Return {'pool_size': ..., 'max_overflow': ...} "
                        f"(got {short_repr(value, 60)}).")
    size, overflow = value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, overflow)):
        raise Incorrect("pool_size and max_overflow are whole numbers (use math.ceil, int): "
                        f"got {short_repr(size, 20)} and {short_repr(overflow, 20)}.")
    if not (1 <= size <= 50 and 0 <= overflow <= 50):
        raise Incorrect(f"pool_size={size}, max_overflow={overflow}: keep 1 <= pool_size <= 50 "
                        "and 0 <= max_overflow <= 50 (the server has max_connections to share).")
    return size, overflow


class _PoolSettingsCheck(Checker):
    def grade(self, answer):


        if not callable(answer):
            raise Incorrect("Pass your function itself: check(\"03.q10\", pool_settings) "
                            f"(got a {type_name(answer)}).")
        for profile in _POOL_PROFILES:
            size, overflow = _settings(call_learner(answer, dict(profile)))
            threads = profile["threads"]
            steady = math.ceil(profile["requests_per_s"] * profile["db_time_s"])
            shown = (f"For {threads} threads, {profile['requests_per_s']} requests/s and "
                     f"{profile['db_time_s'] * 1000:g} ms on a connection, pool_size={size}, "
                     f"max_overflow={overflow}: ")
            run = scaling.pool_trial(scaling.postgres_engine, threads, steady, size, overflow)
            timeouts = run["steady_timeouts"] + run["burst_timeouts"]
            if timeouts:
                raise Incorrect(
                    shown + f"{timeouts} checkouts timed out when all {threads} threads needed "
                    "a connection at once. pool_size + max_overflow must cover every thread.")
            if run["churn"]:
                raise Incorrect(
                    shown + f"the steady load made the pool open and close {run['churn']} "
                    "overflow connections. pool_size must hold the connections busy at once in "
                    "steady state: Little's law, requests/s × time on a connection, rounded up.")
            if run["most_open"] > threads:
                raise Incorrect(
                    shown + f"no timeouts, but the pool may open {run['most_open']} connections "
                    f"and only {threads} threads can use one: the rest count against the "
                    "server's max_connections for nothing.")
            if run["kept_open"] > steady:
                raise Incorrect(
                    shown + f"the pool keeps {run['kept_open']} idle connections open after a "
                    f"burst; the steady load keeps {steady} busy. Put the rest in max_overflow.")

    def model_answer(self):
        return ("def pool_settings(profile):\n"
                "    steady = math.ceil(profile[\"requests_per_s\"] * profile[\"db_time_s\"])\n"
                "    return {\"pool_size\": steady,\n"
                "            \"max_overflow\": profile[\"threads\"] - steady}")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="03.q1",
        title="Read-your-writes with a lagging replica",
        checker=Choice(
            options={
                "a": "Add a second replica so reads spread over two servers",
                "b": "For a short while after a user writes, serve that user's reads from the "
                "primary (or wait until a replica has replayed the write's LSN)",
                "c": "Raise the engine's pool_size",
                "d": "Retry the read on the same replica until the value changes",
            },
            correct="b",
            explanations={
                "a": "A second replica lags just as much: the stale read comes from replication "
                "lag, not from load.",
                "c": "More connections do not make a replica replay faster.",
                "d": "Polling may work after the lag but cannot tell 'not replayed yet' from "
                "'nothing changed'; wait for the LSN instead, or read the primary.",
            },
        ),
        explanation="Replication is asynchronous: a replica shows a commit only after it has "
        "replayed it (in the lesson, a second later). Read-your-writes needs the writer's reads to go where "
        "the write is: the primary for a while (sticky, Rails' DatabaseSelector with its 2 s "
        "delay), or a replica once pg_last_wal_replay_lsn() has passed the write's "
        "pg_current_wal_insert_lsn().",
    ),
    Question(
        id="03.q2",
        title="A read/write routing Session",
        checker=_RoutingCheck(),
        explanation="Session.get_bind is asked for an engine for every statement. Flushes "
        "(self._flushing) and Core INSERT/UPDATE/DELETE are writes: the primary. Everything "
        "else, including session.get and lazy loads, is a read: the replica.",
        hints=("`self._flushing` is true while the ORM flushes pending changes; Core writes come "
               "as `clause`, an instance of sa.Insert, sa.Update or sa.Delete.",),
        time_limit=20.0,
    ),
    Question(
        id="03.q3",
        title="A shard function that moves few keys",
        checker=_ShardFunctionCheck(),
        explanation="With `hash(key) % n` almost every key changes shard when n changes (80% "
        "from 4 to 5). Rendezvous hashing scores every (key, shard) pair and picks the best "
        "shard: adding a shard moves only the keys it now wins (about 1/n), removing one moves "
        "only its own keys. A consistent-hash ring (HashRing) has the same property. Use a "
        "stable hash (md5, sha1): Python's hash() of a str changes between processes.",
        hints=("Give every shard a score for this key, e.g. md5(f'{shard}:{key}'), and return "
               "the shard with the highest score.",),
        time_limit=30.0,
    ),
    Question(
        id="03.q4",
        title="Size a pool with Little's law",
        checker=Number(value=6, abs_tol=0.05, unit="connections"),
        answer="6 connections",
        explanation="Little's law: L = X × R = 240 requests/s × 0.025 s = 6 connections busy on "
        "average across the service. Split over 4 processes that is 1.5 each: a pool_size of 2 "
        "per process (8 in all) plus some max_overflow for bursts, far below max_connections.",
        hints=("L = X × R, with X in requests per second and R in seconds.",),
    ),
    Question(
        id="03.q5",
        title="Dead pooled connections",
        checker=Choice(
            options={
                "a": "pool_size=20",
                "b": "pool_pre_ping=True",
                "c": "poolclass=NullPool",
                "d": "pool_timeout=60",
            },
            correct="b",
            explanations={
                "a": "More connections means more dead ones after the failover, not fewer.",
                "c": "NullPool would avoid it by opening a connection per checkout: it pays a "
                "connect on every request to fix a rare event.",
                "d": "pool_timeout is how long a checkout waits for a free connection; the "
                "dead connection is handed out at once.",
            },
        ),
        explanation="pool_pre_ping runs a cheap ping at checkout; a dead connection is replaced "
        "before the request uses it (measured: 0 failed requests instead of 1). pool_recycle "
        "helps when something closes idle connections after a known time.",
    ),
    Question(
        id="03.q6",
        title="Scaling the database (interview question 4)",
        checker=Choice(
            options={
                "a": "Add read replicas and route reads to them",
                "b": "Shard every table by user id across four servers",
                "c": "Raise max_connections and every pool_size",
                "d": "Switch every engine to NullPool",
            },
            correct="a",
            explanations={
                "b": "Sharding splits the data and the writes; it costs cross-shard queries and "
                "rebalancing. It is the step for data or write volume one server cannot hold, "
                "not for a read-heavy load.",
                "c": "More connections add contention on a saturated CPU; they do not add "
                "capacity.",
                "d": "NullPool opens a connection per checkout: more work for the database.",
            },
        ),
        explanation="The first database step of scaling an application: when reads dominate, "
        "replicas add read capacity without touching the data model (mind read-your-writes). "
        "Sharding comes when writes or data size outgrow one primary; pooling keeps the "
        "connection count sane at every step.",
    ),
    Question(
        id="03.q7",
        title="A query across shards",
        checker=Choice(
            options={
                "a": "One query on the shard of the first user",
                "b": "One query on every shard, then merge the partial results in the "
                "application (scatter-gather)",
                "c": "It cannot be answered once the data is sharded",
                "d": "One query on the shard with the most orders",
            },
            correct="b",
            explanations={
                "a": "That shard holds only its own users' orders.",
                "c": "It can: every shard answers for its users, the application combines them.",
                "d": "The other shards' orders would be missing.",
            },
        ),
        explanation="A query that does not name the shard key must visit every shard: N "
        "queries, and the slowest shard sets the latency. Each shard computes its part (SUM per "
        "day); the application adds the parts. Choose the shard key so the frequent queries "
        "name it.",
    ),
    Question(
        id="03.q8",
        title="Lab: read-your-writes on a real replica",
        checker=_ReadYourWritesCheck(),
        explanation="A commit reaches a replica only when the replica replays it. Remember where "
        "the user's last write ended (pg_current_wal_insert_lsn() after the commit) in something that "
        "outlives the request, like the session cookie; on each read, ask the replica whether "
        "pg_last_wal_replay_lsn() has passed it. Until it has, that user's reads go to the "
        "primary; then they return to the replica. No stale read, and every other user's reads "
        "stay on the replica. A time window (Rails' DatabaseSelector, 2 s) is simpler but only "
        "works while the lag stays below the window.",
        hints=("Override commit(): call super().commit(), then, if this session wrote, store "
               "scaling.current_lsn(self.primary) in self.cookie.",
               "In get_bind, a read goes to the primary while the session has written or while "
               "the cookie's LSN is not replayed: scaling.replica_has_replayed(self.replica, lsn)."),
        time_limit=60.0,
    ),
    Question(
        id="03.q9",
        title="Lab: an average across shards",
        checker=_ShardedAverageCheck(),
        explanation="An average is not decomposable, a sum and a count are: each shard returns "
        "SUM(total) and COUNT(*) per status (one small query, one row per status), and the "
        "application adds the sums and the counts before dividing. Averaging the shards' "
        "averages weighs a shard of 10 orders like one of 10,000. The same goes for ratios and "
        "percentiles: gather what can be added (or a histogram), never the finished figure.",
        hints=("Per shard: select(Order.status, func.sum(Order.total), func.count())"
               ".group_by(Order.status). Add up sums and counts per status over the shards, "
               "then divide.",),
        time_limit=30.0,
    ),
    Question(
        id="03.q10",
        title="Lab: size a pool from a request profile",
        checker=_PoolSettingsCheck(),
        explanation="Little's law gives the connections busy at once in steady state: requests/s "
        "× seconds on a connection, rounded up. That is pool_size: the connections worth keeping "
        "open (a smaller pool opens and closes overflow connections all the time). A burst can "
        "have every thread of the process holding a connection: pool_size + max_overflow = "
        "threads, so no checkout waits past pool_timeout, and not more, since every promised "
        "connection counts against the server's max_connections across all processes.",
        hints=("Little's law: connections busy at once = requests/s × seconds on a connection; "
               "round up (math.ceil). Whatever the burst needs beyond that is max_overflow.",),
        time_limit=10.0,
    ),
]
