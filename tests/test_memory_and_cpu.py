"""Chapter 04 helpers: loading strategies, streaming CSV out and in, GC demos, the profiled
report, O(n^2) against O(n) against GROUP BY, one aggregate against many COUNTs, DuckDB, and
memoising.

Database tests run on SQLite and on PostgreSQL (embedded and configured), each in a private
namespace seeded with the ``tiny`` scale. They assert on rows, counts and query counts; memory
assertions compare byte counts measured in the same run, never time.
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
from collections import Counter
from datetime import datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from perfcourse.chapters import memory_and_cpu as profiling
from perfcourse.models import Order
from perfcourse.timing import Benchmark


def _order_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one()


def _loading_cases(engine):
    bench = Benchmark()

    @bench.case
    def load_all(batch):
        """all()"""
        with Session(engine) as session:
            orders = session.scalars(select(Order).order_by(Order.id)).all()
            return {"rows": len(orders), "checksum": sum(o.user_id for o in orders)}

    @bench.case
    def keyset(batch):
        """keyset batches"""
        rows = checksum = last = 0
        with Session(engine) as session:
            while orders := session.scalars(select(Order).where(Order.id > last)
                                            .order_by(Order.id).limit(batch)).all():
                rows += len(orders)
                checksum += sum(o.user_id for o in orders)
                last = orders[-1].id
                session.expunge_all()
        return {"rows": rows, "checksum": checksum}

    @bench.case
    def plain(batch):
        """no mapping"""
        return batch

    return bench


def test_memory_table_runs_each_case_once_with_its_queries_and_peak(seeded):
    table = profiling.memory_table(_loading_cases(seeded), queries_on=seeded, batch=300)
    orders = _order_count(seeded)
    assert list(table.case) == ["all()", "keyset batches", "no mapping"]
    assert set(table.columns) == {"case", "rows", "checksum", "result", "queries", "peak_bytes"}
    assert list(table.rows[:2]) == [orders, orders]
    assert table.checksum[0] == table.checksum[1]
    assert table.result[2] == 300
    assert list(table.queries) == [1, math.ceil(orders / 300) + 1, 0]  # + the last, empty batch
    assert table.peak_bytes[1] < table.peak_bytes[0]


def test_memory_table_picks_cases_and_names_the_choices(tiny):
    bench = _loading_cases(tiny)
    table = profiling.memory_table(bench, cases=["no mapping"], batch=5)
    assert list(table.case) == ["no mapping"] and "queries" not in table.columns
    with pytest.raises(ValueError, match="keyset batches"):
        profiling.memory_table(bench, cases=["everything"], batch=5)


def test_streaming_cursor_comparison_counts_every_unit(seeded):
    table = profiling.compare_streaming_rss(seeded)
    assert table.units.nunique() == 1
    with seeded.connect() as conn:
        units = conn.execute(sa.text("SELECT sum(quantity) FROM order_items")).scalar_one()
    assert table.units[0] == units


def test_memory_profiler_report_names_the_lines(tiny):
    report = profiling.line_memory_profile(profiling.report_streaming, tiny, limit=500)
    assert "Line #" in report and "yield_per" in report
    assert profiling.report_streaming(tiny, 500) == profiling.report_loading_everything(tiny, 500)


def test_counting_sink_counts_lines_written_in_any_pieces():
    sink = profiling.CountingSink()
    for piece in ("id,name\r\n1,a", "\r\n2,b\r\n", "30,c\r\n"):
        sink.write(piece)
    assert (sink.header, sink.rows, sink.id_sum) == ("id,name", 3, 33)


def _orders_csv_statement(limit=None):
    statement = select(*(Order.__table__.c[name] for name in profiling.ORDER_CSV_COLUMNS)) \
        .order_by(Order.__table__.c.id)
    return statement if limit is None else statement.limit(limit)


def _export_loading_all(engine, sink):
    with engine.connect() as conn:
        rows = conn.execute(_orders_csv_statement()).all()
    writer = csv.writer(sink)
    writer.writerow(profiling.ORDER_CSV_COLUMNS)
    writer.writerows(rows)


def _export_streaming(engine, sink, batch=50, limit=None):
    writer = csv.writer(sink)
    writer.writerow(profiling.ORDER_CSV_COLUMNS)
    written = 0
    with engine.connect() as conn:
        result = conn.execute(_orders_csv_statement(limit).execution_options(yield_per=batch))
        for rows in result.partitions():
            writer.writerows(rows)
            written += len(rows)
    return written


def _exports(**more):
    bench = Benchmark()
    bench.add("all", _export_loading_all)
    bench.add("stream", _export_streaming)
    for label, export in more.items():
        bench.add(label, export)
    return bench


def test_csv_export_comparison_runs_each_export(seeded):
    table = profiling.compare_csv_export(_exports(), seeded)
    assert list(table.case) == ["all", "stream"]
    assert set(table.rows) == {_order_count(seeded)}
    assert table.same_content.all()
    assert table.peak_bytes[1] < table.peak_bytes[0]
    bench = _exports(ten=lambda engine, sink: _export_streaming(engine, sink, limit=10))
    different = profiling.compare_csv_export(bench, seeded)
    assert list(different.rows) == [_order_count(seeded), _order_count(seeded), 10]
    assert list(different.same_content) == [True, True, False]


def _parse(record):
    return {"id": int(record["id"]), "user_id": int(record["user_id"]), "status": record["status"],
            "total": Decimal(record["total"]),
            "created_at": datetime.fromisoformat(record["created_at"])}


def _imports(chunk_rows):
    bench = Benchmark()

    @bench.case
    def whole(engine, path):
        """whole file"""
        with open(path, newline="") as handle:
            records = [_parse(r) for r in csv.DictReader(handle)]
        with engine.begin() as conn:
            conn.execute(profiling.IMPORT_TABLE.insert(), records)
        return {"rows": len(records)}

    @bench.case
    def chunks(engine, path):
        """chunks"""
        inserted = 0
        with open(path, newline="") as handle, engine.begin() as conn:
            records = csv.DictReader(handle)
            while chunk := [_parse(r) for r in itertools.islice(records, chunk_rows)]:
                conn.execute(profiling.IMPORT_TABLE.insert(), chunk)
                inserted += len(chunk)
        return {"rows": inserted}

    return bench


def test_csv_import_cases_each_into_a_fresh_table(seeded, tmp_path):
    path = tmp_path / "orders.csv"
    with open(path, "w", newline="") as handle:
        written = _export_streaming(seeded, handle, limit=450)
    table = profiling.compare_csv_import(_imports(100), seeded, path=path)
    assert list(table.case) == ["whole file", "chunks"]
    assert list(table.rows) == [written, written]
    assert list(table.rows_in_table) == [written, written]
    assert list(table.queries) == [1, 5]
    assert table.peak_bytes[1] < table.peak_bytes[0]
    with seeded.connect() as conn:
        total = conn.execute(sa.text("SELECT sum(total) FROM orders_import")).scalar_one()
        expected = conn.execute(sa.text(
            "SELECT sum(total) FROM (SELECT total FROM orders ORDER BY id LIMIT 450) t")).scalar_one()
    assert float(total) == pytest.approx(float(expected))
    profiling.IMPORT_TABLE.drop(seeded)


def test_gc_collect_does_not_free_a_referenced_list():
    table = profiling.gc_myth(50_000).set_index("step")
    built = table.allocated_bytes["list built"]
    assert table.allocated_bytes["after gc.collect()"] > 0.9 * built
    assert table.allocated_bytes["after del data"] < 0.1 * built
    assert list(table.rows_alive) == [50_000, 50_000, 0]


def test_a_cycle_waits_for_the_collector():
    table = profiling.reference_cycle_demo()
    assert table.freed_by_del.tolist() == [True, False]
    assert table.freed_by_gc_collect.tolist() == [True, True]


def test_profiled_report_and_its_fix_agree(seeded):
    assert profiling.slow_product_report(seeded) == profiling.fast_product_report(seeded)
    assert len(profiling.fast_product_report(seeded, top=3)) == 3


def test_hottest_function_of_the_slow_report(tiny):
    from pyinstrument import Profiler

    from perfcourse.profiler import hottest_function

    profiler = Profiler(interval=0.0005)
    with profiler:
        for _ in range(3):
            profiling.slow_product_report(tiny)
    assert hottest_function(profiler.last_session, module="perfcourse.chapters.memory_and_cpu",
                            exclude=["slow_product_report"]) == "revenue_per_product"


def _heavy_user_cases(engine):
    bench = Benchmark(repeat=1, warmup=0)

    @bench.case
    def counter(ids, n, k):
        """Counter"""
        return sorted(u for u, count in Counter(ids).items() if count > k)

    @bench.case
    def sql(ids, n, k):
        """GROUP BY ... HAVING"""
        first = select(Order.user_id).order_by(Order.id).limit(n).subquery()
        statement = (select(first.c.user_id).group_by(first.c.user_id)
                     .having(func.count() > k).order_by(first.c.user_id))
        with engine.connect() as conn:
            return list(conn.execute(statement).scalars())

    return bench


def test_heavy_users_grid_runs_every_case_for_every_n(tiny):
    grid = profiling.heavy_users_grid(_heavy_user_cases(tiny), tiny, [100, 200], k=1)
    assert list(grid.case) == ["Counter", "GROUP BY ... HAVING"] * 2
    assert list(grid.n) == [100, 100, 200, 200]
    assert grid.groupby("n").users.nunique().eq(1).all()
    assert list(grid.queries) == [0, 1, 0, 1]
    assert list(grid.distinct_users[::2]) == [len(set(profiling.order_user_ids(tiny, n)))
                                              for n in (100, 200)]
    assert (grid.median_s > 0).all()


def test_duckdb_over_parquet_matches_the_database(seeded, tmp_path):
    from perfcourse.export import export_parquet

    paths = export_parquet(seeded, tmp_path)
    database = profiling.category_sales_sqlite(seeded)
    duck = profiling.category_sales_duckdb(paths)
    assert database and profiling.same_sales(database, duck)
    assert not profiling.same_sales(database, duck[1:])


def test_memoised_revenue_queries_once_per_miss(tiny):
    def cached(engine, maxsize):
        @functools.lru_cache(maxsize=maxsize)
        def revenue(category_id):
            return profiling.category_revenue(engine, category_id)
        return revenue

    sequence = profiling.call_sequence(60, 10)
    table = profiling.memo_table(cached, tiny, sequence, [0, 3, None])
    assert list(table.misses) == [profiling.lru_misses(sequence, m) for m in (0, 3, None)]
    assert list(table.queries) == list(table.misses)
    assert list(table.hits + table.misses) == [60, 60, 60]
    assert list(table.maxsize) == ["0", "3", "unbounded"]


def test_lru_simulation():
    assert profiling.lru_misses([1, 2, 1, 3, 1, 2], 2) == 4
    assert profiling.lru_misses([1, 1, 1], 0) == 3
    assert profiling.lru_misses([1, 2, 3, 1, 2, 3], None) == 3
    assert profiling.call_sequence(5, 3) == profiling.call_sequence(5, 3)


# --- the lab: the app's nightly export and report, the job to profile ------------------------

LAB_SINCE, LAB_UNTIL = datetime(2024, 1, 1), datetime(2025, 1, 1)


def test_nightly_export_as_written_writes_the_window_and_measures_growth(seeded):
    rows = []
    sink = profiling.CountingSink()
    profiling.nightly_export_as_written(seeded, sink, LAB_SINCE, LAB_UNTIL)
    with seeded.connect() as conn:
        expected = conn.execute(sa.text(
            "SELECT count(*) FROM order_items i JOIN orders o ON o.id = i.order_id "
            "WHERE o.created_at >= :since AND o.created_at < :until AND o.status <> 'cancelled'"),
            {"since": LAB_SINCE, "until": LAB_UNTIL}).scalar_one()
    assert sink.rows == expected > 0
    assert sink.header == ",".join(profiling.EXPORT_LINE_COLUMNS)
    for since in (datetime(2024, 10, 1), LAB_SINCE):
        rows.append(profiling.measure_export(profiling.nightly_export_as_written, seeded, since, LAB_UNTIL))
    assert rows[1]["lines"] > 2 * rows[0]["lines"]
    assert rows[1]["peak_bytes"] > rows[0]["peak_bytes"]  # it holds the window
    assert rows[1]["queries"] <= 5


def test_nightly_report_as_written_counts_distinct_orders_per_category(seeded):
    measured = profiling.measure_report(profiling.nightly_report_as_written, seeded, LAB_SINCE)
    report = measured["result"]
    with seeded.connect() as conn:
        categories = conn.execute(sa.text("SELECT count(*) FROM categories")).scalar_one()
        orders = conn.execute(sa.text(
            "SELECT count(DISTINCT o.id) FROM orders o JOIN order_items i ON i.order_id = o.id "
            "WHERE o.created_at >= :since AND o.status <> 'cancelled'"), {"since": LAB_SINCE}).scalar_one()
    assert measured["rows"] == len(report) == categories
    assert [row[0] for row in report] == sorted(row[0] for row in report)
    assert measured["queries"] == 2 + categories  # one COUNT per category
    assert sum(row[1] for row in report) >= orders  # an order with two categories counts in each
    assert all(isinstance(row[3], Decimal) for row in report)


@pytest.mark.parametrize("step", ["dedupe_customers", "match_refunds", "rank_products", "flag_repeat_buyers"])
def test_each_step_gives_the_same_answer_quick_or_slow(tiny, step):
    orders, lines = profiling.load_job_data(tiny, 300)
    args = {"dedupe_customers": ([o[2].upper() if o[0] % 2 else o[2] for o in orders],),
            "match_refunds": (orders, [o[0] for o in orders[::2]]),
            "rank_products": (lines,), "flag_repeat_buyers": (orders,)}[step]
    fn = getattr(profiling, step)
    assert fn(*args, slow=True) == fn(*args, slow=False)


def test_nightly_job_hides_its_seed_and_the_summary_does_not_depend_on_it(tiny):
    jobs = [profiling.NightlyJob(tiny, seed=seed, orders=200) for seed in range(4)]
    try:
        assert {job._hot for job in jobs} == set(profiling.JOB_STEPS[1:])
        assert profiling.current_job() is jobs[-1]
        assert "seed" not in repr(jobs[0]) and "_hot" not in repr(jobs[0])
        summaries = [job.run() for job in jobs]
        assert all(summary == summaries[0] for summary in summaries)
        assert summaries[0]["orders"] == 200
    finally:
        for job in jobs:
            profiling._JOBS.remove(job)


def test_the_hot_step_dominates_a_pyinstrument_profile():
    from pyinstrument import Profiler

    from perfcourse import dataset

    # The course's small dataset, as the lesson and the lab profile it: on the tiny one the whole
    # job takes 20 ms and loading the data costs nearly as much as the planted hot step.
    job = profiling.NightlyJob(dataset("sqlite", "small", quiet=True), seed=0)
    try:
        profiler = Profiler(interval=0.001)
        with profiler:
            job.run()
    finally:
        profiling._JOBS.remove(job)
    hot = profiling_hottest(profiler)
    assert hot == job._hot


def profiling_hottest(profiler):
    from perfcourse.profiler import hottest_function

    return hottest_function(profiler.last_session, "perfcourse.chapters.memory_and_cpu",
                            exclude=["run", "NightlyJob.run"])
