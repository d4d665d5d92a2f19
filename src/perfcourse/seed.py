"""The shop dataset: deterministic generation and a fast, idempotent, atomic load.

>>> from perfcourse.db import engine
>>> from perfcourse.seed import seed_dataset
>>> seed_dataset(engine("sqlite"), scale="small")      # doctest: +SKIP
{'users': 10000, 'categories': 40, 'products': 2000, 'orders': 100000, 'order_items': 250123}

How it stays fast: rows are generated with numpy in chunks and written through the driver's bulk
path (SQLite: one transaction of ``executemany`` with journaling off; PostgreSQL: ``COPY``), and the
foreign-key indexes are built after the rows are in.

How it stays safe: the dataset is built *beside* the live one (a ``.loading`` file on SQLite, a
``<namespace>__loading`` schema on PostgreSQL) and swapped in only when complete, with a manifest
(seed, scale, schema version, row counts) written last. An interrupted load leaves the previous
dataset untouched, and the next run starts the build again. A dataset whose manifest matches is
not rebuilt.

How it stays shared: processes seeding the same dataset at once (two notebooks opened together on
a fresh machine) take turns under a lock, and the one that waited finds the dataset ready. A
SQLite file that is no longer a database (overwritten, truncated) is moved aside, never deleted,
and rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.schema import CreateIndex, CreateTable

from .config import DATASET_SEED, SCHEMA_VERSION, Scale, data_dir, default_scale, get_scale
from .db import backend_of, namespace_of, sqlite_path
from .locks import file_lock
from .models import ORDER_STATUSES, TABLES, Base

__all__ = [
    "MANIFEST_TABLE",
    "ORDERS_PER_CHUNK",
    "Chunk",
    "expected_rows",
    "generate",
    "prefetch",
    "read_manifest",
    "row_counts",
    "seed_dataset",
]

MANIFEST_TABLE = "perfcourse_manifest"
ORDERS_PER_CHUNK = 50_000
_EPOCH = np.datetime64("2023-01-01T00:00:00")
_SPAN_SECONDS = 3 * 365 * 24 * 3600  # three years of shop history

_FIRST = (
    "ada alan barbara claude donald edsger frances grace guido hedy ivan john katherine "
    "ken linus margaret niklaus radia rasmus sophie tim yukihiro barbara dennis brian"
).split()
_LAST = (
    "lovelace turing liskov shannon knuth dijkstra allen hopper rossum lamarr sutherland "
    "backus johnson thompson torvalds hamilton wirth perlman lerdorf wilson berners matsumoto "
    "ritchie kernighan"
).split()
_DOMAINS = ("example.com", "example.org", "mail.test", "shop.test")
_CATEGORY_WORDS = (
    "books music garden kitchen toys games sports outdoor office tools beauty health baby pets "
    "grocery fashion shoes jewelry watches phones laptops cameras audio lighting furniture "
    "bedding bath crafts automotive cycling camping fitness travel stationery art software "
    "vinyl coffee tea wine"
).split()
_ADJECTIVES = "basic classic deluxe eco mini pro smart super ultra vintage".split()
_NOUNS = "bag bottle box cable chair desk kit lamp mug pan set stand".split()
_STATUS_WEIGHTS = (0.05, 0.10, 0.15, 0.62, 0.08)  # pending, paid, shipped, delivered, cancelled


@dataclass
class Chunk:
    """Rows of one table, column-wise, as Python lists ready for the driver."""

    table: str
    columns: tuple[str, ...]
    data: list[list]

    def __len__(self) -> int:
        return len(self.data[0]) if self.data else 0

    def rows(self) -> Iterator[tuple]:
        return zip(*self.data)


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def _timestamps(seconds: np.ndarray) -> list[str]:
    stamps = np.datetime_as_string(_EPOCH + seconds.astype("timedelta64[s]"), unit="s")
    return np.char.replace(stamps, "T", " ").tolist()


def _money(cents: np.ndarray) -> list[float]:
    return np.round(cents / 100.0, 2).tolist()


def generate(scale: Scale, seed: int = DATASET_SEED) -> Iterator[Chunk]:
    """Yield the dataset table by table (orders and items in chunks), deterministically.

    Customers are skewed (a few order a lot), products too (a few sell a lot), every order has
    1-5 items and its total is the sum of its items, as in a real shop.
    """
    rng = np.random.default_rng(seed)

    # users
    n = scale.users
    ids = np.arange(1, n + 1)
    first = rng.integers(0, len(_FIRST), n)
    last = rng.integers(0, len(_LAST), n)
    domain = rng.integers(0, len(_DOMAINS), n)
    user_created = rng.integers(0, _SPAN_SECONDS // 2, n)
    emails = [
        f"{_FIRST[f]}.{_LAST[la]}{i}@{_DOMAINS[d]}"
        for i, f, la, d in zip(ids.tolist(), first.tolist(), last.tolist(), domain.tolist())
    ]
    yield Chunk(
        "users",
        ("id", "email", "first_name", "last_name", "active", "premium", "created_at"),
        [
            ids.tolist(),
            emails,
            [_FIRST[f].title() for f in first.tolist()],
            [_LAST[la].title() for la in last.tolist()],
            (rng.random(n) < 0.9).tolist(),
            (rng.random(n) < 0.1).tolist(),
            _timestamps(user_created),
        ],
    )

    # categories
    names = [
        _CATEGORY_WORDS[i % len(_CATEGORY_WORDS)]
        + ("" if i < len(_CATEGORY_WORDS) else f" {i // len(_CATEGORY_WORDS) + 1}")
        for i in range(scale.categories)
    ]
    yield Chunk("categories", ("id", "name"), [list(range(1, scale.categories + 1)), names])

    # products
    n = scale.products
    price_cents = np.clip(np.round(rng.lognormal(mean=8.0, sigma=0.9, size=n)), 99, 99_999)
    price_cents = price_cents.astype(np.int64)
    adjective = rng.integers(0, len(_ADJECTIVES), n).tolist()
    noun = rng.integers(0, len(_NOUNS), n).tolist()
    yield Chunk(
        "products",
        ("id", "category_id", "name", "price", "active"),
        [
            list(range(1, n + 1)),
            rng.integers(1, scale.categories + 1, n).tolist(),
            [f"{_ADJECTIVES[a]} {_NOUNS[b]} {i}" for i, a, b in zip(range(1, n + 1), adjective, noun)],
            _money(price_cents),
            (rng.random(n) < 0.95).tolist(),
        ],
    )

    # popularity weights: a long tail of customers and products
    user_weights = rng.lognormal(0.0, 1.0, scale.users)
    user_weights /= user_weights.sum()
    product_weights = rng.lognormal(0.0, 1.3, scale.products)
    product_weights /= product_weights.sum()

    # orders and order items, in chunks so memory stays flat at any scale
    next_item_id = 1
    for start in range(0, scale.orders, ORDERS_PER_CHUNK):
        n = min(ORDERS_PER_CHUNK, scale.orders - start)
        order_ids = np.arange(start + 1, start + n + 1)
        users = rng.choice(scale.users, size=n, p=user_weights)  # 0-based
        created = user_created[users] + rng.integers(3600, _SPAN_SECONDS // 2, n)
        status = rng.choice(len(ORDER_STATUSES), size=n, p=_STATUS_WEIGHTS)
        items_per_order = rng.integers(1, 5, n) + (rng.random(n) < 0.15)  # 1..5, mean ~2.6
        m = int(items_per_order.sum())
        item_order = np.repeat(np.arange(n), items_per_order)
        item_product = rng.choice(scale.products, size=m, p=product_weights)
        quantity = rng.integers(1, 4, m)
        unit_cents = price_cents[item_product]
        totals = np.bincount(item_order, weights=unit_cents * quantity, minlength=n)
        yield Chunk(
            "orders",
            ("id", "user_id", "status", "total", "created_at"),
            [
                order_ids.tolist(),
                (users + 1).tolist(),
                [ORDER_STATUSES[s] for s in status.tolist()],
                _money(totals),
                _timestamps(created),
            ],
        )
        yield Chunk(
            "order_items",
            ("id", "order_id", "product_id", "quantity", "unit_price"),
            [
                list(range(next_item_id, next_item_id + m)),
                order_ids[item_order].tolist(),
                (item_product + 1).tolist(),
                quantity.tolist(),
                _money(unit_cents),
            ],
        )
        next_item_id += m


def prefetch(chunks: Iterator[Chunk], depth: int = 2) -> Iterator[Chunk]:
    """Generate the next chunks in a background thread while the caller writes this one.

    The drivers release the GIL while the database works, so generation and loading overlap
    on a second core. Errors in the generator are raised in the caller.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                buffer.put(chunk)
            buffer.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            buffer.put(exc)

    thread = threading.Thread(target=produce, name="perfcourse-seed-generator", daemon=True)
    thread.start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            with contextlib.suppress(queue.Empty):
                buffer.get_nowait()
            thread.join(timeout=0.01)


def expected_rows(scale: Scale) -> int:
    """Rows before generation, for the progress bar (order items estimated at 2.65 per order)."""
    return scale.users + scale.categories + scale.products + int(scale.orders * 3.65)


# ------------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------------


def _manifest(scale: Scale, seed: int, counts: dict[str, int], seconds: float) -> dict:
    return {
        "seed": seed,
        "scale": scale.name,
        "schema_version": SCHEMA_VERSION,
        "counts": counts,
        "loaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_seconds": round(seconds, 3),
    }


class _DamagedFileError(Exception):
    """The SQLite file of a dataset is not a database any more (overwritten, truncated)."""


#: SQLite's result codes for a file that is not (or no longer) a valid database.
_DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
#: The first bytes of every SQLite database file (an empty file is an empty database too).
_SQLITE_HEADER = b"SQLite format 3\x00"


def _read_manifest(engine: Engine) -> dict | None:
    """:func:`read_manifest`, raising :class:`_DamagedFileError` for a damaged SQLite file."""
    sqlite = backend_of(engine) == "sqlite"
    if sqlite:
        # The header is checked before SQLite opens the file: closing a file it cannot read,
        # SQLite deletes its -wal and -shm, and those are part of what is kept.
        try:
            with open(sqlite_path(namespace_of(engine)), "rb") as file:
                header = file.read(len(_SQLITE_HEADER))
        except FileNotFoundError:
            return None  # do not create an empty file just by looking
        if header and header != _SQLITE_HEADER:
            raise _DamagedFileError("file is not a database")
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(MANIFEST_TABLE):
                return None
            value = conn.execute(sa.text(f"select body from {MANIFEST_TABLE}")).scalar()
    except sa.exc.DatabaseError as exc:
        # "file is not a database" and "database disk image is malformed" are about the file
        # itself; "no such table" and the like (OperationalError) only mean there is no
        # manifest. An extended result code carries the primary one in its low byte.
        code = getattr(exc.orig, "sqlite_errorcode", None)
        if sqlite and code is not None and code & 0xFF in _DAMAGE_CODES:
            raise _DamagedFileError(str(exc.orig)) from exc
        if isinstance(exc, sa.exc.OperationalError):
            return None
        raise
    return json.loads(value) if value else None


def read_manifest(engine: Engine) -> dict | None:
    """The manifest of the dataset behind ``engine``, or None when there is no complete one.

    A damaged SQLite file has none either. Looking changes nothing: :func:`seed_dataset` keeps
    the damaged file aside and rebuilds the dataset.
    """
    try:
        return _read_manifest(engine)
    except _DamagedFileError:
        return None


def _set_aside(engine: Engine, reason: str) -> Path:
    """Move a damaged SQLite dataset and its journal files aside, say so, return the kept copy.

    Renamed, never deleted: the file may be the only trace of what damaged it. The journal files
    keep SQLite's naming next to the copy, so opening the copy sees exactly what was there.
    """
    engine.dispose()  # pooled connections still point at the damaged file
    path = sqlite_path(namespace_of(engine))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    attempt = 1
    while kept.exists():  # damaged twice within a second
        attempt += 1
        kept = path.with_name(f"{path.name}.damaged-{stamp}-{attempt}")
    # Journal files first: if this stops half-way, the damaged file is still in place and the
    # next run sets it aside again, rather than the load deleting journal files left behind.
    for suffix in ("-wal", "-shm", "-journal", ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, kept.with_name(kept.name + suffix))
    print(
        f"warning: the dataset file {path} was damaged ({reason}), so it was kept as "
        f"{kept.name} and the dataset is being rebuilt; delete that copy when you no longer "
        "need it.",
        file=sys.stderr,
        flush=True,
    )
    return kept


def _is_current(manifest: dict | None, scale: Scale, seed: int) -> bool:
    return bool(
        manifest
        and manifest.get("seed") == seed
        and manifest.get("scale") == scale.name
        and manifest.get("schema_version") == SCHEMA_VERSION
    )


# ------------------------------------------------------------------------------------------------
# One loader at a time
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _dataset_lock(engine: Engine) -> Iterator[None]:
    """Hold the dataset behind ``engine`` (a SQLite file, a PostgreSQL schema) for one loader.

    Without it, two processes that both find no dataset both build it: on SQLite they write the
    same ``.loading`` file and one of them fails renaming it; on PostgreSQL they create the same
    staging schema. The lock is an ``flock`` on ``<data_dir>/.<namespace>.<backend>.lock``,
    which the kernel releases when its holder exits, even killed. The file is never deleted: a
    process still waiting on a deleted lock file would hold a lock nobody else sees.
    """
    backend = backend_of(engine)
    namespace = namespace_of(engine)
    with file_lock(data_dir() / f".{namespace}.{backend}.lock"):
        if backend == "postgres":
            with _advisory_lock(engine, f"perfcourse.seed:{namespace}"):
                yield
        else:
            yield


@contextlib.contextmanager
def _advisory_lock(engine: Engine, key: str) -> Iterator[None]:
    """Hold the PostgreSQL advisory lock named ``key`` (in this database) for the block.

    The file lock only orders processes sharing a data folder, but one server may serve several
    machines (a workshop's DATABASE_URL) or data folders (the tests), so PostgreSQL loads lock
    on the server too. It is taken after the file lock, always in that order, so processes of
    one machine queue without holding a server connection each.
    """
    lock = sa.text("select pg_advisory_lock(hashtextextended(:key, 0))")
    unlock = sa.text("select pg_advisory_unlock(hashtextextended(:key, 0))")
    with engine.connect() as conn:
        conn.execute(lock, {"key": key})
        conn.commit()  # the lock belongs to the session: no transaction stays open meanwhile
        try:
            yield
        finally:
            try:
                conn.execute(unlock, {"key": key})
                conn.commit()
            except sa.exc.DBAPIError:
                # A broken session has lost its locks already; closing it for good makes sure a
                # pooled connection never carries the lock on to its next user.
                conn.invalidate()


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------


def _ddl(dialect) -> tuple[list[str], list[str]]:
    """CREATE TABLE statements (no indexes) and CREATE INDEX statements, in load order."""
    tables, indexes = [], []
    for name in TABLES:
        table = Base.metadata.tables[name]
        tables.append(str(CreateTable(table).compile(dialect=dialect)))
        indexes += [str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes]
    return tables, indexes


def _progress(total: int, enabled: bool, label: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415 - slow import; the notebook flavour inside Jupyter

    return tqdm(total=total, unit=" rows", unit_scale=True, desc=label, leave=False)


def _rows_loaded(progress) -> None:
    """Every row is in: the bar's total becomes the real count.

    The total was an estimate (:func:`expected_rows`); a bar closed short of its total is drawn
    red in Jupyter, as if the load had failed. Only a load that stops early should end short.
    """
    if progress is not None:
        progress.total = progress.n
        progress.refresh()


def _load_sqlite(engine: Engine, scale: Scale, seed: int, progress) -> dict[str, int]:
    final = sqlite_path(namespace_of(engine))
    loading = final.with_name(final.name + ".loading")
    loading.unlink(missing_ok=True)
    table_ddl, index_ddl = _ddl(engine.dialect)
    counts = dict.fromkeys(TABLES, 0)
    started = time.perf_counter()
    with closing(sqlite3.connect(loading, isolation_level=None)) as conn:
        # Safe because the file is not the live dataset until it is renamed into place.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute("BEGIN")
        for statement in table_ddl:
            conn.execute(statement)
        for chunk in prefetch(generate(scale, seed)):
            placeholders = ", ".join("?" * len(chunk.columns))
            conn.executemany(
                f"INSERT INTO {chunk.table} ({', '.join(chunk.columns)}) VALUES ({placeholders})",
                chunk.rows(),
            )
            counts[chunk.table] += len(chunk)
            if progress:
                progress.update(len(chunk))
        _rows_loaded(progress)
        if progress:
            progress.set_description(f"indexing {scale.name} (sqlite)")
        for statement in index_ddl:
            conn.execute(statement)
        conn.execute("PRAGMA analysis_limit=1000")  # sampled statistics: enough for the planner
        conn.execute("ANALYZE")
        manifest = _manifest(scale, seed, counts, time.perf_counter() - started)
        conn.execute(f"CREATE TABLE {MANIFEST_TABLE} (body TEXT NOT NULL)")
        conn.execute(f"INSERT INTO {MANIFEST_TABLE} VALUES (?)", (json.dumps(manifest),))
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    engine.dispose()  # close pooled connections to the file being replaced
    for suffix in ("-wal", "-shm"):
        final.with_name(final.name + suffix).unlink(missing_ok=True)
    os.replace(loading, final)
    return counts


def _load_postgres(engine: Engine, scale: Scale, seed: int, progress) -> dict[str, int]:
    namespace = namespace_of(engine)
    staging = f"{namespace}__loading"
    table_ddl, index_ddl = _ddl(engine.dialect)
    counts = dict.fromkeys(TABLES, 0)
    started = time.perf_counter()
    with engine.connect() as conn:
        raw = conn.connection.driver_connection  # psycopg 3 connection, for COPY
        with conn.begin():
            conn.execute(sa.text(f'drop schema if exists "{staging}" cascade'))
            conn.execute(sa.text(f'create schema "{staging}"'))
            conn.execute(sa.text(f'set local search_path to "{staging}"'))
            for statement in table_ddl:
                conn.execute(sa.text(statement))
            with raw.cursor() as cursor:
                for chunk in prefetch(generate(scale, seed)):
                    sql = f"COPY {chunk.table} ({', '.join(chunk.columns)}) FROM STDIN"
                    with cursor.copy(sql) as copy:
                        for row in chunk.rows():
                            copy.write_row(row)
                    counts[chunk.table] += len(chunk)
                    if progress:
                        progress.update(len(chunk))
            # COPY wrote explicit ids: move each id sequence past them, or the next INSERT
            # without an id would collide with row 1.
            for table in TABLES:
                conn.execute(sa.text(
                    f"select setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"coalesce((select max(id) from {table}), 0) + 1, false)"
                ))
            _rows_loaded(progress)
            if progress:
                progress.set_description(f"indexing {scale.name} (postgres)")
            for statement in index_ddl:
                conn.execute(sa.text(statement))
            manifest = _manifest(scale, seed, counts, time.perf_counter() - started)
            conn.execute(sa.text(f"create table {MANIFEST_TABLE} (body text not null)"))
            conn.execute(
                sa.text(f"insert into {MANIFEST_TABLE} values (:body)"),
                {"body": json.dumps(manifest)},
            )
        # The swap: one short transaction, so readers see the old dataset or the new one.
        with conn.begin():
            conn.execute(sa.text(f'drop schema if exists "{namespace}" cascade'))
            conn.execute(sa.text(f'alter schema "{staging}" rename to "{namespace}"'))
        # Planner statistics from every row (up to 300 x the target rows per table), not from a
        # random sample: the same data then gives the same plans on every machine and run.
        conn.execute(sa.text("set default_statistics_target = 1000"))
        conn.execute(sa.text(f"analyze {', '.join(TABLES)}"))
        conn.execute(sa.text("reset default_statistics_target"))
        conn.commit()
    return counts


def seed_dataset(
    engine: Engine,
    scale: str | None = None,
    force: bool = False,
    *,
    seed: int = DATASET_SEED,
    progress: bool = True,
) -> dict[str, int]:
    """Load the shop dataset into the database behind ``engine``; return rows per table.

    Does nothing (and returns the recorded counts) when the manifest says the same seed, scale
    and schema version are already loaded, unless ``force``. ``engine`` comes from
    :func:`perfcourse.db.engine`; its namespace (file or schema) receives the data.

    Processes seeding the same dataset at once wait for each other, and one that waited returns
    the dataset the other built. A damaged SQLite file is kept aside (a one-line warning on
    stderr names the copy) and the dataset rebuilt.
    """
    scale_ = get_scale(scale or default_scale())
    # First without the lock: an up-to-date dataset is the common case (every notebook opens
    # with this call), and the swap is atomic, so a reader never sees a half-built dataset.
    seen = read_manifest(engine)
    if not force and _is_current(seen, scale_, seed):
        return dict(seen["counts"])
    with _dataset_lock(engine):
        # Again under the lock: another process may have built the dataset while this one
        # waited. Even with ``force`` that build is as fresh as the one asked for. A pooled
        # SQLite connection would still read the file that build replaced, so none is reused.
        if backend_of(engine) == "sqlite":
            engine.dispose()
        try:
            manifest = _read_manifest(engine)
        except _DamagedFileError as exc:
            _set_aside(engine, str(exc))
            manifest = None
        if _is_current(manifest, scale_, seed) and (not force or manifest != seen):
            return dict(manifest["counts"])
        label = f"seeding {scale_.name} ({backend_of(engine)})"
        bar = _progress(expected_rows(scale_), progress, label)
        try:
            if backend_of(engine) == "sqlite":
                return _load_sqlite(engine, scale_, seed, bar)
            return _load_postgres(engine, scale_, seed, bar)
        finally:
            if bar is not None:
                bar.close()


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per shop table, counted now (not read from the manifest)."""
    with engine.connect() as conn:
        return {
            name: conn.execute(sa.text(f"select count(*) from {name}")).scalar_one()
            for name in TABLES
        }
