"""Parquet export of the shop dataset, for the DuckDB parts of the course.

>>> paths = export_parquet(engine("sqlite"))          # doctest: +SKIP
>>> duckdb.sql(f"select count(*) from '{paths['orders']}'")   # doctest: +SKIP

Files go to ``data/parquet/<namespace>/<table>.parquet``; an export that matches the dataset's
manifest is reused. Tables are streamed in batches, so memory stays flat at any scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .config import data_dir
from .db import namespace_of
from .errors import CourseError
from .models import TABLES, Base
from .seed import read_manifest

__all__ = [
    "BATCH_ROWS",
    "arrow_schema",
    "export_parquet",
]

BATCH_ROWS = 100_000


def arrow_schema(table: sa.Table) -> pa.Schema:
    """The Arrow schema of a shop table, from its SQLAlchemy column types."""
    fields = []
    for column in table.columns:
        kind = column.type
        if isinstance(kind, sa.Numeric):
            arrow_type = pa.decimal128(kind.precision, kind.scale)
        elif isinstance(kind, sa.Boolean):
            arrow_type = pa.bool_()
        elif isinstance(kind, sa.Integer):
            arrow_type = pa.int64()
        elif isinstance(kind, sa.DateTime):
            arrow_type = pa.timestamp("us")
        else:
            arrow_type = pa.string()
        fields.append(pa.field(column.name, arrow_type, nullable=column.nullable))
    return pa.schema(fields)


def _export_table(engine: Engine, table: sa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    schema = arrow_schema(table)
    with pq.ParquetWriter(tmp, schema) as writer:
        with engine.connect().execution_options(yield_per=BATCH_ROWS) as conn:
            result = conn.execute(sa.select(table).order_by(table.c.id))
            for rows in result.partitions():
                columns = list(zip(*rows))
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(values, type=field.type) for values, field in zip(columns, schema)],
                    schema=schema,
                ))
    tmp.replace(path)


def export_parquet(engine: Engine, folder: Path | None = None) -> dict[str, Path]:
    """Write every shop table to Parquet (once per dataset build); return the paths."""
    manifest = read_manifest(engine)
    if manifest is None:
        raise CourseError("There is no dataset to export yet: run `perfcourse seed` first.")
    folder = folder or data_dir() / "parquet" / namespace_of(engine)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "manifest.json"
    paths = {table: folder / f"{table}.parquet" for table in TABLES}
    if stamp.is_file() and json.loads(stamp.read_text()) == manifest and all(
        p.is_file() for p in paths.values()
    ):
        return paths
    stamp.unlink(missing_ok=True)
    for table, path in paths.items():
        _export_table(engine, Base.metadata.tables[table], path)
    stamp.write_text(json.dumps(manifest))
    return paths
