"""Grader tests for chapter 03 (database scaling): right answers written differently from the
model answers pass, plausible wrong ones fail with a hint that names the mistake.

03.q8 runs on the real primary/replica pair (started once for the module, stopped at the end if
it was not running); 03.q10 on the course's PostgreSQL. Nothing here asserts on time.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import statistics
import time
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from perfcourse import replicas
from perfcourse.chapters import database_scaling as scaling
from perfcourse.grading.bank import question
from perfcourse.models import Order

from .kit import fails, passes

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------
# Choice questions: the right key in any case and spacing; each wrong key with its own reason

CHOICES = {"03.q1": "a", "03.q5": "d", "03.q6": "c", "03.q7": "b"}


@pytest.mark.parametrize("qid, key", CHOICES.items(), ids=list(CHOICES))
def test_choice_right_key_in_any_form(qid, key):
    assert question(qid).checker.correct == key
    passes(qid, key.upper())
    passes(qid, f" {key} ")


# ------------------------------------------------------------------------------------------
# 03.q2: a routing Session that keeps a transaction on the primary once it wrote or locked

_WRITES = (sa.Insert, sa.Update, sa.Delete)


def _locks(clause) -> bool:
    return getattr(clause, "_for_update_arg", None) is not None


class _Base(Session):
    def __init__(self, primary, replica, **kwargs):
        super().__init__(**kwargs)
        self.primary, self.replica = primary, replica
        self.wrote = False


class ByTransactionIdentity(_Base):
    """Remembers which transaction wrote, compares with the current one: no commit override."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        current = self.get_transaction()
        if self._flushing or isinstance(clause, _WRITES) or _locks(clause):
            self.wrote = current
        return self.primary if current is not None and current is self.wrote else self.replica


class ByEvents(_Base):
    """Clears the flag from the session's own after_transaction_end event."""

    def __init__(self, primary, replica, **kwargs):
        super().__init__(primary, replica, **kwargs)
        event.listen(self, "after_transaction_end", self._ended)

    def _ended(self, session, transaction):
        if transaction.parent is None:
            self.wrote = False

    def get_bind(self, mapper=None, clause=None, **kwargs):
        dml = getattr(clause, "is_dml", False)
        self.wrote = self.wrote or self._flushing or dml or _locks(clause)
        return self.primary if self.wrote else self.replica


class Sticky(_Base):
    """Sets the flag, never clears it."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if self._flushing or isinstance(clause, _WRITES) or _locks(clause):
            self.wrote = True
        return self.primary if self.wrote else self.replica


class ClearsBeforeCommit(Sticky):
    def commit(self):
        self.wrote = False
        super().commit()

    def rollback(self):
        super().rollback()
        self.wrote = False


class ForgetsRollback(Sticky):
    def commit(self):
        super().commit()
        self.wrote = False


class IgnoresLocks(_Base):
    def get_bind(self, mapper=None, clause=None, **kwargs):
        if self._flushing or isinstance(clause, _WRITES):
            self.wrote = True
        return self.primary if self.wrote else self.replica

    def commit(self):
        super().commit()
        self.wrote = False

    def rollback(self):
        super().rollback()
        self.wrote = False


class EverythingOnPrimary(_Base):
    def get_bind(self, mapper=None, clause=None, **kwargs):
        return self.primary


class WritesByStatementOnly(_Base):
    """The lesson's rule written again: no memory of the transaction."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        write = self._flushing or isinstance(clause, _WRITES) or _locks(clause)
        return self.primary if write else self.replica


def test_q2_right_answers_pass():
    passes("03.q2", ByTransactionIdentity)
    passes("03.q2", ByEvents)


@pytest.mark.parametrize("answer, hint", [
    (scaling.RoutingSession, "read after a write in the same transaction"),
    (WritesByStatementOnly, "read after a write in the same transaction"),
    (Sticky, "still went to the primary"),
    (ClearsBeforeCommit, "after super().commit()"),
    (ForgetsRollback, "on rollback too"),
    (IgnoresLocks, "locking read"),
    (EverythingOnPrimary, "had not written went to the primary"),
    (lambda primary, replica: Session(), "Session subclass"),
], ids=["lesson-routing-session", "no-transaction-memory", "never-cleared",
        "cleared-before-commit", "rollback-not-cleared", "locks-on-replica", "all-on-primary",
        "not-a-session-class"])
def test_q2_wrong_answers_fail_with_the_reason(answer, hint):
    fails("03.q2", answer, hint)


# ------------------------------------------------------------------------------------------
# 03.q3: a stable shard function that moves few keys


def sha256_rendezvous(key, shards):
    def weight(shard):
        return int.from_bytes(hashlib.sha256(f"{key}|{shard}".encode()).digest()[:8], "big")
    return max(shards, key=weight)


@lru_cache(maxsize=16)
def _ring(shards: tuple):
    return scaling.HashRing(shards)


def cached_ring(key, shards):
    return _ring(tuple(shards)).shard_for(key)


def blake_lowest_score(key, shards):
    return min(shards, key=lambda s: hashlib.blake2b(f"{key}@{s}".encode(), digest_size=8).digest())


@lru_cache(maxsize=16)
def _sha1_points(shards: tuple) -> list:
    return sorted((hashlib.sha1(f"{s}/{v}".encode()).hexdigest(), s)
                  for s in shards for v in range(64))


def sha1_ring(key, shards):
    points = _sha1_points(tuple(shards))
    i = bisect.bisect(points, (hashlib.sha1(str(key).encode()).hexdigest(),))
    return points[i % len(points)][1]


def salted_rendezvous(key, shards):
    return max(shards, key=lambda shard: hash(f"{shard}:{key}"))


def salted_tuple_rendezvous(key, shards):
    return max(shards, key=lambda shard: hash((shard, key)))


def stable_modulo(key, shards):
    return shards[scaling.stable_hash(key) % len(shards)]


def random_shard(key, shards):
    return random.choice(shards)


def first_shard(key, shards):
    return shards[0]


def index_not_name(key, shards):
    return max(range(len(shards)),
               key=lambda i: hashlib.md5(f"{shards[i]}:{key}".encode()).digest())


@pytest.mark.parametrize("answer", [sha256_rendezvous, cached_ring, blake_lowest_score, sha1_ring],
                         ids=["sha256-rendezvous", "hash-ring-cached", "blake2-lowest",
                              "sha1-ring-bisect"])
def test_q3_right_answers_pass(answer):
    passes("03.q3", answer)


@pytest.mark.parametrize("answer, hints", [
    (salted_rendezvous, ("another process", "PYTHONHASHSEED")),
    (salted_tuple_rendezvous, ("another process", "stable hash")),
    (stable_modulo, ("between old shards",)),
    (random_shard, ("deterministic",)),
    (first_shard, ("not spread",)),
    (index_not_name, ("one of the shard names",)),
    (lambda key, shards: "db-b", ("one of the shard names",)),
], ids=["hash-of-str", "hash-of-tuple", "modulo-of-stable-hash", "random", "always-first",
        "returns-index", "visible-example-hard-coded"])
def test_q3_wrong_answers_fail_with_the_reason(answer, hints):
    fails("03.q3", answer, *hints)


PUBLIC = [name for name in scaling.__all__ if callable(getattr(scaling, name))]


@pytest.mark.parametrize("qid", ["03.q2", "03.q3"])
def test_no_public_helper_passes(qid):
    for name in PUBLIC:
        if name.startswith(("drop_", "make_", "prepare_", "fork_", "terminate_")):
            continue  # would act on the course's data before failing
        fails(qid, getattr(scaling, name))


# ------------------------------------------------------------------------------------------
# 03.q8 (lab): read-your-writes on the real replica pair


@pytest.fixture(scope="module")
def replica_pair():
    before = replicas.running_replica_pair()
    pair = replicas.start_replica_pair(replicas.DEFAULT_APPLY_DELAY_MS)
    yield pair
    if before is None:
        replicas.stop_replica_pair()
    else:
        replicas.set_apply_delay(pair, before.apply_delay_ms)


class _Cookie(scaling.RoutingSession):
    def __init__(self, primary, replica, cookie, **kwargs):
        super().__init__(primary, replica, **kwargs)
        self.cookie, self.wrote = cookie, False


class LsnByEvents(_Cookie):
    """Marks writes from after_flush, stores the LSN from after_commit, under another key."""

    def __init__(self, primary, replica, cookie, **kwargs):
        super().__init__(primary, replica, cookie, **kwargs)
        event.listen(self, "after_flush", lambda session, context: setattr(self, "wrote", True))
        event.listen(self, "after_commit", self._committed)

    def _committed(self, session):
        if self.wrote:
            with self.primary.connect() as conn:  # not through this session: it is committing
                self.cookie["wal"] = conn.exec_driver_sql(
                    "SELECT pg_current_wal_insert_lsn()::text").scalar_one()
            self.wrote = False

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if self.is_write(clause) or self.wrote:
            return self.primary
        wal = self.cookie.get("wal")
        behind = wal is not None and not scaling.replica_has_replayed(self.replica, wal)
        return self.primary if behind else self.replica


class WaitsForReplay(_Cookie):
    """Correct but slower: waits until the replica has the user's write, then reads there."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if self.is_write(clause):
            self.wrote = True
        if self.wrote:
            return self.primary
        if "lsn" in self.cookie:
            scaling.wait_for_replay(self.replica, self.cookie.pop("lsn"))
        return self.replica

    def commit(self):
        super().commit()
        if self.wrote:
            self.cookie["lsn"] = scaling.current_lsn(self.primary)
            self.wrote = False


class Lsn(_Cookie):
    def get_bind(self, mapper=None, clause=None, **kwargs):
        if self.is_write(clause):
            self.wrote = True
            return self.primary
        lsn = self.cookie.get("lsn")
        if self.wrote or (lsn and not scaling.replica_has_replayed(self.replica, lsn)):
            return self.primary
        return self.replica

    def commit(self):
        super().commit()
        if self.wrote:
            self.cookie["lsn"] = scaling.current_lsn(self.primary)
            self.wrote = False


class LsnBeforeCommit(Lsn):
    """Takes the LSN first, then commits: the commit's own flush and commit come after it."""

    def commit(self):
        self.cookie["lsn"] = scaling.current_lsn(self.primary)
        Session.commit(self)
        self.wrote = False


class LsnOutsideTheTransaction(Lsn):
    """Remembers the LSN but sends the reads of an unfinished transaction to the replica."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if self.is_write(clause):
            self.wrote = True
            return self.primary
        lsn = self.cookie.get("lsn")
        return self.primary if lsn and not scaling.replica_has_replayed(self.replica, lsn) \
            else self.replica


class LsnInTheSessionOnly(Lsn):
    """Keeps the LSN on the session object, which the next request does not have."""

    def commit(self):
        Session.commit(self)
        if self.wrote:
            self.cookie = {"lsn": scaling.current_lsn(self.primary)}
            self.wrote = False


def time_window(seconds: float):
    class TimeWindow(_Cookie):
        def get_bind(self, mapper=None, clause=None, **kwargs):
            if self.is_write(clause):
                self.wrote = True
                return self.primary
            recent = time.monotonic() - self.cookie.get("wrote_at", -1e9) < seconds
            return self.primary if self.wrote or recent else self.replica

        def commit(self):
            super().commit()
            if self.wrote:
                self.cookie["wrote_at"] = time.monotonic()
                self.wrote = False

    return TimeWindow


@pytest.mark.parametrize("answer", [LsnByEvents, WaitsForReplay],
                         ids=["lsn-from-session-events", "wait-for-replay"])
def test_q8_right_answers_pass(replica_pair, answer):
    passes("03.q8", answer)
    # the grader leaves a running pair as it found it
    assert replicas.running_replica_pair().apply_delay_ms == replicas.DEFAULT_APPLY_DELAY_MS


def test_q8_a_second_grading_waits_for_the_first(monkeypatch):
    """Two gradings of 03.q8 at once (lesson and lab, or a kernel and `perfcourse grade`) would
    set the replica's lag under each other: the second waits for the first's lock."""
    import threading

    from perfcourse.locks import file_lock

    reached = threading.Event()

    def first_step_of_grading():
        reached.set()
        raise RuntimeError("stopped here by the test")

    monkeypatch.setattr(replicas, "running_replica_pair", first_step_of_grading)
    outcome = []

    def grade():
        try:
            question("03.q8").checker.grade(LsnByEvents)
        except RuntimeError as exc:
            outcome.append(str(exc))

    with file_lock(replicas.replication_dir() / ".grader-03q8.lock"):
        grading = threading.Thread(target=grade, daemon=True)
        grading.start()
        assert not reached.wait(0.5), "03.q8 graded while another grading held the lock"
    grading.join(timeout=30)
    assert reached.is_set() and outcome == ["stopped here by the test"]


@pytest.mark.parametrize("answer, hints", [
    (lambda p, r, cookie: scaling.RoutingSession(p, r), ("right after commit()", "cookie")),
    (LsnOutsideTheTransaction, ("inside the transaction",)),
    (LsnBeforeCommit, ("taken before the commit",)),
    (LsnInTheSessionOnly, ("cookie was empty",)),
    (time_window(2.0), ("time window", "replayed")),
    (time_window(0.1), ("time window works only while the lag stays below it",)),
    (lambda p, r, cookie: scaling.PrimaryOnlySession(p, r), ("never wrote",)),
], ids=["lesson-routing-session", "transaction-reads-on-replica", "lsn-before-commit",
        "lsn-not-in-cookie", "time-window-2s", "time-window-100ms", "all-on-primary"])
def test_q8_wrong_answers_fail_with_the_reason(replica_pair, answer, hints):
    fails("03.q8", answer, *hints)


# ------------------------------------------------------------------------------------------
# 03.q9 (lab): an exact average across shards


def weighted_averages(shards):
    """Per shard AVG and COUNT, weighted by the counts: the same as SUM/COUNT."""
    weighted, counts = {}, {}
    query = select(Order.status, func.avg(Order.total), func.count()).group_by(Order.status)
    for engine in shards.values():
        with engine.connect() as conn:
            for status, average, n in conn.execute(query):
                weighted[status] = weighted.get(status, 0.0) + float(average) * n
                counts[status] = counts.get(status, 0) + n
    return {s: weighted[s] / counts[s] for s in weighted}


def raw_sql_sums(shards):
    totals = {}
    for engine in shards.values():
        with engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT status, SUM(total), COUNT(*) FROM orders GROUP BY status").all()
        for status, total, n in rows:
            s, c = totals.get(status, (Decimal(0), 0))
            totals[status] = (s + Decimal(str(total)), c + n)
    return {status: float(s / c) for status, (s, c) in totals.items()}


def _shard_averages(shards):
    per = {}
    for engine in shards.values():
        with engine.connect() as conn:
            for status, average in conn.execute(
                    select(Order.status, func.avg(Order.total)).group_by(Order.status)):
                per.setdefault(status, []).append(float(average))
    return per


def mean_of_shard_averages(shards):
    return {s: statistics.mean(v) for s, v in _shard_averages(shards).items()}


def rounded_mean_of_shard_averages(shards):
    return {s: round(statistics.mean(v), 2) for s, v in _shard_averages(shards).items()}


def zero_for_missing_statuses(shards):
    per = _shard_averages(shards)
    return {s: sum(v) / len(shards) for s, v in per.items()}


def every_order_to_python(shards):
    rows = []
    for engine in shards.values():
        with engine.connect() as conn:
            rows += conn.execute(select(Order.status, Order.total)).all()
    statuses = {s for s, _ in rows}
    return {s: sum(float(t) for x, t in rows if x == s) / sum(x == s for x, _ in rows)
            for s in statuses}


def one_query_per_status(shards):
    sums, counts = {}, {}
    for engine in shards.values():
        with engine.connect() as conn:
            statuses = conn.execute(select(Order.status).distinct()).scalars().all()
            for status in statuses:
                total, n = conn.execute(select(func.sum(Order.total), func.count())
                                        .where(Order.status == status)).one()
                sums[status] = sums.get(status, 0) + float(total)
                counts[status] = counts.get(status, 0) + n
    return {s: sums[s] / counts[s] for s in sums}


def test_q9_right_answers_pass():
    passes("03.q9", weighted_averages)
    passes("03.q9", raw_sql_sums)


@pytest.mark.parametrize("answer, hints", [
    (scaling.average_total_by_status_naive, ("average of the shards' averages",)),
    (mean_of_shard_averages, ("average of the shards' averages", "SUM and COUNT")),
    (rounded_mean_of_shard_averages, ("average of the shards' averages",)),
    (zero_for_missing_statuses, ("average of the shards' averages",)),
    (every_order_to_python, ("one row per status",)),
    (one_query_per_status, ("queries",)),
    (lambda shards: {"delivered": 101.5, "pending": 98.2}, ("statuses",)),
], ids=["chapter-naive-helper", "mean-of-averages", "rounded-mean-of-averages",
        "missing-status-as-zero", "every-order", "query-per-status", "hard-coded-dict"])
def test_q9_wrong_answers_fail_with_the_reason(answer, hints):
    fails("03.q9", answer, *hints)


# ------------------------------------------------------------------------------------------
# 03.q10 (lab): pool settings from a request profile (the course's PostgreSQL)


def exact_fraction(profile):
    busy = Fraction(str(profile["requests_per_s"])) * Fraction(str(profile["db_time_s"]))
    size = min(math.ceil(busy), profile["threads"])
    return {"pool_size": size, "max_overflow": profile["threads"] - size}


def decimal_ceiling(profile):
    busy = Decimal(str(profile["requests_per_s"])) * Decimal(str(profile["db_time_s"]))
    size = min(int(busy.to_integral_value(rounding=ROUND_CEILING)), profile["threads"])
    return (size, profile["threads"] - size)


def float_ceil(profile):
    size = min(math.ceil(profile["requests_per_s"] * profile["db_time_s"]), profile["threads"])
    return {"pool_size": size, "max_overflow": profile["threads"] - size}


def no_cap(profile):
    size = math.ceil(round(profile["requests_per_s"] * profile["db_time_s"], 9))
    return {"pool_size": size, "max_overflow": profile["threads"] - size}


def overflow_clamped_only(profile):
    size = math.ceil(round(profile["requests_per_s"] * profile["db_time_s"], 9))
    return {"pool_size": size, "max_overflow": max(0, profile["threads"] - size)}


def rounded_down(profile):
    size = max(1, int(profile["requests_per_s"] * profile["db_time_s"]))
    return {"pool_size": size, "max_overflow": profile["threads"] - size}


def one_per_thread(profile):
    return {"pool_size": profile["threads"], "max_overflow": 0}


@pytest.mark.parametrize("answer", [exact_fraction, decimal_ceiling],
                         ids=["fraction", "decimal-tuple"])
def test_q10_right_answers_pass(answer):
    passes("03.q10", answer)


@pytest.mark.parametrize("answer, hints", [
    (float_ceil, ("7.000000000000001", "pool_size=8")),
    (no_cap, ("max_overflow=-2", "negative")),
    (overflow_clamped_only, ("only 4 threads",)),
    (rounded_down, ("open and close",)),
    (one_per_thread, ("idle connections",)),
    (lambda profile: {"pool_size": 5, "max_overflow": 10}, ("max_connections",)),
    (lambda profile: (1, 1), ("timed out",)),
], ids=["float-ceil", "negative-overflow", "pool-above-threads", "rounded-down",
        "one-per-thread", "sqlalchemy-default", "too-small"])
def test_q10_wrong_answers_fail_with_the_reason(answer, hints):
    fails("03.q10", answer, *hints)
