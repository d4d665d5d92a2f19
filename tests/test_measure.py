"""Tests of the measurement modules: units, timing, statements, explain and memory."""

from __future__ import annotations

import logging
import re
import time

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from perfcourse import memory
from perfcourse import timing as timing_module
from perfcourse.explain import explain
from perfcourse.memory import track_memory
from perfcourse.models import Base, Order, User
from perfcourse.statements import count_queries, slow_query_log
from perfcourse.timing import Benchmark, time_call
from perfcourse.units import format_bytes, format_duration, format_ratio, format_table

# The masks of the notebooks' nbval sanitize file: every displayed figure must match one.
DURATION = re.compile(r"^-?\d+(?:\.\d+)?\s?(?:ns|[µμu]s|ms|s|min|h)$")
RATIO = re.compile(r"^\d+(?:\.\d+)?x$")
SIZE = re.compile(r"^-?\d+(?:\.\d+)?\s?(?:B|KB|MB|GB|TB)$")


class FakeClock:
    """A perf_counter that only advances when told to: timing tests without wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing_module.time, "perf_counter", fake)
    return fake


# ------------------------------------------------------------------------------------ formatting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.00123, "1.23 ms"),
        (0.000850, "850 µs"),
        (2.1, "2.10 s"),
        (12.34, "12.3 s"),
        (5e-8, "50.0 ns"),
        (0.0, "0 s"),
        (0.0009997, "1.00 ms"),  # never "1000 µs"
        (150, "2.5 min"),
        (-0.002, "-2.00 ms"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert DURATION.match(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(512, "512 B"), (12_300, "12.3 KB"), (12_345_678, "12.3 MB"), (1.5e9, "1.5 GB"),
     (999_990, "1.0 MB"), (-2_000_000, "-2.0 MB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text
    assert SIZE.match(text)


def test_format_ratio():
    assert format_ratio(12.345) == "12.3x"
    assert format_ratio(1) == "1.0x"
    assert RATIO.match(format_ratio(1234.5))


def test_every_formatted_duration_matches_the_notebook_mask():
    for exponent in range(-9, 3):
        for mantissa in (1.0, 1.5, 9.99, 9.999, 99.99, 999.4, 999.99):
            text = format_duration(mantissa * 10.0**exponent)
            assert DURATION.match(text), text
            assert "e" not in text.split()[0]


# ------------------------------------------------------------------------------------ timing


def test_time_call_statistics_exclude_setup_and_warmup(clock):
    durations = iter([100.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # first run is the warm-up
    setups = []

    def setup(**kwargs):
        setups.append(kwargs)
        clock.advance(1000)  # untimed

    def work(n):
        clock.advance(next(durations))

    timing = time_call(work, repeat=5, warmup=1, setup=setup, n=3)
    assert timing.runs == 5
    assert timing.samples_s == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert (timing.min_s, timing.median_s) == (1.0, 3.0)
    assert timing.p95_s == pytest.approx(4.8)
    assert timing.stdev_s == pytest.approx(1.5811, rel=1e-3)
    assert setups == [{"n": 3}] * 6
    assert timing.label == "work"
    assert "median 3.00 s" in str(timing)


def test_time_call_number_gives_per_call_time(clock):
    timing = time_call(lambda: clock.advance(2.0), repeat=3, warmup=0, number=4)
    assert timing.median_s == 2.0
    assert timing.runs == 3


def test_benchmark_table(clock):
    bench = Benchmark(repeat=3, warmup=2)
    calls = {"setup": 0, "slow": 0, "fast": 0}

    @bench.setup
    def before_each_case(n):
        calls["setup"] += 1
        clock.advance(50)

    @bench.case
    def slow(n):
        """Slow: one query per row"""
        calls["slow"] += 1
        clock.advance(0.01 * n)

    bench.add("fast", lambda n: (calls.__setitem__("fast", calls["fast"] + 1),
                                 clock.advance(0.001)))

    df = bench.run(n=10)
    assert list(df.columns) == ["case", "runs", "min_s", "median_s", "p95_s", "stdev_s", "ratio"]
    assert list(df["case"]) == ["Slow: one query per row", "fast"]  # registration order
    assert list(df["runs"]) == [3, 3]
    assert df["median_s"].tolist() == pytest.approx([0.1, 0.001])
    assert df["ratio"].tolist() == pytest.approx([100.0, 1.0])
    assert calls == {"setup": 2, "slow": 5, "fast": 5}
    assert bench.samples["fast"] == pytest.approx([0.001] * 3)

    shown = format_table(df)
    assert list(shown.columns) == ["case", "runs", "min", "median", "p95", "stdev", "ratio"]
    assert shown.loc[0, "median"] == "100 ms"
    assert shown.loc[1, "median"] == "1.00 ms"
    assert shown.loc[0, "ratio"] == "100.0x"
    for column in ("min", "median", "p95", "stdev"):
        assert all(DURATION.match(value) for value in shown[column])


def test_benchmark_misuse_says_what_to_do():
    bench = Benchmark()
    with pytest.raises(ValueError, match="@bench.case"):
        bench.run()
    bench.add("a", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        bench.add("a", lambda: None)


def test_benchmark_really_times(monkeypatch):
    bench = Benchmark(repeat=3, warmup=0)
    bench.add("sleep", lambda: time.sleep(0.002))
    bench.add("nothing", lambda: None)
    df = bench.run()
    # lower bound only: a sleep never takes less than asked
    assert df.loc[0, "min_s"] >= 0.002
    assert df.loc[0, "ratio"] > 1 and df.loc[1, "ratio"] == 1.0


def test_format_table_formats_bytes_and_keeps_other_columns():
    df = pd.DataFrame({"strategy": ["a"], "peak_bytes": [12_345_678], "rows": [3]})
    shown = format_table(df)
    assert shown.to_dict("records") == [{"strategy": "a", "peak": "12.3 MB", "rows": 3}]


# ------------------------------------------------------------------------------ query counting


def _seed_users(engine, users=5, orders_each=2):
    Base.metadata.create_all(engine, tables=[User.__table__, Order.__table__])
    from datetime import datetime
    from decimal import Decimal

    with Session(engine) as session:
        for u in range(users):
            user = User(email=f"u{u}@example.com", first_name="A", last_name="B",
                        created_at=datetime(2024, 1, 1))
            user.orders = [Order(status="paid", total=Decimal("9.99"),
                                 created_at=datetime(2024, 1, 2)) for _ in range(orders_each)]
            session.add(user)
        session.commit()


def test_count_queries_n_plus_one_and_eager_loading(any_engine):
    _seed_users(any_engine, users=5)
    with Session(any_engine) as session, count_queries(any_engine) as lazy:
        users = session.scalars(sa.select(User).order_by(User.id)).all()
        assert sum(len(user.orders) for user in users) == 10
    assert lazy.count == 1 + 5
    assert lazy.select_count == 6

    with Session(any_engine) as session, count_queries(any_engine) as eager:
        users = session.scalars(sa.select(User).options(selectinload(User.orders))).all()
        assert sum(len(user.orders) for user in users) == 10
    assert eager.count == 2
    assert eager.total_s > 0
    df = eager.df()
    assert list(df.columns) == ["kind", "sql", "parameters", "duration_s"]
    assert df["kind"].tolist() == ["SELECT", "SELECT"]
    assert "<QueryCounter: 2 statements in" in repr(eager)


def test_count_queries_stops_and_ignores_other_engines(sqlite_engine, tmp_path):
    other = sa.create_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    with count_queries(sqlite_engine) as q:
        with other.connect() as conn:
            conn.execute(sa.text("select 1"))
        with sqlite_engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    with sqlite_engine.connect() as conn:
        conn.execute(sa.text("select 2"))  # after the block: not counted
    assert q.count == 1
    assert q.statements[0].sql == "select 1"
    assert not sa.event.contains(sqlite_engine, "before_cursor_execute", q._before)
    other.dispose()


def test_count_queries_executemany_counts_once_and_records_failures(sqlite_engine):
    table = sa.Table("t", sa.MetaData(), sa.Column("x", sa.Integer))
    table.metadata.create_all(sqlite_engine)
    with count_queries(sqlite_engine) as q:
        with sqlite_engine.begin() as conn:
            conn.execute(table.insert(), [{"x": i} for i in range(100)])
        with pytest.raises(sa.exc.OperationalError):
            with sqlite_engine.connect() as conn:
                conn.execute(sa.text("select * from no_such_table"))
    assert q.count == 2
    assert q.statements[0].executemany and q.statements[0].kind == "INSERT"
    assert q.statements[1].error == "OperationalError"


def test_nested_counters(sqlite_engine):
    with count_queries(sqlite_engine) as outer:
        with sqlite_engine.connect() as conn:
            conn.execute(sa.text("select 1"))
            with count_queries(conn) as inner:
                conn.execute(sa.text("select 2"))
    assert (outer.count, inner.count) == (2, 1)


def test_slow_query_log(sqlite_engine, caplog):
    with caplog.at_level(logging.WARNING, logger="perfcourse.slow_queries"):
        with slow_query_log(sqlite_engine, threshold_s=3600) as never:
            with sqlite_engine.connect() as conn:
                conn.execute(sa.text("select 1"))
        assert never.slow == [] and not caplog.records
        with slow_query_log(sqlite_engine, threshold_s=0) as always:
            with sqlite_engine.connect() as conn:
                conn.execute(sa.text("select :x + 1"), {"x": 41})
    assert len(always.slow) == 1
    (record,) = caplog.records
    assert "slow query (" in record.getMessage()
    assert "select ? + 1" in record.getMessage() and "41" in record.getMessage()
    assert len(always.df()) == 1


# ------------------------------------------------------------------------------------ EXPLAIN

ITEMS = sa.Table(
    "items", sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("code", sa.Integer, nullable=False),
    sa.Column("payload", sa.String(50)),
)


def _seed_items(engine, rows=20_000):
    ITEMS.metadata.create_all(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(
                "insert into items (code, payload) "
                f"select g, 'payload ' || g from generate_series(1, {rows}) g"))
            conn.execute(sa.text("analyze items"))
        else:
            conn.execute(ITEMS.insert(), [{"code": i, "payload": f"payload {i}"}
                                          for i in range(1, rows + 1)])


def test_explain_full_scan_then_index_search(any_engine):
    _seed_items(any_engine)
    lookup = sa.select(ITEMS).where(ITEMS.c.code == 4242)

    before = explain(any_engine, lookup)
    assert before.verdict == "full scan"
    assert before.scanned_tables == ["items"]
    assert not before.uses_index and before.index is None
    assert before.plan_text

    with any_engine.begin() as conn:
        conn.execute(sa.text("create index ix_items_code on items (code)"))
        if any_engine.dialect.name == "postgresql":
            conn.execute(sa.text("analyze items"))
    after = explain(any_engine, lookup)
    assert after.verdict == "index search"
    assert after.index == "ix_items_code" and after.uses_index
    assert after.scanned_tables == []
    assert "ix_items_code" in "\n".join(after.plan_text)
    assert "index search using ix_items_code" in repr(after)
    assert "<pre>" in after._repr_html_()

    # a SQL string with parameters, and ANALYZE: a real run with a measured time
    analysed = explain(any_engine, "select * from items where code = :c", {"c": 7}, analyze=True)
    assert analysed.verdict == "index search"
    assert analysed.actual_time_s is not None and analysed.actual_time_s > 0
    assert "actual time" in analysed.summary()


def test_explain_sqlite_covering_index_and_primary_key(sqlite_engine):
    _seed_items(sqlite_engine, rows=100)
    with sqlite_engine.begin() as conn:
        conn.execute(sa.text("create index ix_items_code on items (code)"))
    covering = explain(sqlite_engine, sa.select(ITEMS.c.code).where(ITEMS.c.code == 5))
    assert covering.verdict == "covering index search"
    assert covering.index == "ix_items_code"
    by_id = explain(sqlite_engine, sa.select(ITEMS).where(ITEMS.c.id == 5))
    assert by_id.verdict == "index search" and by_id.index == "PRIMARY KEY"


def test_explain_orm_statement_and_join(sqlite_engine):
    _seed_users(sqlite_engine)
    plan = explain(
        sqlite_engine,
        sa.select(User, Order).join(User.orders).where(User.email == "u1@example.com"),
    )
    tables = {access.table for access in plan.accesses}
    assert tables == {"users", "orders"}
    assert "users" in plan.scanned_tables  # no index on email yet
    assert plan.verdict == "full scan"


def test_explain_postgres_analyze_rolls_back(postgres_engine):
    _seed_items(postgres_engine, rows=100)
    plan = explain(postgres_engine, "delete from items where code < 50", analyze=True)
    assert plan.actual_time_s is not None
    assert any("Delete on items" in line for line in plan.plan_text)
    with postgres_engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from items")).scalar_one() == 100
    no_costs = explain(postgres_engine, sa.select(ITEMS), costs=False)
    assert not any("cost=" in line for line in no_costs.plan_text)


# ------------------------------------------------------------------------------------ memory


def test_track_memory_peak_and_current():
    with track_memory() as mem:
        block = bytearray(10_000_000)
        del block
        kept = bytearray(1_000_000)
    assert mem.peak_bytes >= 10_000_000
    assert 1_000_000 <= mem.current_bytes < 2_000_000
    assert "peak" in str(mem) and "MB" in str(mem)
    del kept


def test_track_memory_nested_keeps_outer_peak():
    with track_memory() as outer:
        with track_memory() as first:
            block = bytearray(5_000_000)
            del block
        with track_memory() as second:
            small = bytearray(100_000)
            del small
    assert first.peak_bytes >= 5_000_000
    assert second.peak_bytes < 1_000_000
    assert outer.peak_bytes >= 5_000_000


def test_process_rss_and_rss_during():
    assert memory.process_rss() > 1_000_000

    def allocate(megabytes):
        block = bytearray(megabytes * 1_000_000)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        time.sleep(0.3)
        return len(block)

    usage = memory.rss_during(allocate, 60, interval=0.01)
    assert usage.result == 60_000_000
    assert usage.increase_bytes >= 30_000_000
    assert usage.peak_bytes >= usage.before_bytes
    assert "peak RSS" in str(usage)


def test_statement_kind_reads_through_common_table_expressions():
    from perfcourse.statements import StatementRecord

    def kind(sql):
        return StatementRecord(sql=sql, parameters=(), duration_s=0.0).kind

    assert kind("WITH recent AS (SELECT * FROM orders) SELECT count(*) FROM recent") == "SELECT"
    assert kind("with old as (select id from orders) delete from order_items where 1") == "DELETE"
    assert kind("/* tag */ UPDATE users SET active = 0") == "UPDATE"


def test_sqlite_plans_follow_schema_changes(sqlite_engine):
    """A plan is never served from a statement cached before an index came or went."""
    from perfcourse.explain import explain

    with sqlite_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, x INT)")
        conn.exec_driver_sql("INSERT INTO t (x) VALUES (1), (2), (3)")
    query = "SELECT id FROM t WHERE x = 2"
    assert explain(sqlite_engine, query).verdict == "full scan"
    with sqlite_engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_t_x ON t (x)")
    assert explain(sqlite_engine, query).index == "ix_t_x"
    with sqlite_engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_t_x")
    assert explain(sqlite_engine, query).verdict == "full scan"


def test_format_table_reads_rates_before_durations():
    import pandas as pd

    from perfcourse.units import format_table

    table = format_table(pd.DataFrame({"throughput_per_s": [1234.5], "median_s": [0.00123]}))
    assert list(table.columns) == ["throughput", "median"]
    assert table.iloc[0].tolist() == ["1,234 req/s", "1.23 ms"]
