"""Chapter 03, database scaling: replicas and read-your-writes, sharding, connection pools.

Practical questions are graded by behaviour the learner cannot hard-code:

* 03.q2: which engine each statement of a hidden sequence (reads, ORM and Core writes, locking
  reads, commits, rollbacks) went to, compared step by step with a private reference run on
  twin in-memory databases;
* 03.q3: how many hidden keys move when a shard is added or removed, and whether the function
  answers the same in "another process" (``hash()`` of a str salted differently);
* 03.q8 (lab): stale reads and needless primary reads, request by request, on the real
  primary/replica pair, with the replica's lag changed between phases (a time window fails);
* 03.q9 (lab): a cross-shard average on hidden shard contents, with the statements and rows
  each shard sent;
* 03.q10 (lab): pool settings for hidden request profiles (one whose Little's-law product is a
  float just above an integer, one busier than its threads), run against the course's
  PostgreSQL with counted connects, closes and timeouts.
"""

from __future__ import annotations

import builtins
import math
import random
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager, suppress
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from perfcourse import replicas
from perfcourse.chapters import database_scaling as scaling
from perfcourse.locks import file_lock
from perfcourse.models import ORDER_STATUSES, Base, Order, User
from perfcourse.statements import count_queries

from ..bank import Question
from ..checkers import Checker, Choice, Incorrect, Number, call_learner, short_repr, type_name

__all__ = [
    "QUESTIONS",
]

# --------------------------------------------------------------------------------------------
# 03.q2: a routing Session that keeps a transaction on the primary once it wrote or locked rows
#
# The lesson's RoutingSession sends every read to the replica. The exercise asks for another
# rule: a locking read (SELECT ... FOR UPDATE) counts as a write, and once the current
# transaction has written (or locked), its later reads go to the primary too, until commit() or
# rollback() ends it; then reads return to the replica.

_WRITE_CLAUSES = (sa.Insert, sa.Update, sa.Delete)


class _TransactionRoutingReference(Session):
    """The model answer, run on twin databases to learn where each hidden step belongs."""

    def __init__(self, primary, replica, **kwargs):
        super().__init__(**kwargs)
        self.primary, self.replica = primary, replica
        self.wrote = False

    def get_bind(self, mapper=None, clause=None, **kwargs):
        locks = getattr(clause, "_for_update_arg", None) is not None
        if self._flushing or isinstance(clause, _WRITE_CLAUSES) or locks:
            self.wrote = True
        return self.primary if self.wrote else self.replica

    def commit(self):
        super().commit()
        self.wrote = False

    def rollback(self):
        super().rollback()
        self.wrote = False


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


def _plain_read(rng: random.Random, always_queries: bool = False):
    kind = rng.choice(["select", "count"] if always_queries else ["get", "select", "count"])
    if kind == "get":
        user_id = rng.randint(1, 30)
        return f"session.get(User, {user_id})", lambda s: s.get(User, user_id)
    if kind == "select":
        limit = rng.randint(1, 5)
        return ("session.scalars(select(User).where(User.premium))",
                lambda s: s.scalars(select(User).where(User.premium.is_(True)).limit(limit)).all())
    return ("select count(*) of users",
            lambda s: s.execute(select(sa.func.count()).select_from(User)).scalar())


def _routing_steps(rng: random.Random) -> list[tuple[str, str, Callable]]:
    """A hidden sequence: ``(kind, label, step(session))``; kinds name what a step tests."""
    new_id = iter(range(1000 + 100 * rng.randint(0, 9), 2000))

    def reads(kind, count):
        return [(kind, *_plain_read(rng, kind != "read")) for _ in range(count)]

    def orm_write(s, user_id, value):
        s.get(User, user_id).first_name = value
        s.flush()

    def orm_write_block():
        user_id, value = rng.randint(31, 40), f"Changed{rng.randint(1, 99)}"
        return [("read", *_plain_read(rng)),
                ("write", f"change User {user_id} and flush", lambda s: orm_write(s, user_id, value)),
                *reads("read after write", rng.randint(1, 2)),
                ("commit", "session.commit()", lambda s: s.commit()),
                *reads("read after commit", 1)]

    def core_write_block():
        if rng.random() < 0.5:
            user_id = rng.randint(1, 10)
            label = f"update(User).where(User.id == {user_id})"
            statement = sa.update(User).where(User.id == user_id).values(active=False)
        else:
            user_id = rng.randint(41, 50)
            label = f"delete(User).where(User.id == {user_id})"
            statement = sa.delete(User).where(User.id == user_id)
        end = rng.choice(["commit", "rollback"])
        return [("write", label, lambda s: s.execute(statement)),
                *reads("read after write", 1),
                (end, f"session.{end}()", lambda s: getattr(s, end)()),
                *reads(f"read after {end}", rng.randint(1, 2))]

    def insert_block():
        user_id = next(new_id)
        user = {"id": user_id, "email": f"new{user_id}@example.com", "first_name": "N",
                "last_name": "U", "created_at": datetime(2025, 2, 1)}
        return [("write", f"session.add(User(id={user_id})) and a query (autoflush)",
                 lambda s: (s.add(User(**user)), s.scalars(select(User.id).limit(1)).all())),
                *reads("read after write", 1),
                ("rollback", "session.rollback()", lambda s: s.rollback()),
                *reads("read after rollback", 1)]

    def lock_block():
        user_id = rng.randint(11, 30)
        if rng.random() < 0.5:
            label = f"session.get(User, {user_id}, with_for_update=True)"
            step = lambda s: s.get(User, user_id, with_for_update=True)  # noqa: E731
        else:
            label = f"select(User).where(User.id == {user_id}).with_for_update()"
            step = lambda s: s.scalars(  # noqa: E731
                select(User).where(User.id == user_id).with_for_update()).all()
        return [("read", *_plain_read(rng)), ("lock", label, step),
                *reads("read after lock", 1),
                ("commit", "session.commit()", lambda s: s.commit()),
                *reads("read after commit", 1)]

    def commit_flush_block():
        user_id, value = rng.randint(31, 40), f"Saved{rng.randint(1, 99)}"
        return [("read", f"session.get(User, {user_id})", lambda s: s.get(User, user_id)),
                ("change", f"change User {user_id} (no flush yet)",
                 lambda s: setattr(s.get(User, user_id), "last_name", value)),
                ("commit", "session.commit() (its flush sends the UPDATE)", lambda s: s.commit()),
                *reads("read after commit", rng.randint(1, 2))]

    blocks = [orm_write_block(), core_write_block(), insert_block(), lock_block(),
              core_write_block(), commit_flush_block()]
    rng.shuffle(blocks)
    steps = reads("read", rng.randint(1, 3))
    for block in blocks:
        steps += block
    return steps


def _run_routing(session_class, steps, primary, replica, learner: bool) -> list[tuple[int, int, list]]:
    """Run ``steps`` in one session; per step (statements on primary, on replica, replica kinds)."""
    made = []
    with count_queries(primary) as on_primary, count_queries(replica) as on_replica:
        def run(step):
            seen = (on_primary.count, on_replica.count)
            if learner:
                call_learner(step)
            else:
                step()
            made.append((on_primary.count - seen[0], on_replica.count - seen[1],
                         [s.kind for s in on_replica.statements[seen[1]:]]))

        session = (call_learner if learner else (lambda f, *a: f(*a)))(
            session_class, primary, replica)
        if not isinstance(session, Session):
            raise Incorrect(f"{type_name(session)}(primary, replica) is not a Session: subclass "
                            "sqlalchemy.orm.Session.")
        close = (call_learner if learner else (lambda f, *a: f(*a)))
        try:
            for _, _, step in steps:
                run(lambda step=step: step(session))
        except BaseException:
            with suppress(Incorrect):  # the first hint is the one to show
                close(session.close)
            raise
        close(session.close)
    return made


_ROUTING_HINTS = {
    "read": "A read in a transaction that had not written went to the primary: only writes, "
            "locking reads and the reads after them in the same transaction need the primary.",
    "read after write": "A read after a write in the same transaction (before commit) went to "
                        "the replica, which cannot see the uncommitted change: once a transaction "
                        "has written, keep its reads on the primary.",
    "read after lock": "A read after a locking read in the same transaction went to the replica: "
                       "the locked rows are on the primary; treat the lock like a write.",
    "read after commit": "After commit() a read still went to the primary: the transaction that "
                         "wrote has ended, reads go back to the replica. Clear your flag after "
                         "super().commit() (the commit's own flush is a write).",
    "read after rollback": "After rollback() a read still went to the primary: the transaction "
                           "that wrote has ended; clear your flag on rollback too.",
    "lock": "A locking read (with_for_update(), SELECT ... FOR UPDATE) went to the replica: a "
            "replica cannot lock rows (PostgreSQL refuses FOR UPDATE in a read-only transaction). "
            "A statement whose `_for_update_arg` is not None counts as a write.",
    "commit": "The commit's flush went to the wrong engine: a flush is a write.",
    "write": "A write went to the replica, which is read-only: flushes (`self._flushing`) and "
             "Core insert/update/delete (`clause`) go to the primary.",
}


class _RoutingCheck(Checker):
    seeds = (301, 302, 303)

    def grade(self, answer):
        if not (isinstance(answer, type) and issubclass(answer, Session)):
            raise Incorrect("Pass your Session subclass itself: check(\"03.q2\", "
                            f"TransactionRoutingSession) (got a {type_name(answer)}).")
        for seed in self.seeds:
            rng = random.Random(seed)
            rows = _users(rng, 60)
            steps = _routing_steps(rng)
            engines = [_memory_users(rows) for _ in range(4)]
            try:
                expected = _run_routing(_TransactionRoutingReference, steps, *engines[:2],
                                        learner=False)
                got = _run_routing(answer, steps, *engines[2:], learner=True)
            finally:
                for engine in engines:
                    engine.dispose()
            for (kind, label, _), want, have in zip(steps, expected, got):
                if have[:2] == want[:2]:
                    continue
                where = (f"For `{label}` your session sent {have[0]} statement(s) to the primary "
                         f"and {have[1]} to the replica (expected {want[0]} and {want[1]}). ")
                if any(k != "SELECT" for k in have[2]):
                    raise Incorrect(where + _ROUTING_HINTS["write"])
                raise Incorrect(where + _ROUTING_HINTS.get(kind, ""))

    def model_answer(self):
        return (
            "class TransactionRoutingSession(Session):\n"
            "    def __init__(self, primary, replica, **kwargs):\n"
            "        super().__init__(**kwargs)\n"
            "        self.primary, self.replica = primary, replica\n"
            "        self.wrote = False  # the current transaction wrote or locked rows\n\n"
            "    def get_bind(self, mapper=None, clause=None, **kwargs):\n"
            "        locks = getattr(clause, \"_for_update_arg\", None) is not None\n"
            "        if self._flushing or isinstance(clause, (sa.Insert, sa.Update, sa.Delete)) or locks:\n"
            "            self.wrote = True\n"
            "        return self.primary if self.wrote else self.replica\n\n"
            "    def commit(self):\n"
            "        super().commit()\n"
            "        self.wrote = False\n\n"
            "    def rollback(self):\n"
            "        super().rollback()\n"
            "        self.wrote = False")


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


def _contains_text(value, depth: int = 0) -> bool:
    if isinstance(value, (str, bytes)):
        return True
    if isinstance(value, (tuple, frozenset)) and depth < 4:
        return any(_contains_text(v, depth + 1) for v in value)
    return False


@contextmanager
def _hash_of_another_process(salt: int):
    """``hash()`` as another Python process computes it: str and bytes hashes are salted per
    process (PYTHONHASHSEED), ints are not. Only calls of the builtin are affected (dicts and
    sets use the object's own hash), so the grader can ask "what would this function return in
    another worker?" without starting one."""
    real = builtins.hash

    def salted(value):
        return real((salt, value)) if _contains_text(value) else real(value)

    builtins.hash = salted
    try:
        yield
    finally:
        builtins.hash = real


class _ShardFunctionCheck(Checker):
    keys = 3000

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
        sample = [k for k in keys if isinstance(k, str)][:300]
        here = call_learner(lambda: [answer(k, list(four)) for k in sample])
        for salt in (0x5EED, 0xC0FFEE):
            with _hash_of_another_process(salt):
                there = call_learner(lambda: [answer(k, list(four)) for k in sample])
            if there != here:
                moved = sum(a != b for a, b in zip(here, there))
                raise Incorrect(
                    f"In another process your function sends {moved} of {len(sample)} string keys "
                    "to another shard: Python's hash() of a str is salted per process "
                    "(PYTHONHASHSEED), so two web workers would disagree. Use a stable hash: "
                    "hashlib (md5, sha1, blake2b) of the encoded text.")
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
#
# The grader plays the requests itself (one learner session per request, a cookie per user)
# and waits for the replica between them, outside the learner's time budget. The lag changes
# between two phases (200 ms, then 2 s with a 0.8 s pause before the editors come back), so a
# fixed time window in the cookie fails one of them: too short for the long lag, or still
# sending users to the primary after the short lag has passed.

_LSN_TEXT = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


class _ReadYourWritesScenario:
    """One hidden run of page views and edits on ``primary``/``replica`` (schema of the grader)."""

    def __init__(self, answer, pair, primary, replica, rng: random.Random):
        self.answer, self.pair, self.rng = answer, pair, rng
        self.primary, self.replica = primary, replica
        self.probe = sa.create_engine(pair.replica_url, poolclass=sa.pool.NullPool,
                                      isolation_level="AUTOCOMMIT")
        with primary.connect() as conn:
            self.ids = [row[0] for row in conn.execute(select(User.id).order_by(User.id))]
        self.cookies: dict[int, dict] = {i: {} for i in self.ids}
        self.latest: dict[int, str] = {}
        self.written_at: dict[int, str] = {}  # the primary's LSN after each user's last edit
        self.delay_ms = 0

    # ---- the grader's side: lag, waiting, probes (never inside the learner's budget)

    def set_lag(self, delay_ms: int) -> None:
        replicas.set_apply_delay(self.pair, delay_ms)
        self.delay_ms = delay_ms

    def wait_for_replica(self) -> None:
        scaling.wait_for_replay(self.replica, scaling.current_lsn(self.primary), timeout_s=30)

    def pending(self, user_id: int) -> bool:
        """Whether ``user_id``'s last edit is not on the replica yet."""
        lsn = self.written_at.get(user_id)
        return lsn is not None and not scaling.replica_has_replayed(self.probe, lsn)

    # ---- requests, each through a new learner session

    def _session(self, user_id: int):
        session = self.answer(self.primary, self.replica, self.cookies[user_id])
        if not isinstance(session, Session):
            raise Incorrect(f"ReadYourWritesSession(primary, replica, cookie) made a "
                            f"{type_name(session)}, not a Session.")
        return session

    def _email(self, session, user_id: int) -> str:
        return session.scalars(select(User.email).where(User.id == user_id)).one()

    def _reads(self) -> tuple[int, int]:
        return _users_reads(self.on_primary), _users_reads(self.on_replica)

    def view(self, viewer: int, target: int, moment: str) -> None:
        pending = self.pending(viewer)
        before = self._reads()

        def request():
            with self._session(viewer) as session:
                return self._email(session, target)

        seen = call_learner(request)
        after = self._reads()
        on_primary = after[0] - before[0]
        if viewer == target and viewer in self.latest and seen != self.latest[viewer]:
            raise Incorrect(self._stale_hint(viewer, moment))
        if on_primary and not pending:
            raise Incorrect(self._primary_hint(viewer, moment))

    def edit(self, user_id: int, tag: str, flush_first: bool) -> None:
        """A form post: change the email, read it back. ``flush_first``: flush and read inside the
        transaction before the commit; otherwise the commit's own flush sends the UPDATE."""
        email = f"{tag}.{user_id}.{uuid.uuid4().hex[:10]}@example.com"

        def request():
            with self._session(user_id) as session:
                user = session.get(User, user_id)
                user.email = email
                in_transaction = email
                if flush_first:
                    session.flush()
                    in_transaction = self._email(session, user_id)
                session.commit()
                return in_transaction, self._email(session, user_id)

        in_transaction, after_commit = call_learner(request)
        self.latest[user_id] = email
        self.written_at[user_id] = scaling.current_lsn(self.primary)
        if in_transaction != email:
            raise Incorrect(
                "Inside the transaction that changed the email (flushed, not committed yet) the "
                "read showed the old one: it went to the replica, which never sees uncommitted "
                "changes. Once a session has written, its reads go to the primary.")
        if after_commit != email:
            raise Incorrect(self._stale_hint(user_id, "right after commit(), in the same request"))

    # ---- hints

    def _stale_hint(self, user_id: int, moment: str) -> str:
        cookie = self.cookies[user_id]
        values = list(cookie.values()) if isinstance(cookie, dict) else []
        lsns = [v for v in values if isinstance(v, str) and _LSN_TEXT.match(v)]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        lag = f"{self.delay_ms / 1000:g} s"
        start = (f"A user read their own profile {moment}, and got the old email (the replica "
                 f"lagged {lag}). ")
        if lsns and all(scaling.replica_has_replayed(self.probe, v) for v in lsns):
            return start + (
                f"The cookie's LSN {lsns[-1]} was already replayed while the edit was not: it "
                "was taken before the commit. Call scaling.current_lsn(self.primary) after "
                "super().commit().")
        if lsns:
            return start + (
                f"The cookie holds an LSN the replica has not replayed ({lsns[-1]}), yet the read "
                "went to the replica: in get_bind, read from the primary while "
                "scaling.replica_has_replayed(self.replica, lsn) is false.")
        if numbers:
            return start + (
                "Your cookie holds a number (a time?), no LSN: a time window works only while "
                "the lag stays below it. Store scaling.current_lsn(self.primary) after the "
                "commit and ask the replica whether it has replayed it.")
        if not values:
            return start + (
                "The user's cookie was empty after the edit: each request has a new session, so "
                "only the cookie remembers the write. Store scaling.current_lsn(self.primary) "
                "in self.cookie after the commit.")
        return start + ("Keep the primary's LSN after the commit in the cookie and read from the "
                        "primary until the replica has replayed it.")

    def _primary_hint(self, user_id: int, moment: str) -> str:
        if user_id not in self.latest:
            return (f"A read {moment} by a user who never wrote went to the primary: only a user "
                    "whose own write is not on the replica yet needs the primary.")
        values = list(self.cookies[user_id].values())
        window = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return (f"A user's edit was already on the replica (replayed), yet their read {moment} "
                "went to the primary. "
                + ("A time window keeps users on the primary longer than the lag (here "
                   f"{self.delay_ms / 1000:g} s); " if window else "")
                + "ask the replica with scaling.replica_has_replayed(self.replica, lsn) and "
                "return to it as soon as it has the write.")

    # ---- the run

    def browse(self, times: int, moment: str) -> None:
        for _ in range(times):
            viewer = self.rng.choice(self.ids)
            target = viewer if self.rng.random() < 0.4 else self.rng.choice(self.ids)
            self.view(viewer, target, moment)

    def play(self, short_ms: int, long_ms: int, pause_s: float) -> None:
        with count_queries(self.primary) as self.on_primary, \
                count_queries(self.replica) as self.on_replica:
            self.set_lag(short_ms)
            self.browse(5, "before any edit")
            editors = self.rng.sample(self.ids, 2)
            for n, user_id in enumerate(editors):
                # the first edit of a phase starts with nothing pending on the replica, its
                # UPDATE replays at once and only its commit waits: a cookie LSN taken before
                # the commit's flush looks replayed while the commit is not
                self.edit(user_id, "short", flush_first=n > 0)
                self.view(user_id, user_id, "in the request after their edit (the redirect)")
            self.browse(3, "while edits were on their way to the replica")
            self.wait_for_replica()
            for user_id in editors:
                self.view(user_id, user_id, f"after the replica had replayed their edit "
                          f"(lag {short_ms / 1000:g} s)")
            self.set_lag(long_ms)
            late = [*self.rng.sample([i for i in self.ids if i not in editors], 2), editors[0]]
            for n, user_id in enumerate(late):
                self.edit(user_id, "long", flush_first=n > 0)
                self.view(user_id, user_id, "in the request after their edit (the redirect)")
            time.sleep(pause_s)
            for user_id in late:
                self.view(user_id, user_id, f"{pause_s:g} s after their edit")
            self.wait_for_replica()
            for user_id in late:
                self.view(user_id, user_id, f"after the replica had replayed their edit "
                          f"(lag {long_ms / 1000:g} s)")
            self.browse(4, "after every edit was replayed")

    def close(self) -> None:
        self.probe.dispose()


def _users_reads(counter) -> int:
    return sum(1 for s in counter.statements if s.kind == "SELECT" and "users" in s.sql)


class _ReadYourWritesCheck(Checker):
    schema = "ch03_grader"
    short_ms, long_ms, pause_s = 200, 2000, 0.8
    users, seed = 24, 308

    def grade(self, answer):
        if not callable(answer):
            raise Incorrect("Pass your session class itself: check(\"03.q8\", "
                            f"ReadYourWritesSession) (got a {type_name(answer)}).")
        # One grading of 03.q8 at a time on this data folder (the lesson and the lab graded at
        # once, or `perfcourse grade` beside a kernel): each sets the replica's lag and owns the
        # grader's schema, so a second one waits here instead of changing the first one's lag.
        with file_lock(replicas.replication_dir() / ".grader-03q8.lock"):
            self._grade(answer)

    def _grade(self, answer):
        before = replicas.running_replica_pair()
        pair = replicas.start_replica_pair(0)
        primary, replica = scaling.profile_engines(pair, self.schema)
        scenario = None
        try:
            scaling.prepare_profiles(primary, replica, users=self.users)
            scenario = _ReadYourWritesScenario(answer, pair, primary, replica,
                                               random.Random(self.seed))
            scenario.play(self.short_ms, self.long_ms, self.pause_s)
        finally:
            try:
                if scenario is not None:
                    scenario.close()
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


def _averages_of_shard_averages(orders, shard_count: int) -> list[dict[str, float]]:
    """The classic wrong gathers: the mean of the shards' averages, over the shards that have
    the status, and over every shard (a shard without it counted as 0)."""
    per_shard: dict[str, dict[str, list]] = {}
    for shard, status, total in orders:
        per_shard.setdefault(status, {}).setdefault(shard, []).append(total)
    having, every = {}, {}
    for status, by_shard in per_shard.items():
        averages = [sum(v) / len(v) for v in by_shard.values()]
        having[status] = float(sum(averages) / len(averages))
        every[status] = float(sum(averages) / shard_count)
    return [having, every]


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
                naive = _averages_of_shard_averages(orders, len(engines))
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
                        if any(math.isclose(number, wrong.get(status, math.nan), rel_tol=1e-9,
                                            abs_tol=0.006) for wrong in naive):
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
    {"threads": 10, "requests_per_s": 200, "db_time_s": 0.035},  # 7 exactly; 7.000000000000001 in floats
    {"threads": 4, "requests_per_s": 300, "db_time_s": 0.02},    # 6 busy > 4 threads
    {"threads": 9, "requests_per_s": 350, "db_time_s": 0.013},
)


def _busy_connections(profile: dict) -> int:
    """Little's law in exact decimals (no float rounding), rounded up."""
    return math.ceil(Fraction(str(profile["requests_per_s"])) * Fraction(str(profile["db_time_s"])))


def _pool_reference(profile: dict) -> tuple[int, int]:
    """Pool settings for ``profile``: the busy connections, capped by the threads."""
    busy = _busy_connections(profile)
    size = max(1, min(busy, profile["threads"]))  # a process never has more busy than threads
    return size, profile["threads"] - size


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
            got = call_learner(answer, dict(profile))
            threads = profile["threads"]
            steady, _ = _pool_reference(profile)
            shown = (f"For {threads} threads, {profile['requests_per_s']} requests/s and "
                     f"{profile['db_time_s'] * 1000:g} ms on a connection, ")
            raw = got if not isinstance(got, dict) else (got.get("pool_size"), got.get("max_overflow"))
            if (isinstance(raw, (tuple, list)) and len(raw) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in raw)):
                if raw[1] < 0:
                    raise Incorrect(
                        shown + f"max_overflow={raw[1]} is negative: Little's law gives more "
                        "connections than the process has threads, but only a thread can hold "
                        "one. Cap pool_size at the threads (max_overflow is then 0).")
                floating = math.ceil(profile["requests_per_s"] * profile["db_time_s"])
                if raw[0] == floating != _busy_connections(profile):
                    raise Incorrect(
                        shown + f"pool_size={raw[0]}: {profile['requests_per_s']} × "
                        f"{profile['db_time_s']} is {profile['requests_per_s'] * profile['db_time_s']!r} "
                        f"in floating point, and math.ceil makes it {floating}; the steady load "
                        f"keeps {steady} busy. Round to a few decimals before ceil (or use "
                        "Fraction/Decimal).")
            size, overflow = _settings(got)
            shown += f"pool_size={size}, max_overflow={overflow}: "
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
                "    busy = profile[\"requests_per_s\"] * profile[\"db_time_s\"]  # Little's law\n"
                "    steady = math.ceil(round(busy, 9))  # 200 × 0.035 is 7.000000000000001\n"
                "    size = max(1, min(steady, profile[\"threads\"]))  # only threads hold one\n"
                "    return {\"pool_size\": size, \"max_overflow\": profile[\"threads\"] - size}")


# --------------------------------------------------------------------------------------------

QUESTIONS = [
    Question(
        id="03.q1",
        title="Read-your-writes with a lagging replica",
        checker=Choice(
            options={
                "a": "For a short while after a user writes, serve that user's reads from the "
                "primary (or wait until a replica has replayed the write's LSN)",
                "b": "Add a second replica so the reads spread over two servers and each "
                "replica has less replay work to do",
                "c": "Raise the engine's pool_size so the read right after the write gets a "
                "connection of its own without waiting",
                "d": "Retry the read on the same replica a few times until the value it returns "
                "differs from the one shown before",
            },
            correct="a",
            explanations={
                "b": "A second replica lags just as much: the stale read comes from replication "
                "lag (asynchronous replay), not from load, and each replica replays all the WAL.",
                "c": "The read did not wait for a connection, it got one to a replica that had "
                "not replayed the write yet; more connections do not make a replica replay faster.",
                "d": "Retrying cannot tell 'not replayed yet' from 'nothing changed' (a user who "
                "saved the same name would loop), and it adds the lag to the request; wait for "
                "the write's LSN instead, or read the primary.",
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
        title="A routing Session that keeps a writing transaction on the primary",
        checker=_RoutingCheck(),
        explanation="Session.get_bind is asked for an engine for every statement. Flushes "
        "(self._flushing), Core INSERT/UPDATE/DELETE and locking reads (with_for_update) go to "
        "the primary; after one of them, the rest of the transaction stays there (the replica "
        "cannot see its uncommitted changes nor hold its locks). commit() and rollback() end the "
        "transaction, and reads go back to the replica.",
        hints=("Keep a flag set in get_bind by writes and locking reads "
               "(getattr(clause, '_for_update_arg', None) is not None); read it for every read; "
               "clear it in commit() and rollback(), after calling super().",),
        time_limit=15.0,
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
        time_limit=15.0,
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
                "a": "pool_recycle=1800",
                "b": "pool_size=20",
                "c": "pool_timeout=60",
                "d": "pool_pre_ping=True",
            },
            correct="d",
            explanations={
                "a": "pool_recycle replaces connections older than 1800 s at checkout; the "
                "failover killed connections of every age, so a younger one is still handed out "
                "dead. It is the fix for idle timeouts of a known length, not for failovers.",
                "b": "More connections means more dead ones after the failover, not fewer: each "
                "is handed out once and fails.",
                "c": "pool_timeout is how long a checkout waits for a free connection; the dead "
                "connection is free and handed out at once.",
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
                "a": "Shard every table by user id across four servers",
                "b": "Raise max_connections and every pool_size",
                "c": "Add read replicas and route reads to them",
                "d": "Switch every engine to NullPool",
            },
            correct="c",
            explanations={
                "a": "Sharding splits the data and the writes; it costs cross-shard queries and "
                "rebalancing. It is the step for data or write volume one server cannot hold, "
                "not for a read-heavy load that fits on one server.",
                "b": "More connections add contention on a CPU that is already at 85%; they do "
                "not add capacity.",
                "d": "NullPool opens a connection per checkout: more work for a busy database, "
                "not less.",
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
                "a": "Run it on one shard and multiply each day's revenue by the number of shards",
                "b": "Run it on every shard, then add the shards' revenues day by day in the "
                "application (scatter-gather)",
                "c": "Run it on every shard, then average the shards' revenues day by day in "
                "the application",
                "d": "It cannot be answered once the data is sharded: keep an unsharded copy for "
                "reports",
            },
            correct="b",
            explanations={
                "a": "Shards are not copies of each other: their users spend differently and "
                "their sizes differ (range sharding, a new shard), so one shard × 8 is a guess.",
                "c": "Revenue adds up: the total is the sum of the shards' revenues. An average "
                "of 8 partial revenues is an eighth of the total, and averages of averages weigh "
                "a small shard like a big one.",
                "d": "It can: each shard answers for its own users, and sums add up. A reporting "
                "copy is an option for heavy analytics, not a requirement.",
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
        time_limit=15.0,
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
        time_limit=15.0,
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
        "connection counts against the server's max_connections across all processes. When "
        "Little's law gives more than the threads, the threads are the limit: pool_size = "
        "threads, max_overflow = 0.",
        hints=("Little's law: connections busy at once = requests/s × seconds on a connection; "
               "round up (math.ceil, after round(x, 9) to drop float noise), and never above the "
               "threads. Whatever the burst needs beyond that is max_overflow.",),
        time_limit=10.0,
    ),
]
