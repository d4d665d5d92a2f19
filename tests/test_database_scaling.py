"""Chapter 03 helpers: a real streaming replica, shards, consistent hashing, pool behaviour.

Assertions are on counts (which engine served a statement, keys moved, connections opened,
timeouts), never on time. Pool tests run on PostgreSQL embedded and configured; the replica pair
is always the embedded one (a configured server cannot be given a replica here).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.ext.horizontal_shard import ShardedSession

from perfcourse import db, replicas
from perfcourse.chapters import database_scaling as scaling
from perfcourse.models import Base, Order, User
from perfcourse.seed import seed_dataset
from perfcourse.statements import count_queries
from perfcourse.timing import Benchmark

# ------------------------------------------------------------------------------------------
# Replication


@pytest.fixture(scope="module")
def pair():
    was_running = replicas.replica_pair_running()
    pair = replicas.start_replica_pair()
    yield pair
    if not was_running:
        replicas.stop_replica_pair()


@pytest.fixture(scope="module")
def pair_engines(pair):
    primary, replica = pair.engines()
    scaling.prepare_replicated_users(primary, replica, users=20)
    yield primary, replica
    primary.dispose()
    replica.dispose()


def test_start_is_idempotent_and_replica_is_read_only(pair, pair_engines):
    again = replicas.start_replica_pair()
    assert again.primary_url == pair.primary_url and again.replica_url == pair.replica_url
    assert replicas.replica_pair_running()
    primary, replica = pair_engines
    with replica.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_is_in_recovery()").scalar() is True
        assert conn.exec_driver_sql("SHOW recovery_min_apply_delay").scalar() == "300ms"
        with pytest.raises(sa.exc.InternalError):
            conn.exec_driver_sql("CREATE TABLE nope (id int)")
    with primary.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_is_in_recovery()").scalar() is False
        assert conn.exec_driver_sql(
            "SELECT state FROM pg_stat_replication").scalar() == "streaming"


def test_stop_leaves_the_pair_to_another_process_that_uses_it(pair):
    assert os.getpid() in replicas.pair_users()  # the fixture started (or reused) it
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        replicas._take_lease(pair.folder, other.pid)  # as start_replica_pair() in that process
        assert replicas.stop_replica_pair() is False  # our lease is given back, theirs holds
        assert replicas.replica_pair_running()
        assert other.pid in replicas.pair_users() and os.getpid() not in replicas.pair_users()
    finally:
        other.kill()
        other.wait()
    assert other.pid not in replicas.pair_users()  # a dead process's lease is pruned
    replicas.start_replica_pair()  # take our lease again for the module's other tests
    assert os.getpid() in replicas.pair_users()


def test_read_after_write_runs_cases_written_elsewhere(pair_engines):
    primary, replica = pair_engines
    cases = Benchmark(repeat=1, warmup=0)

    @cases.case
    def on_replica(user_id, email):
        """read the replica"""
        with scaling.RoutingSession(primary, replica) as session:
            session.get(User, user_id).email = email
            session.commit()
            return session.scalars(select(User.email).where(User.id == user_id)).one()

    @cases.case
    def on_primary(user_id, email):
        """read the primary"""
        with scaling.RoutingSession(primary, replica) as session:
            session.get(User, user_id).email = email
            session.commit()
            return session.scalars(select(User.email).where(User.id == user_id),
                                   bind_arguments={"bind": primary}).one()

    table = scaling.read_after_write(cases, primary, replica, 3).set_index("case")
    assert table.fresh.to_dict() == {"read the replica": False, "read the primary": True}
    assert table.primary_queries.tolist() == [1, 2]
    assert table.replica_queries.tolist() == [2, 1]


def test_sticky_session_reads_the_primary_after_a_write(pair_engines):
    primary, replica = pair_engines
    with scaling.StickyRoutingSession(primary, replica, stick_s=5) as session, \
            count_queries(primary) as on_primary:
        session.get(User, 4).email = "sticky@x.test"
        session.commit()
        assert session.scalars(select(User.email).where(User.id == 4)).one() == "sticky@x.test"
    assert [s.kind for s in on_primary.statements] == ["UPDATE", "SELECT"]


def test_lag_follows_the_apply_delay(pair, pair_engines):
    primary, replica = pair_engines
    assert min(scaling.visibility_lag(primary, replica, repeat=2)) >= 0.25
    replicas.set_apply_delay(pair, 0)
    try:
        with replica.connect() as conn:
            assert conn.exec_driver_sql("SHOW recovery_min_apply_delay").scalar() == "0"
    finally:
        replicas.set_apply_delay(pair, replicas.DEFAULT_APPLY_DELAY_MS)


def test_routing_session_on_two_sqlite_databases(tmp_path):
    engines = {}
    for name in ("primary", "replica"):
        engines[name] = sa.create_engine(f"sqlite:///{tmp_path / name}.db")
        Base.metadata.create_all(engines[name], tables=[User.__table__])
    with scaling.RoutingSession(engines["primary"], engines["replica"]) as session, \
            count_queries(engines["primary"]) as p, count_queries(engines["replica"]) as r:
        session.add(User(id=1, email="a@x", first_name="a", last_name="b",
                         created_at=pd.Timestamp("2025-01-01").to_pydatetime()))
        session.commit()
        assert session.scalars(select(User)).all() == []  # the "replica" never got the row
        session.execute(sa.update(User).values(active=False))
        session.commit()
    assert [s.kind for s in p.statements] == ["INSERT", "UPDATE"]
    assert [s.kind for s in r.statements] == ["SELECT"]


# ------------------------------------------------------------------------------------------
# Sharding


def test_modulo_moves_most_keys_the_ring_few():
    schemes = Benchmark()
    schemes.add("modulo", lambda shards: lambda key: scaling.modulo_shard(key, shards))
    schemes.add("ring", lambda shards: scaling.HashRing(shards).shard_for)
    table = scaling.resharding_table(schemes, range(1, 10_001), 4, 5).set_index("case")
    modulo, ring = table.loc["modulo"], table.loc["ring"]
    assert modulo.ideal == 2000 and modulo["keys"] == 10_000
    assert modulo.moved == 8000
    assert ring.moved == ring.to_new_shard  # every moved key went to the new shard
    assert 1000 < ring.moved < 3000


def test_ring_is_stable_and_balanced():
    ring = scaling.HashRing(scaling.shard_names(4))
    sizes = scaling.shard_sizes(ring.shard_for, range(20_000))
    assert set(sizes) == set(scaling.shard_names(4))
    assert min(sizes.values()) > 3000
    assert ring.shard_for("user:42") == scaling.HashRing(scaling.shard_names(4)).shard_for("user:42")


@pytest.fixture(scope="module")
def shards():
    tiny = db.engine("sqlite", scale="tiny")
    seed_dataset(tiny, "tiny", progress=False)
    made = scaling.make_shards(tiny, 3, prefix="t_ch03_shard")
    yield tiny, made
    scaling.drop_shards(made, prefix="t_ch03_shard")
    tiny.dispose()


def test_scatter_gather_matches_one_database(shards):
    tiny, made = shards
    with tiny.connect() as conn:
        users = conn.execute(select(sa.func.count()).select_from(User)).scalar()
    total = 0
    for engine in made.values():
        with engine.connect() as conn:
            total += conn.execute(select(sa.func.count()).select_from(User)).scalar()
    assert total == users
    counters = [count_queries(e).start() for e in made.values()]
    partial = [row for engine in made.values() for row in scaling.top_customers(engine, 7)]
    gathered = sorted(partial, key=lambda row: (-row[1], row[0]))[:7]
    assert gathered == scaling.top_customers(tiny, 7)
    assert [c.count for c in counters] == [1, 1, 1]
    for c in counters:
        c.stop()


def test_sharded_session_targets_one_shard_by_user(shards):
    _, made = shards
    names = list(made)
    counters = {n: count_queries(e).start() for n, e in made.items()}
    try:
        def route(key):
            return scaling.modulo_shard(key, names)

        def identity_chooser(mapper, primary_key, *, lazy_loaded_from, **kw):
            if lazy_loaded_from is not None:
                return [lazy_loaded_from.identity_token]
            return [route(primary_key[0])] if mapper.class_ is User else names

        def execute_chooser(context):
            ids = scaling.user_ids_in(context)
            return sorted({route(i) for i in ids}) if ids else names

        with ShardedSession(shard_chooser=lambda mapper, instance, clause=None: route(instance.id),
                            identity_chooser=identity_chooser, execute_chooser=execute_chooser,
                            shards=made) as session:
            user = session.get(User, 5)
            assert user.id == 5
            session.scalars(select(Order).where(Order.user_id == 5)).all()
            assert {n: c.count for n, c in counters.items()} == {
                n: (2 if n == scaling.modulo_shard(5, names) else 0) for n in names}
            for c in counters.values():
                c.reset()
            session.scalars(select(User).where(User.email == "nobody@x")).all()
            assert all(c.count == 1 for c in counters.values())
    finally:
        for c in counters.values():
            c.stop()


# ------------------------------------------------------------------------------------------
# Pooling (PostgreSQL embedded and configured)


@pytest.fixture
def make_engine(postgres_mode):
    return scaling.postgres_engine


def test_nullpool_connects_per_checkout(make_engine):
    table = scaling.checkouts_table({"queue": make_engine(),
                                     "null": make_engine(poolclass=sa.pool.NullPool)},
                                    checkouts=5).set_index("pool")
    assert table.connects.tolist() == [1, 5]


def test_overflow_connection_is_closed_on_return(make_engine):
    steps = scaling.overflow_steps(make_engine(pool_size=2, max_overflow=1))
    assert steps.connects.tolist() == [3, 3, 4, 4]
    assert steps.closes.tolist() == [0, 1, 1, 2]
    assert steps.in_pool.tolist() == [0, 2, 0, 2]


def test_exhausted_pool_times_out(make_engine):
    engine = make_engine(pool_size=2, max_overflow=1, pool_timeout=0.1)
    try:
        result = scaling.exhaust_pool(engine, workers=6, hold_s=0.5)
    finally:
        engine.dispose()
    assert (result["served"], result["timeouts"], result["connects"]) == (3, 3, 3)


def test_pre_ping_recovers_from_a_killed_connection(make_engine):
    without = scaling.pre_ping_demo(make_engine(pool_size=1, max_overflow=0))
    with_ping = scaling.pre_ping_demo(make_engine(pool_size=1, max_overflow=0,
                                                  pool_pre_ping=True))
    assert (without["pre_ping"], with_ping["pre_ping"]) == (False, True)
    assert (without["errors"], without["served"]) == (1, 2)
    assert (with_ping["errors"], with_ping["served"]) == (0, 3)


def test_recycle_replaces_old_connections(make_engine):
    young = scaling.recycle_demo(make_engine(pool_size=1, pool_recycle=0.05), 0.1, checkouts=2)
    assert (young["pool_recycle_s"], young["connects"]) == (0.05, 2)
    assert scaling.recycle_demo(make_engine(pool_recycle=3600), 0.0, checkouts=2)["connects"] == 1


def test_pool_throughput_counts(make_engine):
    table = scaling.pool_throughput([make_engine(pool_size=n, max_overflow=0) for n in (1, 2)],
                                    workers=2, requests=6, service_s=0.001)
    assert table.connects.tolist() == [1, 2]
    assert table.checkouts.tolist() == [6, 6]


def test_fork_dispose(make_engine):
    engine = make_engine()
    try:
        shared = scaling.fork_demo(engine)

        def forget(engine):
            """dispose(close=False)"""
            engine.dispose(close=False)

        own = scaling.fork_demo(engine, forget)
    finally:
        engine.dispose()
    assert shared["same_connection"] and not own["same_connection"]
    assert own["parent_still_works"]
    assert (shared["after_fork"], own["after_fork"]) == ("nothing", "dispose(close=False)")


# ------------------------------------------------------------------------------------------
# Lab helpers (the lab's questions, 03.q8-03.q10, are tested in tests/grading/test_ch03.py)


class LsnSession(scaling.RoutingSession):
    """Read-your-writes by LSN, as the lab's model answer does it."""

    def __init__(self, primary, replica, cookie, **kwargs):
        super().__init__(primary, replica, **kwargs)
        self.cookie, self.wrote = cookie, False

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


@pytest.fixture(scope="module")
def profiles(pair):
    primary, replica = scaling.profile_engines(pair, "t_ch03_profiles")
    assert scaling.prepare_profiles(primary, replica, users=20) == 20
    yield primary, replica
    scaling.drop_profiles(primary)
    primary.dispose()
    replica.dispose()


def test_running_pair_and_replayed_lsn(pair, profiles):
    running = replicas.running_replica_pair()
    assert running is not None and running.replica_url == pair.replica_url
    assert running.apply_delay_ms == replicas.DEFAULT_APPLY_DELAY_MS
    primary, replica = profiles
    with primary.begin() as conn:
        conn.execute(sa.update(User).where(User.id == 1).values(first_name="Lsn"))
    lsn = scaling.current_lsn(primary)
    assert not scaling.replica_has_replayed(replica, lsn)  # the apply delay holds it back
    scaling.wait_for_replay(replica, lsn)
    assert scaling.replica_has_replayed(replica, lsn)


@pytest.mark.parametrize("make_session, stale, share", [
    (lambda p, r, cookie: scaling.RoutingSession(p, r), "some", 1.0),
    (lambda p, r, cookie: scaling.PrimaryOnlySession(p, r), "none", 0.0),
    (LsnSession, "none", "most"),
], ids=["replica", "primary", "lsn"])
def test_read_your_writes_trial(profiles, make_session, stale, share):
    primary, replica = profiles
    trial = scaling.read_your_writes_trial(make_session, primary, replica, seed=7)
    assert trial["writes"] == 3 and trial["checked"] >= 6
    assert trial["reads"] == trial["replica_reads"] + trial["primary_reads"]
    assert (trial["stale"] > 0) if stale == "some" else trial["stale"] == 0
    if share == "most":
        assert 0.5 < trial["replica_share"] < 1.0
    else:
        assert trial["replica_share"] == share


def test_range_router_and_the_naive_average(shards):
    tiny, _ = shards
    route = scaling.range_router([100, 180, None])
    assert [route(i) for i in (1, 100, 101, 180, 181, 10**6)] == [
        "shard_0", "shard_0", "shard_1", "shard_1", "shard_2", "shard_2"]
    made = scaling.make_shards(tiny, 3, router=route, prefix="t_ch03_range")
    try:
        exact = scaling.average_total_by_status(tiny)
        naive = scaling.average_total_by_status_naive(made)
        assert set(naive) == set(exact)
        assert any(abs(naive[s] - exact[s]) > 0.01 for s in exact)
        sums, counts = {}, {}
        for engine in made.values():
            with engine.connect() as conn:
                for status, total, n in conn.execute(
                        select(Order.status, sa.func.sum(Order.total), sa.func.count())
                        .group_by(Order.status)):
                    sums[status] = sums.get(status, 0) + float(total)
                    counts[status] = counts.get(status, 0) + n
        assert all(abs(sums[s] / counts[s] - exact[s]) < 1e-6 for s in exact)
    finally:
        scaling.drop_shards(made, prefix="t_ch03_range")


@pytest.mark.parametrize("size, overflow, expected", [
    (2, 2, {"churn": 0, "steady_connects": 2, "burst_timeouts": 0, "kept_open": 2}),
    (1, 3, {"churn": 3, "steady_connects": 4, "burst_timeouts": 0, "kept_open": 1}),
    (4, 0, {"churn": 0, "steady_connects": 2, "burst_timeouts": 0, "kept_open": 4}),
    (1, 1, {"churn": 3, "steady_connects": 4, "burst_timeouts": 2, "kept_open": 1}),
])
def test_pool_trial_counts(make_engine, size, overflow, expected):
    run = scaling.pool_trial(make_engine, threads=4, steady=2, pool_size=size,
                             max_overflow=overflow, burst_hold_s=0.3)
    assert {k: run[k] for k in expected} == expected
    assert run["steady_timeouts"] == 0 and run["most_open"] == size + overflow
