"""The shop dataset: determinism, manifest, idempotency, atomic loads, both backends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from perfcourse import db
from perfcourse.config import get_scale
from perfcourse.models import Order, OrderItem, User
from perfcourse.seed import expected_rows, generate, read_manifest, row_counts, seed_dataset
from tests.conftest import DATABASES, database_engine


def test_generation_is_deterministic_and_consistent():
    first = [(c.table, c.data) for c in generate(get_scale("tiny"), seed=7)]
    second = [(c.table, c.data) for c in generate(get_scale("tiny"), seed=7)]
    other = [(c.table, c.data) for c in generate(get_scale("tiny"), seed=8)]
    assert first == second
    assert first != other
    tables = [t for t, _ in first]
    assert tables == ["users", "categories", "products", "orders", "order_items"]


def test_tiny_has_the_documented_size():
    chunks = list(generate(get_scale("tiny")))
    rows = {c.table: len(c) for c in chunks}
    assert rows["orders"] == 1_000 and rows["users"] == 200
    # the progress bar's estimate stays within 5% of the real total
    assert abs(sum(rows.values()) - expected_rows(get_scale("tiny"))) < 0.05 * sum(rows.values())


def test_progress_bar_ends_full_at_the_rows_loaded(any_engine, monkeypatch):
    # The bar starts from an estimate; Jupyter draws a bar closed short of its total in red, as
    # a failed load. A completed load must close it at exactly the rows it loaded.
    import io

    from tqdm import tqdm

    from perfcourse import seed

    closed = []

    class RecordingBar(tqdm):
        def close(self):
            if not self.disable:
                closed.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(
        seed, "_progress",
        lambda total, enabled, label: RecordingBar(total=total, desc=label, file=io.StringIO()),
    )
    counts = seed_dataset(any_engine, "tiny")
    assert expected_rows(get_scale("tiny")) != sum(counts.values())  # the estimate is off...
    assert closed == [(sum(counts.values()), sum(counts.values()))]  # ...the bar ends full anyway


def test_seed_loads_consistent_data(any_engine):
    counts = seed_dataset(any_engine, "tiny", progress=False)
    assert counts == row_counts(any_engine)
    assert counts["orders"] == 1_000
    with Session(any_engine) as session:
        order = session.scalars(sa.select(Order).order_by(Order.id).limit(1)).one()
        assert isinstance(order.total, Decimal)
        assert order.total == sum(item.unit_price * item.quantity for item in order.items)
        assert order.user.email.endswith(("example.com", "example.org", "mail.test", "shop.test"))
        # every order's total equals the sum of its items, checked in SQL across the table
        item_sums = (
            sa.select(OrderItem.order_id, sa.func.sum(OrderItem.unit_price * OrderItem.quantity).label("s"))
            .group_by(OrderItem.order_id)
            .subquery()
        )
        mismatches = session.scalar(
            sa.select(sa.func.count()).select_from(Order)
            .join(item_sums, item_sums.c.order_id == Order.id)
            .where(sa.func.abs(Order.total - item_sums.c.s) > Decimal("0.005"))
        )
        assert mismatches == 0


def test_same_data_on_both_backends(sqlite_engine, postgres_engine):
    seed_dataset(sqlite_engine, "tiny", progress=False)
    seed_dataset(postgres_engine, "tiny", progress=False)
    query = sa.select(User.id, User.email, User.created_at).order_by(User.id).limit(50)
    with sqlite_engine.connect() as a, postgres_engine.connect() as b:
        assert a.execute(query).all() == b.execute(query).all()
        total = sa.select(sa.func.sum(Order.total))
        assert a.execute(total).scalar() == b.execute(total).scalar()


def test_only_framework_default_indexes(any_engine):
    seed_dataset(any_engine, "tiny", progress=False)
    inspector = sa.inspect(any_engine)
    indexed = {
        (table, tuple(ix["column_names"]))
        for table in ("users", "orders", "order_items", "products")
        for ix in inspector.get_indexes(table)
    }
    assert indexed == {
        ("orders", ("user_id",)),
        ("order_items", ("order_id",)),
        ("order_items", ("product_id",)),
        ("products", ("category_id",)),
    }


def test_manifest_and_idempotency(any_engine):
    assert read_manifest(any_engine) is None
    seed_dataset(any_engine, "tiny", progress=False)
    manifest = read_manifest(any_engine)
    assert manifest["scale"] == "tiny" and manifest["counts"]["orders"] == 1_000
    seed_dataset(any_engine, "tiny", progress=False)  # up to date: not rebuilt
    assert read_manifest(any_engine)["loaded_at"] == manifest["loaded_at"]
    assert read_manifest(any_engine)["load_seconds"] == manifest["load_seconds"]
    seed_dataset(any_engine, "tiny", seed=99, progress=False)  # another seed: rebuilt
    assert read_manifest(any_engine)["seed"] == 99


def test_force_rebuilds(sqlite_engine):
    seed_dataset(sqlite_engine, "tiny", progress=False)
    with sqlite_engine.begin() as conn:
        conn.execute(sa.text("delete from order_items"))
    assert row_counts(sqlite_engine)["order_items"] == 0
    seed_dataset(sqlite_engine, "tiny", progress=False)  # manifest says up to date
    assert row_counts(sqlite_engine)["order_items"] == 0
    seed_dataset(sqlite_engine, "tiny", force=True, progress=False)
    assert row_counts(sqlite_engine)["order_items"] > 0


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from perfcourse import db
    from perfcourse.seed import seed_dataset
    backend, namespace = sys.argv[1:3]
    seed_dataset(db.engine(backend, namespace=namespace), "small", force=True, progress=False)
    """
)


def _loading_started(backend: str, namespace: str) -> bool:
    if backend == "sqlite":
        loading = db.sqlite_path(namespace).with_name(f"{namespace}.sqlite.loading")
        return loading.exists() and loading.stat().st_size > 1_000_000
    eng = db.engine("postgres", namespace=namespace)
    try:
        with eng.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "select count(*) from pg_stat_activity where query like 'COPY order_items%'"
                )
            ).scalar()
            return rows > 0
    finally:
        eng.dispose()


@pytest.mark.parametrize("database", DATABASES)
def test_interrupted_load_keeps_previous_dataset(database, namespace, monkeypatch):
    eng = database_engine(database, namespace, monkeypatch)
    backend = db.backend_of(eng)
    try:
        seed_dataset(eng, "tiny", progress=False)
        before = read_manifest(eng)
        process = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, backend, namespace], env=os.environ.copy()
        )
        deadline = time.monotonic() + 60
        while not _loading_started(backend, namespace):
            assert process.poll() is None, "the load finished before it could be interrupted"
            assert time.monotonic() < deadline, "the load never started"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        eng.dispose()
        # the previous, complete dataset is still what the namespace serves
        assert read_manifest(eng) == before
        assert row_counts(eng)["orders"] == 1_000
        # and the next run completes the interrupted build
        counts = seed_dataset(eng, "small", progress=False)
        assert counts["orders"] == 100_000 == row_counts(eng)["orders"]
    finally:
        eng.dispose()
        db.drop_namespace(backend, namespace)


def test_interrupted_first_load_leaves_nothing_that_looks_complete(namespace):
    eng = db.engine("sqlite", namespace=namespace)
    try:
        process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, "sqlite", namespace])
        deadline = time.monotonic() + 60
        while not _loading_started("sqlite", namespace):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        process.kill()
        process.wait()
        assert not db.sqlite_path(namespace).exists()
        assert read_manifest(eng) is None
    finally:
        db.drop_namespace("sqlite", namespace)


def test_prefetch_keeps_order_and_raises_generator_errors():
    from perfcourse.seed import prefetch

    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError, match="generator failed"):
        list(prefetch(broken()))


def test_parquet_export_matches_the_database(any_engine, tmp_path):
    import duckdb

    from perfcourse.errors import CourseError
    from perfcourse.export import export_parquet

    with pytest.raises(CourseError, match="perfcourse seed"):
        export_parquet(any_engine, tmp_path)
    seed_dataset(any_engine, "tiny", progress=False)
    paths = export_parquet(any_engine, tmp_path)
    orders = str(paths["orders"])
    assert duckdb.sql(f"select count(*) from '{orders}'").fetchall()[0][0] == 1_000
    with any_engine.connect() as conn:
        expected = conn.execute(sa.select(sa.func.sum(Order.total))).scalar()
    assert duckdb.sql(f"select sum(total) from '{orders}'").fetchall()[0][0] == expected
    stamp = paths["orders"].stat().st_mtime_ns
    export_parquet(any_engine, tmp_path)  # up to date: not rewritten
    assert paths["orders"].stat().st_mtime_ns == stamp


def test_orm_inserts_after_seeding_get_fresh_ids(any_engine):
    """The bulk load wrote explicit ids; the next ORM insert must not collide with them."""
    seed_dataset(any_engine, "tiny", progress=False)
    with Session(any_engine) as session:
        order = Order(user_id=1, status="pending", total=Decimal("9.99"),
                      created_at=sa.func.current_timestamp())
        session.add(order)
        session.commit()
        assert order.id == 1_001
