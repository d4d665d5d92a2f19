"""Chapter 03 helpers: a real streaming replica, shards, consistent hashing, pool behaviour.

Assertions are on counts (which engine served a statement, keys moved, connections opened,
timeouts), never on time. Pool tests run on PostgreSQL embedded and configured; the replica pair
is always the embedded one (a configured server cannot be given a replica here).
"""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy import select

from perfcourse import db, scaling
from perfcourse.measure import count_queries
from perfcourse.models import Base, Order, User
from perfcourse.seed import seed_dataset

# ------------------------------------------------------------------------------------------
# Replication


@pytest.fixture(scope="module")
def pair():
    was_running = scaling.replica_pair_running()
    pair = scaling.start_replica_pair()
    yield pair
    if not was_running:
        scaling.stop_replica_pair()


@pytest.fixture(scope="module")
def pair_engines(pair):
    primary, replica = pair.engines()
    scaling.prepare_replicated_users(primary, replica, users=20)
    yield primary, replica
    primary.dispose()
    replica.dispose()


def test_start_is_idempotent_and_replica_is_read_only(pair, pair_engines):
    again = scaling.start_replica_pair()
    assert again.primary_url == pair.primary_url and again.replica_url == pair.replica_url
    assert scaling.replica_pair_running()
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


@pytest.mark.parametrize("strategy, read_from, fresh, on_primary, on_replica", [
    ("replica", "replica", False, 1, 2),
    ("sticky", "primary", True, 2, 1),
    ("wait for LSN", "replica", True, 2, 2),
    ("primary", "primary", True, 2, 1),
])
def test_read_after_write(pair_engines, strategy, read_from, fresh, on_primary, on_replica):
    primary, replica = pair_engines
    row = scaling.read_after_write(primary, replica, strategy, 3, f"{strategy[:4]}@x.test")
    assert (row["read_from"], row["fresh"]) == (read_from, fresh)
    assert (row["primary_queries"], row["replica_queries"]) == (on_primary, on_replica)


def test_lag_follows_the_apply_delay(pair, pair_engines):
    primary, replica = pair_engines
    assert min(scaling.visibility_lag(primary, replica, repeat=2)) >= 0.25
    scaling.set_apply_delay(pair, 0)
    try:
        with replica.connect() as conn:
            assert conn.exec_driver_sql("SHOW recovery_min_apply_delay").scalar() == "0"
    finally:
        scaling.set_apply_delay(pair, scaling.DEFAULT_APPLY_DELAY_MS)


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
    table = scaling.resharding_table(range(1, 10_001), 4, 5).set_index("scheme")
    modulo, ring = table.iloc[0], table.iloc[1]
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
    assert scaling.top_customers_sharded(made, 7) == scaling.top_customers(tiny, 7)
    assert [c.count for c in counters] == [1, 1, 1]
    for c in counters:
        c.stop()


def test_sharded_session_targets_one_shard_by_user(shards):
    _, made = shards
    names = list(made)
    counters = {n: count_queries(e).start() for n, e in made.items()}
    try:
        with scaling.sharded_session(made) as session:
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
    table = scaling.checkouts_table(make_engine, checkouts=5).set_index("pool")
    assert table.connects.tolist() == [1, 5]


def test_overflow_connection_is_closed_on_return(make_engine):
    steps = scaling.overflow_steps(make_engine, pool_size=2, max_overflow=1)
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
    without = scaling.pre_ping_demo(make_engine, pre_ping=False)
    with_ping = scaling.pre_ping_demo(make_engine, pre_ping=True)
    assert (without["errors"], without["served"]) == (1, 2)
    assert (with_ping["errors"], with_ping["served"]) == (0, 3)


def test_recycle_replaces_old_connections(make_engine):
    assert scaling.recycle_demo(make_engine, 0.05, 0.1, checkouts=2)["connects"] == 2
    assert scaling.recycle_demo(make_engine, 3600, 0.0, checkouts=2)["connects"] == 1


def test_pool_throughput_counts(make_engine):
    table = scaling.pool_throughput(make_engine, [1, 2], workers=2, requests=6, service_s=0.001)
    assert table.connects.tolist() == [1, 2]
    assert table.checkouts.tolist() == [6, 6]


def test_fork_dispose(make_engine):
    engine = make_engine()
    try:
        shared = scaling.fork_demo(engine, dispose=False)
        own = scaling.fork_demo(engine, dispose=True)
    finally:
        engine.dispose()
    assert shared["same_connection"] and not own["same_connection"]
    assert own["parent_still_works"]
