"""Chapter 04 helpers: loading strategies, streaming CSV out and in, GC demos, the profiled
report, O(n^2) against O(n) against GROUP BY, one aggregate against many COUNTs, DuckDB, and
memoising.

Database tests run on SQLite and on PostgreSQL (embedded and configured), each in a private
namespace seeded with the ``tiny`` scale. They assert on rows, counts and query counts; memory
assertions compare byte counts measured in the same run, never time.
"""

from __future__ import annotations

import csv
import math

import pytest
import sqlalchemy as sa
from sqlalchemy import select

from perfcourse.chapters import memory_and_cpu as profiling
from perfcourse.statements import count_queries


def _order_count(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one()


def test_every_loading_strategy_sees_the_same_orders(seeded):
    table = profiling.compare_loading(seeded, batch=300)
    orders = _order_count(seeded)
    assert list(table.strategy) == list(profiling.LOAD_STRATEGIES)
    assert set(table.rows) == {orders}
    assert table.checksum.nunique() == 1
    queries = dict(zip(table.strategy, table.queries))
    assert queries["ORM all()"] == 1
    assert queries["ORM yield_per"] == 1
    assert queries["keyset batches"] == math.ceil(orders / 300) + 1  # the last, empty batch
    assert queries["ids only"] == 2
    peak = dict(zip(table.strategy, table.peak_bytes))
    assert peak["ORM yield_per"] < peak["ORM all()"]
    assert peak["keyset batches"] < peak["ORM all()"]


def test_unknown_strategy_names_the_choices(tiny):
    with pytest.raises(ValueError, match="keyset batches"):
        profiling.load_orders(tiny, "everything")


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
    statement = select(*(profiling.ORDERS.c[name] for name in profiling.ORDER_CSV_COLUMNS)) \
        .order_by(profiling.ORDERS.c.id)
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


def test_csv_export_comparison_runs_each_export(seeded):
    table = profiling.compare_csv_export(seeded, {"all": _export_loading_all,
                                                  "stream": _export_streaming})
    assert list(table.method) == ["all", "stream"]
    assert set(table.rows) == {_order_count(seeded)}
    assert table.same_content.all()
    assert table.peak_bytes[1] < table.peak_bytes[0]
    different = profiling.compare_csv_export(
        seeded, {"all": _export_loading_all,
                 "ten": lambda e, s: _export_streaming(e, s, limit=10)})
    assert list(different.rows) == [_order_count(seeded), 10]
    assert list(different.same_content) == [True, False]


def test_csv_import_in_chunks(seeded, tmp_path):
    path = tmp_path / "orders.csv"
    with open(path, "w", newline="") as handle:
        written = _export_streaming(seeded, handle, limit=450)
    table = profiling.compare_csv_import(seeded, path, chunk_rows=100)
    assert list(table.rows) == [written, written]
    assert list(table.rows_in_table) == [written, written]
    assert list(table.insert_statements) == [1, 5]
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
                            exclude=["slow_product_report"]) == "_revenue_per_product"


@pytest.mark.parametrize("k", [0, 3, 6])
def test_three_ways_to_find_heavy_users_agree(seeded, k):
    ids = profiling.order_user_ids(seeded)
    expected = profiling.more_than_counter(ids, k)
    assert profiling.more_than_nested(ids, k) == expected
    with count_queries(seeded) as queries:
        assert profiling.more_than_sql(seeded, k) == expected
    assert queries.count == 1
    first = profiling.order_user_ids(seeded, 300)
    assert profiling.more_than_sql(seeded, 1, 300) == profiling.more_than_counter(first, 1)


def test_heavy_users_grid(tiny):
    grid = profiling.heavy_users_grid(tiny, [100, 200], k=1, repeat=1)
    assert grid.groupby("n").users.nunique().eq(1).all()
    sql = grid[grid.method == "GROUP BY ... HAVING"]
    assert set(sql.queries) == {1} and sql.comparisons.isna().all()
    counter = grid[grid.method == "Counter"]
    assert list(counter.comparisons) == [100, 200]


def test_duckdb_over_parquet_matches_the_database(seeded, tmp_path):
    from perfcourse.export import export_parquet

    paths = export_parquet(seeded, tmp_path)
    database = profiling.category_sales_sqlite(seeded)
    duck = profiling.category_sales_duckdb(paths)
    assert database and profiling.same_sales(database, duck)
    assert not profiling.same_sales(database, duck[1:])


def test_memoised_revenue_queries_once_per_miss(tiny):
    sequence = profiling.call_sequence(60, 10)
    table = profiling.memo_table(tiny, sequence, [0, 3, None])
    assert list(table.misses) == [profiling.lru_misses(sequence, m) for m in (0, 3, None)]
    assert list(table.queries) == list(table.misses)
    assert list(table.hits + table.misses) == [60, 60, 60]
    revenue = profiling.cached_category_revenue(tiny)
    assert revenue(2) == profiling.category_revenue(tiny, 2)


def test_lru_simulation():
    assert profiling.lru_misses([1, 2, 1, 3, 1, 2], 2) == 4
    assert profiling.lru_misses([1, 1, 1], 0) == 3
    assert profiling.lru_misses([1, 2, 3, 1, 2, 3], None) == 3
    assert profiling.call_sequence(5, 3) == profiling.call_sequence(5, 3)
