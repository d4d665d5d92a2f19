"""Chapter 03 helpers: read replicas, sharding and connection pooling, measured with counts.

Three parts, one per section of the lesson:

* **Replication**: :func:`start_replica_pair` starts a real PostgreSQL primary and one real
  streaming replica (``pg_basebackup -R``), from the binaries the ``pgserver`` package ships,
  under ``data/replication/`` (never the course's main server under ``data/postgres``). The
  replica replays with a ``recovery_min_apply_delay``, so replication lag is visible and
  reproducible. :class:`RoutingSession` sends writes to the primary and reads to the replica
  (the lesson writes the same class in a cell; the lab and the graders use this one);
  :class:`StickyRoutingSession` is the lab's time-window fix; :func:`read_after_write` runs the
  lesson's read-your-writes cases and counts statements per engine; :func:`wait_for_replay`
  and :func:`current_lsn` are the LSN tools.
* **Sharding**: the lesson writes its routers (modulo, a hash ring) in cells;
  :func:`resharding_table` and :func:`keys_moved` count the keys they move. :func:`modulo_shard`,
  :class:`HashRing` and :func:`stable_hash` are the package's own (default router, tests).
  SQLite shards made with :func:`make_shards`; :func:`top_customers` is one shard's part of the
  lesson's scatter-gather; :func:`user_ids_in` reads the shard keys of a query for the
  ``ShardedSession`` choosers the lesson writes.
* **Pooling**: :class:`PoolEvents` counts what a pool does (connects, checkouts, closes,
  timeouts); :func:`checkouts_table`, :func:`overflow_steps`, :func:`exhaust_pool`,
  :func:`pool_throughput`, :func:`pre_ping_demo`, :func:`recycle_demo` and :func:`fork_demo` are
  the harness of the experiments: each takes engines made in the notebook's cell, with the pool
  settings written there.
* **Lab**: :func:`read_your_writes_trial` (stale reads and the replica's share of reads for a
  browsing-and-editing sequence, one session per request, a cookie per user) with
  :func:`replica_has_replayed`, :func:`profile_engines` and :class:`PrimaryOnlySession`;
  :func:`range_router` and :func:`average_total_by_status_naive` (the average of shard
  averages); :func:`pool_trial` (churn, timeouts and idle connections of one pool setting).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
import uuid
import warnings
from bisect import bisect_right
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter

from .. import db
from ..load import run_load
from ..models import Base, Order, User
from ..replicas import ReplicaPair
from ..statements import count_queries
from ..timing import Benchmark, time_call

__all__ = [
    "PROFILE_SCHEMA",
    "SHARD_NAMESPACE",
    "average_total_by_status",
    "average_total_by_status_naive",
    "checkouts_table",
    "current_lsn",
    "drop_profiles",
    "drop_shards",
    "exhaust_pool",
    "fork_demo",
    "HashRing",
    "keys_moved",
    "make_shards",
    "modulo_shard",
    "overflow_steps",
    "pool_throughput",
    "pool_trial",
    "PoolEvents",
    "postgres_engine",
    "pre_ping_demo",
    "prepare_profiles",
    "prepare_replicated_users",
    "PrimaryOnlySession",
    "profile_engines",
    "range_router",
    "read_after_write",
    "read_your_writes_trial",
    "recycle_demo",
    "replay_lsn",
    "replica_has_replayed",
    "resharding_table",
    "RoutingSession",
    "shard_names",
    "shard_sizes",
    "stable_hash",
    "StickyRoutingSession",
    "terminate_backend",
    "top_customers",
    "user_ids_in",
    "visibility_lag",
    "wait_for_replay",
]

# pgserver asks platformdirs for a runtime folder, which warns on machines without a login
# session (containers, CI); its fallback is fine (as in services.py).
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

# ---------------------------------------------------------------------------------------------
# 1b. Routing reads and writes, replication lag, read-your-writes
# ---------------------------------------------------------------------------------------------

_WRITES = (sa.Insert, sa.Update, sa.Delete)


class RoutingSession(Session):
    """A Session that sends writes to ``primary`` and reads to ``replica``.

    SQLAlchemy asks :meth:`get_bind` which engine runs each statement. During a flush (the ORM
    writing pending changes) and for Core ``insert()/update()/delete()`` the answer is the
    primary; every other statement (SELECTs, ``session.get``, lazy loads) goes to the replica.
    The Rails counterpart is ``connects_to database: {writing: :primary, reading: :replica}``;
    ``session.execute(stmt, bind_arguments={"bind": session.primary})`` forces an engine (Rails:
    ``connected_to(role: :writing)``).
    """

    def __init__(self, primary: Engine, replica: Engine, **kwargs):
        super().__init__(**kwargs)
        self.primary, self.replica = primary, replica

    def is_write(self, clause) -> bool:
        return self._flushing or isinstance(clause, _WRITES)

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if kwargs.get("bind") is not None:  # execute(..., bind_arguments={"bind": engine})
            return kwargs["bind"]
        return self.primary if self.is_write(clause) else self.replica


class StickyRoutingSession(RoutingSession):
    """A :class:`RoutingSession` that reads from the primary for ``stick_s`` after a write.

    The simplest read-your-writes fix (Rails' ``DatabaseSelector`` does it per request with a
    2 s delay): a session that has just written keeps reading where the write is. Reads from
    sessions that wrote nothing still go to the replica.
    """

    def __init__(self, primary: Engine, replica: Engine, stick_s: float = 1.0, **kwargs):
        super().__init__(primary, replica, **kwargs)
        self.stick_s = stick_s
        self.last_write_at: float | None = None

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if kwargs.get("bind") is not None:
            return kwargs["bind"]
        if self.is_write(clause):
            self.last_write_at = time.monotonic()
            return self.primary
        if self.last_write_at is not None and time.monotonic() - self.last_write_at < self.stick_s:
            return self.primary
        return self.replica


def current_lsn(primary: Engine | sa.Connection) -> str:
    """The primary's WAL position now: the end of the last record written, e.g. ``'0/3003748'``.

    ``pg_current_wal_insert_lsn()`` rather than ``pg_current_wal_lsn()``: the latter is how far
    WAL has been written out, which can be a page boundary past the last record. A replica
    replays records, so it reaches the end of the last record but may not reach that boundary
    until more WAL arrives, and a read-your-writes wait on it could stall on an idle primary.
    """
    if isinstance(primary, Engine):
        with primary.connect() as conn:
            return current_lsn(conn)
    return primary.exec_driver_sql("SELECT pg_current_wal_insert_lsn()::text").scalar_one()


def replay_lsn(replica: Engine | sa.Connection) -> str:
    """How far the replica has replayed (``pg_last_wal_replay_lsn()``)."""
    if isinstance(replica, Engine):
        with replica.connect() as conn:
            return replay_lsn(conn)
    return replica.exec_driver_sql("SELECT pg_last_wal_replay_lsn()::text").scalar_one()


def wait_for_replay(replica: Engine, lsn: str, timeout_s: float = 5.0,
                    poll_s: float = 0.005) -> float:
    """Wait until the replica has replayed the WAL up to ``lsn``; return the seconds waited.

    Polls ``pg_last_wal_replay_lsn() >= lsn`` on a connection of its own (a separate engine,
    so the polls are not counted as the replica's queries). Raises ``TimeoutError`` after
    ``timeout_s``: the caller then reads from the primary instead.
    """
    # AUTOCOMMIT: each poll is its own transaction. One long transaction would keep a snapshot
    # open on the replica, and replay can stall behind it (a recovery conflict) while we wait.
    probe = sa.create_engine(replica.url, poolclass=sa.pool.NullPool,
                             isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    try:
        with probe.connect() as conn:
            while True:
                done = conn.exec_driver_sql(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).scalar()
                if done:
                    return time.perf_counter() - started
                if time.perf_counter() - started > timeout_s:
                    raise TimeoutError(f"The replica did not replay {lsn} in {timeout_s:g} s.")
                time.sleep(poll_s)
    finally:
        probe.dispose()


def prepare_replicated_users(primary: Engine, replica: Engine, users: int = 50) -> int:
    """(Re)create the ``users`` table on the primary with ``users`` rows; wait for the replica.

    The table is the shop's ``User`` model (schema only, rows made up here). Returns the
    number of rows the replica sees once it has replayed the load.
    """


    table = User.__table__
    with primary.begin() as conn:
        table.drop(conn, checkfirst=True)
        table.create(conn)
        conn.execute(table.insert(), [
            {"id": i, "email": f"user{i}@example.com", "first_name": f"First{i}",
             "last_name": f"Last{i}", "active": True, "premium": i % 10 == 0,
             "created_at": datetime(2025, 1, 1)} for i in range(1, users + 1)])
    wait_for_replay(replica, current_lsn(primary), timeout_s=30)
    with replica.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def read_after_write(cases: Benchmark, primary: Engine, replica: Engine,
                     user_id: int) -> pd.DataFrame:
    """Run each case of ``cases`` once: it writes a new email for ``user_id`` and reads it back.

    A case is ``fn(user_id, email) -> the email it read``, registered on a
    :class:`~perfcourse.timing.Benchmark` (its docstring is its label); each gets an email no
    earlier run wrote. One row per case: ``case, primary_queries, replica_queries`` (statements
    counted on each engine), ``fresh`` (it read what it wrote) and ``took_s``.
    """
    rows = []
    for case in cases.cases:
        email = f"case.{uuid.uuid4().hex[:12]}@example.com"
        with count_queries(primary) as on_primary, count_queries(replica) as on_replica:
            started = time.perf_counter()
            seen = case.fn(user_id=user_id, email=email)
            took = time.perf_counter() - started
        rows.append({"case": case.label, "primary_queries": on_primary.count,
                     "replica_queries": on_replica.count, "fresh": seen == email,
                     "took_s": took})
    return pd.DataFrame(rows)


def visibility_lag(primary: Engine, replica: Engine, user_id: int = 1, repeat: int = 3,
                   poll_s: float = 0.002) -> list[float]:
    """Seconds from a committed write on the primary until a reader of the replica sees it.

    Writes a new value ``repeat`` times and polls the replica (a connection of its own) until
    the value shows; returns the seconds each took.
    """

    table = User.__table__
    probe = sa.create_engine(replica.url, poolclass=sa.pool.NullPool)
    lags = []
    try:
        with probe.connect() as reader:
            for i in range(repeat):
                value = f"lag{i}-{time.monotonic_ns()}@example.com"
                with primary.begin() as conn:
                    conn.execute(table.update().where(table.c.id == user_id).values(email=value))
                started = time.perf_counter()
                while reader.execute(sa.select(table.c.email).where(table.c.id == user_id)
                                     ).scalar_one() != value:
                    reader.rollback()
                    if time.perf_counter() - started > 10:
                        raise TimeoutError("The replica did not show the write within 10 s.")
                    time.sleep(poll_s)
                lags.append(time.perf_counter() - started)
                reader.rollback()
    finally:
        probe.dispose()
    return lags


# ---------------------------------------------------------------------------------------------
# 2. Sharding
# ---------------------------------------------------------------------------------------------


def stable_hash(key: Hashable) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash()`` of a str is not)."""
    return int.from_bytes(hashlib.md5(str(key).encode()).digest()[:8], "big")


def modulo_shard(key: int, shards: Sequence[str]) -> str:
    """The guide's scheme: shard number ``user_id % len(shards)``."""
    return shards[int(key) % len(shards)]


class HashRing:
    """Consistent hashing: shards own arcs of a ring of 2**64 points, keys go clockwise.

    Each shard is placed at ``vnodes`` points (virtual nodes) so the arcs, and the keys, are
    shared evenly. Adding a shard takes over only the arcs just before its points: about
    1/(n+1) of the keys move, all of them to the new shard (modulo moves about n/(n+1)).
    """

    def __init__(self, shards: Iterable[str], vnodes: int = 100):
        self.shards = list(shards)
        self.vnodes = vnodes
        points = sorted((stable_hash(f"{shard}#{v}"), shard)
                        for shard in self.shards for v in range(vnodes))
        self._points = [p for p, _ in points]
        self._owners = [s for _, s in points]

    def shard_for(self, key: Hashable) -> str:
        i = bisect_right(self._points, stable_hash(key))
        return self._owners[i % len(self._owners)]

    def with_shard(self, shard: str) -> HashRing:
        """A new ring with one more shard."""
        return HashRing([*self.shards, shard], self.vnodes)

    def __repr__(self) -> str:
        return f"HashRing({self.shards}, vnodes={self.vnodes})"


def keys_moved(before: Callable[[Hashable], str], after: Callable[[Hashable], str],
               keys: Iterable[Hashable]) -> dict:
    """How many ``keys`` change shard between two routers, and where they go.

    Returns ``keys, moved, to_new_shard`` (moved keys whose new shard did not exist before).
    """
    keys = list(keys)
    old = {before(k) for k in keys}
    moved = to_new = 0
    for key in keys:
        a, b = before(key), after(key)
        if a != b:
            moved += 1
            to_new += b not in old
    return {"keys": len(keys), "moved": moved, "to_new_shard": to_new}


def shard_names(n: int) -> list[str]:
    """``["shard_0", ..., "shard_<n-1>"]``."""
    return [f"shard_{i}" for i in range(n)]


def resharding_table(schemes: Benchmark, keys: Iterable[Hashable], n_from: int = 4,
                     n_to: int = 5) -> pd.DataFrame:
    """Keys moved when going from ``n_from`` to ``n_to`` shards, one row per scheme.

    A scheme is a case of ``schemes`` (a :class:`~perfcourse.timing.Benchmark`, docstring as
    label): ``fn(shards) -> router``, where ``router(key)`` returns one of the names
    ``shards``. Columns: ``case, keys, moved, to_new_shard, moved_pct, ideal`` (the keys the
    new shards must receive anyway) and ``route_s`` (median time to route every key once).
    """
    keys = list(keys)
    old, new = shard_names(n_from), shard_names(n_to)
    rows = []
    for case in schemes.cases:
        before, after = case.fn(shards=old), case.fn(shards=new)
        timing = time_call(lambda after=after: [after(k) for k in keys], repeat=3, warmup=0)
        rows.append({"case": case.label, **keys_moved(before, after, keys),
                     "route_s": timing.median_s})
    df = pd.DataFrame(rows)
    df["moved_pct"] = (100 * df.moved / df["keys"]).round(0).astype(int)
    df["ideal"] = round(len(keys) * (n_to - n_from) / n_to)
    return df[["case", "keys", "moved", "to_new_shard", "moved_pct", "ideal", "route_s"]]


def shard_sizes(router: Callable[[Hashable], str], keys: Iterable[Hashable]) -> dict[str, int]:
    """Keys per shard, by shard name."""
    sizes: dict[str, int] = {}
    for key in keys:
        shard = router(key)
        sizes[shard] = sizes.get(shard, 0) + 1
    return dict(sorted(sizes.items()))


SHARD_NAMESPACE = "ch03_shard"


def make_shards(source: Engine, n: int = 4, router: Callable[[int], str] | None = None,
                prefix: str = SHARD_NAMESPACE) -> dict[str, Engine]:
    """Copy users and their orders from ``source`` into ``n`` SQLite shard databases.

    The shard key is the user id: a user and all their orders live on one shard
    (``router(user_id)``, default ``modulo_shard``). Each shard is a separate database file
    ``data/<prefix>_<i>.sqlite`` with the shop schema; existing ones are replaced. Returns
    ``{shard name: engine}``; :func:`drop_shards` deletes them.
    """

    names = shard_names(n)
    router = router or (lambda key: modulo_shard(key, names))
    tables = (User.__table__, Order.__table__)
    # SQLite to SQLite: copy the stored values as they are, through the driver (a tenth of the
    # time the ORM's type processing takes); from another database, through SQLAlchemy's types.
    raw = source.dialect.name == "sqlite"
    with source.connect() as conn:
        rows = {table: (conn.exec_driver_sql(
                    f"SELECT {', '.join(c.name for c in table.columns)} FROM {table.name}").all()
                        if raw else [dict(r._mapping) for r in conn.execute(sa.select(table))])
                for table in tables}
    user_id = {User.__table__: list(User.__table__.columns).index(User.__table__.c.id),
               Order.__table__: list(Order.__table__.columns).index(Order.__table__.c.user_id)}
    shard_of = {row[user_id[User.__table__]] if raw else row["id"]: None
                for row in rows[User.__table__]}
    shard_of = {key: router(key) for key in shard_of}
    engines = {}
    for i, name in enumerate(names):
        db.drop_namespace("sqlite", f"{prefix}_{i}")
        engine = db.engine("sqlite", namespace=f"{prefix}_{i}")
        Base.metadata.create_all(engine, tables=list(tables))
        with engine.begin() as conn:
            for table in tables:
                key = user_id[table] if raw else ("id" if table is User.__table__ else "user_id")
                mine = [row for row in rows[table] if shard_of.get(row[key]) == name]
                if not mine:
                    continue
                if raw:
                    columns = ", ".join(c.name for c in table.columns)
                    marks = ", ".join("?" for _ in table.columns)
                    conn.exec_driver_sql(f"INSERT INTO {table.name} ({columns}) VALUES ({marks})",
                                         [tuple(row) for row in mine])
                else:
                    conn.execute(table.insert(), mine)
        engines[name] = engine
    return engines


def drop_shards(shards: dict[str, Engine], prefix: str = SHARD_NAMESPACE) -> None:
    for i, engine in enumerate(shards.values()):
        engine.dispose()
        db.drop_namespace("sqlite", f"{prefix}_{i}")


def _top_customers_statement(k: int):
    spent = sa.func.sum(Order.total).label("spent")
    return (sa.select(Order.user_id, spent).where(Order.status != "cancelled")
            .group_by(Order.user_id).order_by(spent.desc(), Order.user_id).limit(k))


def top_customers(engine: Engine, k: int = 10) -> list[tuple[int, object]]:
    """``(user_id, spent)`` of the ``k`` biggest spenders (cancelled orders excluded)."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(_top_customers_statement(k))]


def _equality_values(clause, column_names: set[str], parameters=None) -> list:
    """Values ``v`` of ``column = v`` (or ``column IN (...)``) comparisons inside ``clause``.

    A bound value given at execution time (``session.get`` passes the primary key that way) is
    read from ``parameters``.
    """

    values = []
    for element in visitors.iterate(clause):
        if not isinstance(element, BinaryExpression):
            continue
        left, right = element.left, element.right
        if isinstance(left, BindParameter):
            left, right = right, left
        if getattr(left, "name", None) not in column_names or not isinstance(right, BindParameter):
            continue
        value = right.effective_value
        if value is None and parameters and right.key in parameters:
            value = parameters[right.key]
        if value is None:
            continue
        if element.operator is operators.eq:
            values.append(value)
        elif element.operator is operators.in_op and isinstance(value, (list, tuple)):
            values.extend(value)
    return values


def user_ids_in(context) -> list:
    """The user ids a query names in its WHERE clause, for a ``ShardedSession`` execute_chooser.

    ``context`` is the ``ORMExecuteState`` SQLAlchemy passes to ``execute_chooser``. Counted:
    ``user_id = v`` and ``user_id IN (...)`` anywhere, and ``id = v`` / ``id IN (...)`` when the
    query selects only from ``users`` (there ``id`` is the user id). Bound values given at
    execution time (``session.get`` passes the primary key that way) are read too. An empty
    list means "no shard key named": the query must visit every shard.
    """
    statement = context.statement
    where = getattr(statement, "whereclause", None)
    if where is None:
        return []
    params = context.parameters if isinstance(context.parameters, dict) else None
    columns = {"user_id"} | ({"id"} if _selects_only(statement, User) else set())
    return _equality_values(where, columns, params)


def _selects_only(statement, model) -> bool:
    """Whether a statement's FROM is only ``model``'s table (so ``id`` is the user id)."""
    try:
        froms = statement.get_final_froms()
    except AttributeError:
        return False
    return len(froms) == 1 and froms[0] is model.__table__


# ---------------------------------------------------------------------------------------------
# 3. Connection pooling
# ---------------------------------------------------------------------------------------------


@dataclass
class PoolEvents:
    """Counts what an engine's pool does while active: a context manager.

    ``connects`` (new DBAPI connections), ``checkouts``, ``checkins``, ``closes`` (connections
    the pool closed, e.g. an overflow connection returned to a full pool), ``invalidations``
    (connections found broken and thrown away).
    """

    engine: Engine
    connects: int = 0
    checkouts: int = 0
    checkins: int = 0
    closes: int = 0
    invalidations: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _bump(self, name):
        def handler(*args, **kwargs):
            with self._lock:
                setattr(self, name, getattr(self, name) + 1)
        return handler

    def __post_init__(self):
        self._handlers = {"connect": self._bump("connects"), "checkout": self._bump("checkouts"),
                          "checkin": self._bump("checkins"), "close": self._bump("closes"),
                          "invalidate": self._bump("invalidations")}

    def __enter__(self):
        for event, handler in self._handlers.items():
            sa.event.listen(self.engine, event, handler)
        return self

    def __exit__(self, *exc_info):
        for event, handler in self._handlers.items():
            sa.event.remove(self.engine, event, handler)

    def as_dict(self) -> dict:
        return {"connects": self.connects, "checkouts": self.checkouts,
                "checkins": self.checkins, "closes": self.closes,
                "invalidations": self.invalidations}


def postgres_engine(**engine_kwargs) -> Engine:
    """An engine on the course's PostgreSQL (``DATABASE_URL`` or embedded), no pre-ping unless
    asked: the pool experiments set every pool option themselves."""

    engine_kwargs.setdefault("pool_pre_ping", False)
    return db.engine("postgres", **engine_kwargs)


def checkouts_table(engines: dict[str, Engine], checkouts: int = 20) -> pd.DataFrame:
    """``checkouts`` sequential checkouts on each engine (``{label: engine}``), counted.

    One row per engine: ``pool`` (the label) and the :class:`PoolEvents` counts. The engines
    are disposed afterwards.
    """
    rows = []
    for label, engine in engines.items():
        try:
            with PoolEvents(engine) as events:
                for _ in range(checkouts):
                    with engine.connect() as conn:
                        conn.exec_driver_sql("SELECT 1")
            rows.append({"pool": label, **events.as_dict()})
        finally:
            engine.dispose()
    return pd.DataFrame(rows)


def overflow_steps(engine: Engine) -> pd.DataFrame:
    """Check out as many connections as ``engine``'s pool allows, return them, do it again.

    ``pool_size + max_overflow`` of the engine's ``QueuePool``. One row per step with the
    pool's running counts: an overflow connection is closed when it comes back to a full
    pool, and opened anew the next time it is needed. The engine is disposed afterwards.
    """
    most = engine.pool.size() + engine.pool._max_overflow
    rows = []
    try:
        with PoolEvents(engine) as events:
            for round_ in (1, 2):
                held = [engine.connect() for _ in range(most)]
                rows.append({"step": f"round {round_}: {len(held)} checked out",
                             **events.as_dict(), "in_pool": engine.pool.checkedin()})
                for conn in held:
                    conn.close()
                rows.append({"step": f"round {round_}: all returned",
                             **events.as_dict(), "in_pool": engine.pool.checkedin()})
    finally:
        engine.dispose()
    return pd.DataFrame(rows)


def exhaust_pool(engine: Engine, workers: int, hold_s: float = 0.5) -> dict:
    """``workers`` threads each check out a connection at once and hold it ``hold_s``.

    With ``hold_s`` well above the engine's ``pool_timeout``, exactly
    ``pool_size + max_overflow`` threads get a connection and the others wait ``pool_timeout``
    and fail with ``sqlalchemy.exc.TimeoutError``: counted, not raised. Returns ``workers,
    served, timeouts, connects, waited_s`` (the longest wait of a thread that timed out).
    """
    lock = threading.Lock()
    result = {"served": 0, "timeouts": 0, "waited_s": 0.0}
    start = threading.Barrier(workers)

    def worker():
        start.wait()
        began = time.perf_counter()
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
                with lock:
                    result["served"] += 1
                time.sleep(hold_s)
        except sa.exc.TimeoutError:
            with lock:
                result["timeouts"] += 1
                result["waited_s"] = max(result["waited_s"], time.perf_counter() - began)

    with PoolEvents(engine) as events:
        threads = [threading.Thread(target=worker) for _ in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"workers": workers, "served": result["served"], "timeouts": result["timeouts"],
            "connects": events.connects, "waited_s": result["waited_s"]}


def pool_throughput(engines: Iterable[Engine], workers: int = 8, requests: int = 80,
                    service_s: float = 0.01) -> pd.DataFrame:
    """Throughput of ``workers`` threads whose requests each hold a connection ``service_s``.

    For each engine the pool is filled first (``pool_size`` connects), then ``requests``
    requests run through :func:`perfcourse.load.run_load`; each runs
    ``SELECT pg_sleep(service_s)`` (the server works, the thread waits). One row per engine:
    ``pool_size, workers, requests, connects, checkouts, elapsed_s, wait_s`` (mean time a
    request waited for a connection), ``latency_s`` (mean), ``throughput`` (requests/s). The
    engines are disposed afterwards.
    """

    rows = []
    for engine in engines:
        size = engine.pool.size()
        try:
            held = [engine.connect() for _ in range(size)]  # fill the pool up front
            for conn in held:
                conn.close()
            waits = []
            lock = threading.Lock()

            def work(_i, engine=engine, lock=lock, waits=waits):
                began = time.perf_counter()
                with engine.connect() as conn:
                    got = time.perf_counter()
                    conn.exec_driver_sql("SELECT pg_sleep(%s)", (service_s,))
                with lock:
                    waits.append(got - began)

            with PoolEvents(engine) as events:
                run = run_load(work, workers=workers, requests=requests)
            rows.append({"pool_size": size, "workers": workers, "requests": requests,
                         "connects": size + events.connects, "checkouts": events.checkouts,
                         "elapsed_s": run.elapsed_s, "wait_s": sum(waits) / len(waits),
                         "latency_s": run.mean_latency_s,
                         "throughput": run.throughput_per_s})
        finally:
            engine.dispose()
    return pd.DataFrame(rows)


def _backend_pid(conn) -> int:
    return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()


def terminate_backend(pid: int) -> bool:
    """Kill one server connection the way a failover, a restart or an idle timeout would."""
    killer = postgres_engine(poolclass=sa.pool.NullPool)
    try:
        with killer.connect() as conn:
            done = conn.exec_driver_sql("SELECT pg_terminate_backend(%s)", (pid,)).scalar()
            conn.commit()
    finally:
        killer.dispose()
    # the backend exits asynchronously: wait until it is gone
    probe = postgres_engine(poolclass=sa.pool.NullPool)
    try:
        with probe.connect() as conn:
            for _ in range(200):
                alive = conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).scalar()
                conn.rollback()
                if not alive:
                    break
                time.sleep(0.01)
    finally:
        probe.dispose()
    return bool(done)


def pre_ping_demo(engine: Engine, attempts: int = 3) -> dict:
    """The engine's pooled connection is killed on the server; then ``attempts`` requests run.

    Without ``pool_pre_ping`` the first request gets the dead connection and fails
    (``OperationalError``, counted); the pool then throws every pooled connection away and the
    next request reconnects. With it, the checkout pings first, sees the dead connection,
    reconnects, and no request fails. Returns ``pre_ping, errors, served, connects``. The
    engine is disposed afterwards.
    """
    try:
        with PoolEvents(engine) as events:
            with engine.connect() as conn:
                pid = _backend_pid(conn)
            terminate_backend(pid)
            errors = served = 0
            for _ in range(attempts):
                try:
                    with engine.connect() as conn:
                        conn.exec_driver_sql("SELECT 1")
                    served += 1
                except sa.exc.OperationalError:
                    errors += 1
        return {"pre_ping": engine.pool._pre_ping, "errors": errors, "served": served,
                "connects": events.connects}
    finally:
        engine.dispose()


def recycle_demo(engine: Engine, idle_s: float, checkouts: int = 3) -> dict:
    """``checkouts`` checkouts ``idle_s`` apart on ``engine`` (made with some ``pool_recycle``).

    A connection older than ``pool_recycle`` is closed at checkout and replaced (recycled):
    with ``idle_s > pool_recycle`` every checkout after the first opens a new connection.
    Returns ``pool_recycle_s, idle_s, checkouts, connects, backends`` (distinct server pids).
    The engine is disposed afterwards.
    """
    pids = set()
    try:
        with PoolEvents(engine) as events:
            for i in range(checkouts):
                if i:
                    time.sleep(idle_s)
                with engine.connect() as conn:
                    pids.add(_backend_pid(conn))
        return {"pool_recycle_s": engine.pool._recycle, "idle_s": idle_s,
                "checkouts": checkouts, "connects": events.connects, "backends": len(pids)}
    finally:
        engine.dispose()


def fork_demo(engine: Engine, in_child: Callable[[Engine], object] | None = None) -> dict:
    """Fork this process after its pool holds a connection; the child runs one query.

    ``in_child(engine)``, when given, runs in the child first (the lesson passes the fix,
    ``engine.dispose(close=False)``). Without it the child's pool hands out the parent's
    connection: two processes on one socket. Returns ``after_fork`` (the function's docstring,
    or ``"nothing"``), ``parent_backend, child_backend, same_connection, parent_still_works``.
    POSIX only.
    """
    label = ((in_child.__doc__ or in_child.__name__).strip().splitlines()[0]
             if in_child is not None else "nothing")
    with engine.connect() as conn:
        parent_backend = _backend_pid(conn)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no output, no cleanup handlers, exit at once
        code = 1
        try:
            os.close(read_end)
            if in_child is not None:
                in_child(engine)
            with engine.connect() as conn:
                child_backend = _backend_pid(conn)
            os.write(write_end, str(child_backend).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        text = reader.read()
    os.waitpid(pid, 0)
    child_backend = int(text) if text else -1
    with engine.connect() as conn:
        parent_after = _backend_pid(conn)
    return {"after_fork": label, "parent_backend": parent_backend,
            "child_backend": child_backend, "same_connection": child_backend == parent_backend,
            "parent_still_works": parent_after == parent_backend}


# ---------------------------------------------------------------------------------------------
# 4. Lab helpers: read-your-writes trials, a range-sharded dashboard, pool trials
# ---------------------------------------------------------------------------------------------

#: Schema of the lab's profile table on the replica pair (the lesson uses ``public``).
PROFILE_SCHEMA = "ch03_lab"


def replica_has_replayed(replica: Engine | sa.Connection, lsn: str) -> bool:
    """Whether the replica has replayed the WAL up to ``lsn`` (one query, no waiting).

    ``lsn`` is a position of the primary, e.g. from :func:`current_lsn` right after a commit:
    once the replica's ``pg_last_wal_replay_lsn()`` has passed it, a read there sees the commit.
    """
    if isinstance(replica, Engine):
        with replica.connect() as conn:
            return replica_has_replayed(conn, lsn)
    return bool(replica.exec_driver_sql(
        "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).scalar())


def profile_engines(pair: ReplicaPair, schema: str = PROFILE_SCHEMA,
                    **engine_kwargs) -> tuple[Engine, Engine]:
    """``(primary, replica)`` engines of ``pair`` whose tables live in ``schema``.

    The schema is the first of the ``search_path``, so the shop's models (``User``...) map to
    its tables on both servers and nothing clashes with the lesson's ``public.users``.
    """
    options = {"connect_args": {"options": f"-csearch_path={schema}"}}
    return (sa.create_engine(pair.primary_url, **options, **engine_kwargs),
            sa.create_engine(pair.replica_url, **options, **engine_kwargs))


def prepare_profiles(primary: Engine, replica: Engine, users: int = 30) -> int:
    """(Re)create ``users`` user profiles in the engines' schema; wait until the replica has them.

    The schema is the one of :func:`profile_engines` (created when missing). Returns the
    number of rows the replica sees.
    """
    with primary.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{_first_schema(conn)}"')
    return prepare_replicated_users(primary, replica, users=users)


def drop_profiles(primary: Engine) -> None:
    """Drop the engine's schema (the first of its ``search_path``) and everything in it.

    Gives up after 10 s (``lock_timeout``) when a leaked transaction still holds the table.
    """
    with primary.begin() as conn:
        conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{_first_schema(conn)}" CASCADE')


def _first_schema(conn: sa.Connection) -> str:
    return conn.exec_driver_sql("SHOW search_path").scalar().split(",")[0].strip().strip('"')


class PrimaryOnlySession(RoutingSession):
    """Every statement on the primary: never stale, and the replica does nothing."""

    def get_bind(self, mapper=None, clause=None, **kwargs):
        if kwargs.get("bind") is not None:
            return kwargs["bind"]
        return self.primary


def _profile_reads(counter) -> int:
    return sum(1 for s in counter.statements if s.kind == "SELECT" and "users" in s.sql)


def read_your_writes_trial(make_session: Callable[..., Session], primary: Engine,
                           replica: Engine, seed: int = 0, rounds: int = 1) -> dict:
    """Browse and edit profiles like a web app's users, through sessions ``make_session`` makes.

    Every request (one page) gets a new session, ``make_session(primary, replica, cookie)``:
    ``cookie`` is a dict of the requesting user's own, kept between their requests (like a
    signed session cookie), empty at first. Each round, from ``random.Random(seed)``:

    1. 12 page views: a user opens their own profile, someone else's, or the premium list;
    2. 3 users edit their email (``session.get``, change, ``commit``) and read it back in the same
       request, then are redirected to their profile (a new request), then one of them opens
       their profile once more while the change may not be on the replica yet;
    3. the trial waits until the replica has replayed the primary's WAL (its own probe);
    4. 9 page views, each editor's own profile among them.

    A read of a user's *own* profile after they edited it must show their last email: otherwise
    it is a **stale read**. Reads of other people's profiles may lag. Statements are counted on
    each engine (``SELECT`` statements on ``users``; probes like ``pg_last_wal_replay_lsn()`` do
    not count as reads). Returns ``reads, checked`` (own-profile reads after an edit),
    ``stale, replica_reads, primary_reads, replica_share, writes``.
    """


    rng = random.Random(seed)
    with primary.connect() as conn:
        ids = [row[0] for row in conn.execute(sa.select(User.id).order_by(User.id))]
    cookies: dict[int, dict] = {i: {} for i in ids}
    latest: dict[int, str] = {}
    tally = {"checked": 0, "stale": 0, "writes": 0}

    def own_check(user_id: int, seen: str) -> None:
        if user_id in latest:
            tally["checked"] += 1
            tally["stale"] += seen != latest[user_id]

    def view(viewer: int, target: int) -> None:
        with make_session(primary, replica, cookies[viewer]) as session:
            seen = session.scalars(sa.select(User.email).where(User.id == target)).one()
        if viewer == target:
            own_check(viewer, seen)

    def premium_list(viewer: int) -> None:
        with make_session(primary, replica, cookies[viewer]) as session:
            session.scalars(sa.select(User.id).where(User.premium.is_(True))).all()

    def browse(times: int, must_include: Sequence[int] = ()) -> None:
        owners = list(must_include)
        for _ in range(times - len(owners)):
            owners.append(-1)
        rng.shuffle(owners)
        for owner in owners:
            if owner != -1:
                view(owner, owner)
                continue
            viewer, roll = rng.choice(ids), rng.random()
            if roll < 0.4:
                view(viewer, viewer)
            elif roll < 0.85:
                view(viewer, rng.choice(ids))
            else:
                premium_list(viewer)

    def edit(user_id: int, tag: str) -> None:
        # unique in every trial: a value an earlier trial wrote would look fresh on the replica
        email = f"{tag}.{user_id}.{uuid.uuid4().hex[:12]}@example.com"
        with make_session(primary, replica, cookies[user_id]) as session:
            user = session.get(User, user_id)
            user.email = email
            session.commit()
            tally["writes"] += 1
            latest[user_id] = email
            own_check(user_id, session.scalars(
                sa.select(User.email).where(User.id == user_id)).one())

    with count_queries(primary) as on_primary, count_queries(replica) as on_replica:
        for round_ in range(rounds):
            browse(12)
            editors = rng.sample(ids, 3)
            for user_id in editors:
                edit(user_id, f"r{round_}")
                view(user_id, user_id)  # the redirect after the form
            again = rng.choice(editors)
            view(again, again)
            wait_for_replay(replica, current_lsn(primary), timeout_s=30)
            browse(9, must_include=editors)
    replica_reads, primary_reads = _profile_reads(on_replica), _profile_reads(on_primary)
    reads = replica_reads + primary_reads
    return {"reads": reads, "checked": tally["checked"], "stale": tally["stale"],
            "replica_reads": replica_reads, "primary_reads": primary_reads,
            "replica_share": replica_reads / reads if reads else 0.0, "writes": tally["writes"]}


def range_router(upper_bounds: Sequence[int]) -> Callable[[int], str]:
    """Range sharding: ``shard_i`` holds the ids up to ``upper_bounds[i]`` (the last: the rest).

    New users get the highest ids, so the newest shard fills up last: a common way to add
    capacity without moving anyone, and a source of very unequal shards.
    """
    names = shard_names(len(upper_bounds))

    def route(key: int) -> str:
        for name, bound in zip(names, upper_bounds):
            if bound is None or int(key) <= bound:
                return name
        return names[-1]

    return route


def _average_by_status_statement():
    return (sa.select(Order.status, sa.func.avg(Order.total).label("average"),
                      sa.func.count().label("orders"))
            .group_by(Order.status).order_by(Order.status))


def average_total_by_status(engine: Engine) -> dict[str, float]:
    """``{status: average order total}`` on one database (statuses with orders only)."""
    with engine.connect() as conn:
        return {status: float(average) for status, average, _ in
                conn.execute(_average_by_status_statement())}


def average_total_by_status_naive(shards: dict[str, Engine]) -> dict[str, float]:
    """The dashboard's bug: the average of each shard's averages (one query per shard).

    Every shard weighs the same whatever its number of orders, so a small shard with unusual
    orders moves the result as much as a big one. Kept to be measured, not copied.
    """
    per_status: dict[str, list[float]] = {}
    for engine in shards.values():
        for status, average in average_total_by_status(engine).items():
            per_status.setdefault(status, []).append(average)
    return {status: sum(values) / len(values) for status, values in sorted(per_status.items())}


def pool_trial(make_engine: Callable[..., Engine], threads: int, steady: int, pool_size: int,
               max_overflow: int, rounds: int = 3, hold_s: float = 0.02,
               burst_hold_s: float = 0.5, pool_timeout: float = 0.1) -> dict:
    """One process's pool under a steady load and a burst, counted.

    * Steady: ``rounds`` rounds in which ``steady`` threads hold a connection at the same moment
      (``hold_s``), then all return it. A pool smaller than ``steady`` opens the missing
      connections as overflow and closes them on return, every round (churn).
    * Burst: all ``threads`` threads check out at once and hold ``burst_hold_s``, longer than
      ``pool_timeout``: a thread that finds the pool exhausted times out.

    Returns ``pool_size, max_overflow, steady_connects, churn`` (connections closed during the
    steady phase), ``steady_timeouts, burst_timeouts, kept_open`` (idle connections the pool
    holds afterwards) and ``most_open`` (``pool_size + max_overflow``, what this process may
    open on the server).
    """
    engine = make_engine(pool_size=pool_size, max_overflow=max_overflow,
                         pool_timeout=pool_timeout)
    lock = threading.Lock()
    timeouts = {"steady": 0, "burst": 0}

    def run(workers: int, hold: float, phase: str, together: threading.Barrier | None) -> None:
        start = threading.Barrier(workers)

        def worker():
            start.wait()
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                    if together is not None:
                        together.wait()  # every steady thread holds a connection now
                    time.sleep(hold)
            except sa.exc.TimeoutError:
                with lock:
                    timeouts[phase] += 1
                if together is not None:
                    together.wait()

        pool = [threading.Thread(target=worker) for _ in range(workers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()

    try:
        with PoolEvents(engine) as steady_events:
            for _ in range(rounds):
                run(steady, hold_s, "steady", threading.Barrier(steady))
        run(threads, burst_hold_s, "burst", None)
        kept_open = engine.pool.checkedin()
    finally:
        engine.dispose()
    return {"pool_size": pool_size, "max_overflow": max_overflow,
            "steady_connects": steady_events.connects, "churn": steady_events.closes,
            "steady_timeouts": timeouts["steady"], "burst_timeouts": timeouts["burst"],
            "kept_open": kept_open, "most_open": pool_size + max_overflow}
