"""Scratch copies of the shop dataset, for experiments that change the schema or the rows.

:func:`scratch_copy` gives a chapter (or a test) its own copy of the dataset behind an engine,
at that engine's scale, so the course dataset itself never changes. :func:`memory_copy` gives a
checker an in-memory copy nothing else can see.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import StaticPool

from .db import backend_of, drop_namespace, engine, namespace_for, namespace_of, scale_of, sqlite_path
from .models import Base
from .seed import MANIFEST_TABLE, read_manifest, seed_dataset

__all__ = ["PRISTINE_INDEXES", "drop_indexes", "forget_plans", "memory_copy", "scratch_copy"]

#: Indexes of the pristine dataset (primary keys are implicit): never dropped by drop_indexes.
PRISTINE_INDEXES = frozenset(
    index.name for table in Base.metadata.tables.values() for index in table.indexes
)


def _backup(source: Path, target: sqlite3.Connection) -> None:
    """Copy the SQLite file ``source`` into ``target`` with SQLite's online backup API."""
    disk = sqlite3.connect(source)
    try:
        disk.backup(target)
    finally:
        disk.close()


def drop_indexes(eng: Engine, tables: Iterable[str] | None = None) -> list[str]:
    """Drop every index an experiment added (all but the dataset's own); return their names."""
    dropped = []
    with eng.begin() as conn:
        inspector = sa.inspect(conn)
        for table in tables or inspector.get_table_names():
            for ix in inspector.get_indexes(table):
                if ix["name"] and ix["name"] not in PRISTINE_INDEXES:
                    conn.exec_driver_sql(f'DROP INDEX IF EXISTS "{ix["name"]}"')
                    dropped.append(ix["name"])
    forget_plans(eng)
    return dropped


def forget_plans(eng: Engine) -> None:
    """Close pooled connections after DDL on SQLite.

    Python's sqlite3 keeps prepared statements per connection, and a cached ``EXPLAIN QUERY
    PLAN`` can outlive the index it names; fresh connections plan again.
    """
    if backend_of(eng) == "sqlite":
        eng.dispose()


def _restore_schema(eng: Engine) -> bool:
    """Undo what experiments added to a PostgreSQL copy: indexes, columns and tables the shop
    models do not have. Return whether the rows still match the manifest's counts."""
    drop_indexes(eng)
    manifest = read_manifest(eng)
    with eng.begin() as conn:
        inspector = sa.inspect(conn)
        for table in inspector.get_table_names():
            if table not in Base.metadata.tables and table != MANIFEST_TABLE:
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
                continue
            if table == MANIFEST_TABLE:
                continue
            wanted = set(Base.metadata.tables[table].columns.keys())
            for column in inspector.get_columns(table):
                if column["name"] not in wanted:
                    conn.exec_driver_sql(f'ALTER TABLE "{table}" DROP COLUMN "{column["name"]}"')
        counts = {name: conn.exec_driver_sql(f'SELECT count(*) FROM "{name}"').scalar_one()
                  for name in Base.metadata.tables}
    return bool(manifest) and counts == {k: manifest["counts"][k] for k in counts}


def scratch_copy(source: Engine, namespace: str, *, scale: str | None = None) -> Engine:
    """A private copy of the dataset behind ``source`` in ``namespace``, at the same scale.

    SQLite: the file is copied with SQLite's backup API (a fresh copy every call, well under a
    second at the default scale). PostgreSQL: the dataset is seeded into the schema
    ``namespace`` (idempotent), then everything an earlier experiment added is removed (indexes,
    columns and tables the shop models do not have); rows added or deleted make it reseed.
    ``scale`` defaults to the source's. Drop the copy with
    ``perfcourse.db.drop_namespace(backend, namespace)`` when done.
    """
    backend = backend_of(source)
    scale = scale or scale_of(source)
    target = engine(backend, namespace=namespace, scale=scale)
    if backend == "sqlite":
        target.dispose()
        drop_namespace("sqlite", namespace)
        copy = sqlite3.connect(sqlite_path(namespace))
        try:
            _backup(sqlite_path(namespace_of(source)), copy)
        finally:
            copy.close()
        return target
    seed_dataset(target, scale, progress=False)
    if not _restore_schema(target):
        seed_dataset(target, scale, force=True, progress=False)
    return target


def memory_copy(scale: str = "tiny", statements: Sequence[str] = ()) -> Engine:
    """A fresh in-memory SQLite copy of a scale's dataset (seeded first if missing), after
    running ``statements`` (e.g. CREATE INDEX) on it.

    One connection, shared by every thread of the engine: nothing else, in this process or
    another, sees it, and it is gone when the engine is.
    """
    source = engine("sqlite", scale=scale)
    seed_dataset(source, scale, progress=False)
    source.dispose()
    memory = sqlite3.connect(":memory:", check_same_thread=False)
    _backup(sqlite_path(namespace_for(scale)), memory)
    for statement in statements:
        memory.execute(statement)
    memory.commit()
    eng = sa.create_engine("sqlite://", creator=lambda: memory, poolclass=StaticPool)
    eng.perfcourse_namespace = "memory"  # type: ignore[attr-defined]
    eng.perfcourse_scale = scale  # type: ignore[attr-defined]
    return eng
