"""Chapter 03, database scaling: replicas and read-your-writes, sharding, connection pools.

Practical questions are graded by behaviour the learner cannot hard-code: which engine each
statement went to (``count_queries`` on each of two private in-memory databases) for a hidden
sequence of reads and writes, and how many hidden keys move when a shard is added or removed.
"""

from __future__ import annotations

import random
from datetime import datetime

from ..bank import Question
from ..checkers import Checker, Choice, Incorrect, Number, call_learner, short_repr, type_name

# --------------------------------------------------------------------------------------------
# 03.q2: a Session that routes writes to the primary and reads to the replica


def _memory_users(rows: list[dict]):
    import sqlalchemy as sa
    from sqlalchemy.pool import StaticPool

    from perfcourse.models import User

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
    import sqlalchemy as sa
    from sqlalchemy import select

    from perfcourse.models import User

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
        from sqlalchemy.orm import Session

        from perfcourse.measure import count_queries

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
        "replayed it (here 300 ms later). Read-your-writes needs the writer's reads to go where "
        "the write is: the primary for a while (sticky, Rails' DatabaseSelector with its 2 s "
        "delay), or a replica once pg_last_wal_replay_lsn() has passed the write's "
        "pg_current_wal_lsn().",
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
]
