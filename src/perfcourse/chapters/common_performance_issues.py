"""Chapter 09, common performance issues: the harness of its experiments and the detectors a
learner takes home.

Harness (what the lesson's experiments run on):

* :class:`Request`, :func:`fake_requests` - seeded simulated requests;
  :func:`memory_over_requests` runs a handler over them and records the traced memory
  (tracemalloc) every so many requests, the curve that tells a leak from a peak.
* :func:`fragmentation` - memory Python freed but the process keeps (RSS vs live blocks).
* :func:`leaky_app` - a WSGI app that leaks on purpose, for gunicorn's ``max_requests``.

Detectors (the tools a learner takes home; each tested):

* :class:`NPlusOneDetector` (also :func:`forbid_n_plus_one`, :func:`n_plus_one_middleware` and
  :func:`n_plus_one_fixture` for pytest) - counts statements per block, request or test, and
  fails with the offending SQL when one statement shape repeats (Rails' Bullet).
* :func:`find_missing_indexes` - runs EXPLAIN over the statements of a slow-query log and flags
  full scans of large tables.
* :func:`find_stale_entries` - compares cached values with the source of truth, after writes.
  :class:`DictCache` and :class:`RedisCache` are the two caches it reads.

The lab: :class:`LabService`, a small shop service with three planted issues (an N+1 page, a
missing index, a stale cache) drawn from a seed; :func:`current_lab` is the last one made.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, selectinload

from perfcourse.db import backend_of, drop_namespace
from perfcourse.explain import explain
from perfcourse.memory import process_rss
from perfcourse.models import Order, OrderItem, Product
from perfcourse.scratch import scratch_copy
from perfcourse.statements import QueryCounter, StatementRecord

__all__ = [
    "NAMESPACE",
    "DictCache",
    "LAB_LOOKUPS",
    "LAB_PAGES",
    "LAB_WRITES",
    "LabService",
    "NPlusOneDetector",
    "NPlusOneError",
    "RedisCache",
    "Request",
    "current_lab",
    "fake_requests",
    "find_missing_indexes",
    "find_stale_entries",
    "fingerprint",
    "forbid_n_plus_one",
    "fragmentation",
    "leaky_app",
    "memory_over_requests",
    "n_plus_one_fixture",
    "n_plus_one_middleware",
]

#: Redis keys of this chapter start with this (``ch09:...``); clean-up deletes them.
NAMESPACE = "ch09"


# --------------------------------------------------------------------------------------------
# Simulated requests and memory over many of them


@dataclass(frozen=True)
class Request:
    """One simulated request: an id, the user making it and the products it shows."""

    id: int
    user_id: int
    product_ids: tuple[int, ...]
    path: str


def fake_requests(n: int, *, seed: int = 9, start: int = 0, users: int = 10_000,
                  products: int = 2_000) -> Iterator[Request]:
    """``n`` seeded requests to product pages, numbered from ``start``: every request has its own
    id, so anything keyed by it grows with the traffic."""
    rng = random.Random(seed)
    for number in range(start, start + n):
        user_id = rng.randint(1, users)
        shown = tuple(rng.randint(1, products) for _ in range(rng.randint(1, 5)))
        yield Request(number, user_id, shown, f"/products/{shown[0]}")


def memory_over_requests(handle: Callable[[Request], Any], requests: int = 10_000, *,
                         every: int = 1_000, seed: int = 9, collect: bool = True) -> pd.DataFrame:
    """Call ``handle(request)`` for ``requests`` simulated requests, recording traced memory.

    Returns one row per checkpoint (every ``every`` requests, and before the first):
    ``requests`` served so far, ``traced_bytes`` (Python allocations still alive, relative to
    the start, from :mod:`tracemalloc`) and ``gc_objects`` (objects the collector tracks).
    With ``collect`` each checkpoint runs ``gc.collect()`` first, so garbage that only waits for
    the cycle collector is not counted as a leak. A flat curve after warm-up is healthy; a line
    that keeps rising is a leak. Tracing slows code down: never time inside this.
    """
    import tracemalloc  # noqa: PLC0415 - standard library, imported where it is used

    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    rows = []
    try:
        if collect:
            gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        rows.append({"requests": 0, "traced_bytes": 0, "gc_objects": len(gc.get_objects())})
        for request in fake_requests(requests, seed=seed):
            handle(request)
            served = request.id + 1
            if served % every == 0 or served == requests:
                if collect:
                    gc.collect()
                rows.append({"requests": served,
                             "traced_bytes": tracemalloc.get_traced_memory()[0] - base,
                             "gc_objects": len(gc.get_objects())})
    finally:
        if started_here:
            tracemalloc.stop()
    return pd.DataFrame(rows).drop_duplicates("requests").reset_index(drop=True)


def fragmentation(objects: int = 1_000_000, keep_every: int = 64) -> pd.DataFrame:
    """Allocate ``objects`` small objects, free all but one in ``keep_every``, then free the rest.

    Returns one row per stage with the process RSS and the number of memory blocks Python's
    allocator still hands out (``sys.getallocatedblocks``). After the first free, almost every
    block is gone but the RSS barely moves: each 1 MiB arena of Python's allocator still holds a
    few live objects, so none can be given back to the operating system. Only when the
    survivors go too does the RSS fall.
    """
    gc.collect()
    rows = [{"stage": "before", "rss_bytes": process_rss(), "live_blocks": sys.getallocatedblocks()}]
    data = [(i, str(i)) for i in range(objects)]
    rows.append({"stage": f"{objects:,} small objects", "rss_bytes": process_rss(),
                 "live_blocks": sys.getallocatedblocks()})
    survivors = data[::keep_every]
    del data
    gc.collect()
    rows.append({"stage": f"all but 1 in {keep_every} freed", "rss_bytes": process_rss(),
                 "live_blocks": sys.getallocatedblocks()})
    del survivors
    gc.collect()
    rows.append({"stage": "all freed", "rss_bytes": process_rss(), "live_blocks": sys.getallocatedblocks()})
    return pd.DataFrame(rows)


_LEAKED: list[bytes] = []


def leaky_app(environ, start_response):
    """A WSGI app that leaks 500 KB per request into a module-level list (on purpose).

    ``/health`` answers 200; every other path leaks and answers JSON with the worker's pid, how
    many requests it has leaked and its RSS. Served by gunicorn with ``max_requests`` the
    worker is replaced every so many requests and the leak starts again from zero.
    """
    path = environ.get("PATH_INFO", "/")
    headers = [("Content-Type", "application/json"), ("X-Worker-Pid", str(os.getpid()))]
    if path == "/health":
        start_response("200 OK", headers)
        return [b'{"ok": true}']
    _LEAKED.append(b"x" * 500_000)  # written bytes: zero pages from calloc would not count in RSS
    body = json.dumps({"pid": os.getpid(), "leaked": len(_LEAKED), "rss_bytes": process_rss()})
    start_response("200 OK", headers)
    return [body.encode()]


# --------------------------------------------------------------------------------------------
# Detector 1: N+1


def fingerprint(sql: str) -> str:
    """The shape of a statement: literals and parameters as ``?``, spaces and case normalised.

    Two statements with the same fingerprint differ only by their values: an N+1 is one
    fingerprint sent many times.
    """
    text = str(sql).lower()
    text = re.sub(r"'(?:[^']|'')*'", "?", text)
    text = re.sub(r"%\(\w+\)s|:\w+|\$\d+|%s", "?", text)
    text = re.sub(r"\b\d+(?:\.\d+)?\b", "?", text)
    text = re.sub(r"\(\s*\?(?:\s*,\s*\?)*\s*\)", "(?)", text)
    text = re.sub(r"\s*/\*.*?\*/\s*", " ", text)
    return " ".join(text.split())


class NPlusOneError(AssertionError):
    """A statement shape ran more often than allowed in one block: the N+1 pattern.

    An ``AssertionError``, so a test that trips it fails as a test failure, with the SQL.
    """


class NPlusOneDetector(QueryCounter):
    """Count the statements of a block and fail when one shape repeats (Rails' Bullet).

    >>> with NPlusOneDetector(engine, max_repeats=1):
    ...     render_page(session)           # raises NPlusOneError naming the repeated SQL

    ``max_repeats``: how many times one fingerprint may run in the block (default 3: a page
    that looks two or three things up by id is not an N+1; lower it in tests, where the fixture
    data is small and an N+1 over two rows is still an N+1). ``max_statements``: an optional
    cap on all statements. ``ignore``: regular expressions; statements matching one are not
    counted (``SAVEPOINT``, a health check). Only ``kinds`` are counted (default: SELECT).
    ``raise_on_exit=False`` records ``.offenders`` instead of raising. The detector watches the
    engine it is given: attach it to the engine the code under test uses.
    """

    def __init__(self, engine: Engine, *, max_repeats: int = 3, max_statements: int | None = None,
                 ignore: Iterable[str] = (), kinds: Iterable[str] = ("SELECT",),
                 raise_on_exit: bool = True) -> None:
        super().__init__(engine)
        if max_repeats < 1:
            raise ValueError("max_repeats must be at least 1 (one run of a statement is never an N+1).")
        self.max_repeats = max_repeats
        self.max_statements = max_statements
        self.ignore = [re.compile(p, re.I) for p in ignore]
        self.kinds = {k.upper() for k in kinds}
        self.raise_on_exit = raise_on_exit
        self.offenders: list[tuple[str, int, str]] = []

    def _started(self, record: StatementRecord) -> None:
        if record.kind in self.kinds and not any(p.search(record.sql) for p in self.ignore):
            self.statements.append(record)

    def repeats(self) -> pd.DataFrame:
        """One row per fingerprint seen: ``fingerprint, runs, example`` (most runs first)."""
        counts = Counter(fingerprint(r.sql) for r in self.statements)
        examples: dict[str, str] = {}
        for r in self.statements:
            examples.setdefault(fingerprint(r.sql), " ".join(r.sql.split()))
        rows = [{"fingerprint": fp, "runs": n, "example": examples[fp]} for fp, n in counts.most_common()]
        return pd.DataFrame(rows, columns=["fingerprint", "runs", "example"])

    def verdict(self) -> str | None:
        """The failure message, or None when the block was fine. Fills ``.offenders``."""
        table = self.repeats()
        self.offenders = [(row.fingerprint, int(row.runs), row.example)
                          for row in table.itertuples() if row.runs > self.max_repeats]
        problems = []
        for _fp, runs, example in self.offenders:
            problems.append(f"N+1: the same statement ran {runs} times (at most {self.max_repeats} "
                            f"allowed):\n    {example[:300]}")
        if self.max_statements is not None and self.count > self.max_statements:
            problems.append(f"{self.count} statements ran, at most {self.max_statements} allowed.")
        if not problems:
            return None
        return "\n".join(problems) + "\nLoad the relation eagerly (selectinload/joinedload) or in one query."

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        message = self.verdict()
        if message and self.raise_on_exit and exc_type is None:
            raise NPlusOneError(message)

    def __repr__(self) -> str:
        return f"<NPlusOneDetector: {self.count} statements, max_repeats={self.max_repeats}>"


def forbid_n_plus_one(engine: Engine, **settings) -> NPlusOneDetector:
    """``with forbid_n_plus_one(engine, max_repeats=1): ...`` - a :class:`NPlusOneDetector`."""
    return NPlusOneDetector(engine, **settings)


def n_plus_one_middleware(app, engine: Engine, *, on_detect: Callable[[str, str], Any] | None = None,
                          **settings):
    """WSGI middleware: one :class:`NPlusOneDetector` per request (Bullet in development).

    It never breaks a response: when a request trips the detector, ``on_detect(path, message)``
    is called (default: a warning on the ``perfcourse.n_plus_one`` logger). Requests must be
    served one at a time for the counts to be per request (the detector counts the engine).
    """
    import logging  # noqa: PLC0415 - standard library, imported where it is used

    log = logging.getLogger("perfcourse.n_plus_one")
    report = on_detect or (lambda path, message: log.warning("%s\n%s", path, message))

    def detected(environ, start_response):
        detector = NPlusOneDetector(engine, raise_on_exit=False, **settings).start()
        body = None
        try:
            body = app(environ, start_response)
            yield from body
        finally:
            if hasattr(body, "close"):
                body.close()
            detector.stop()
            message = detector.verdict()
            if message:
                report(environ.get("PATH_INFO", ""), message)
    return detected


def n_plus_one_fixture(engine_fixture: str = "engine", **settings):
    """A pytest fixture that fails any test using it whose statements show an N+1.

    In ``conftest.py``::

        no_n_plus_one = n_plus_one_fixture("engine", max_repeats=1)

    then ``def test_page(no_n_plus_one, engine): ...``. The detector watches the engine the
    fixture named ``engine_fixture`` returns, for the whole test, and fails it (at teardown)
    with the repeated SQL. The fixture's value is the detector (``.count``, ``.repeats()``).
    """
    import pytest  # noqa: PLC0415 - only tests need pytest

    @pytest.fixture
    def _no_n_plus_one(request):
        engine = request.getfixturevalue(engine_fixture)
        with NPlusOneDetector(engine, **settings) as detector:
            yield detector

    return _no_n_plus_one


# --------------------------------------------------------------------------------------------
# Detector 2: missing indexes


def _as_text_statement(record: Any) -> tuple[str, Any]:
    """SQL and parameters of a log entry (a StatementRecord, a (sql, params) pair or a string)."""
    if isinstance(record, StatementRecord):
        return record.sql, record.parameters
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return str(record[0]), record[1]
    return str(record), None


def _bindable(sql: str, parameters: Any) -> tuple[str, dict]:
    """Driver SQL (``?`` or ``%(name)s`` placeholders) as SQLAlchemy text with ``:name``."""
    if isinstance(parameters, dict):
        text = re.sub(r"%\((\w+)\)s", r":\1", sql).replace("%%", "%")
        return text, dict(parameters)
    values = list(parameters or ())
    names = iter(range(len(values)))
    text = re.sub(r"\?", lambda _m: f":p{next(names)}", sql)
    return text, {f"p{i}": v for i, v in enumerate(values)}


def find_missing_indexes(engine: Engine, statements: Iterable[Any], *,
                         min_rows: int = 1_000) -> pd.DataFrame:
    """EXPLAIN each statement shape of a slow-query log; flag full scans of large tables.

    ``statements``: what :func:`perfcourse.statements.slow_query_log` kept (``log.slow``), or
    ``(sql, parameters)`` pairs, or SQL strings. Each fingerprint is explained once, with the
    parameters of its first run, on ``engine``. A table read in full with at least ``min_rows``
    rows is flagged: a small table is cheaper to scan than to index. Returns one row per flagged
    (fingerprint, table): ``table, rows, calls, total_s, plan, sql``, most total time first.
    """
    grouped: dict[str, dict] = {}
    for record in statements:
        sql, params = _as_text_statement(record)
        if not re.match(r"\s*(?:with|select)\b", sql, re.I):
            continue
        entry = grouped.setdefault(fingerprint(sql), {"sql": sql, "params": params, "calls": 0, "total_s": 0.0})
        entry["calls"] += 1
        entry["total_s"] += getattr(record, "duration_s", None) or 0.0
    sizes: dict[str, int] = {}
    rows = []
    for entry in grouped.values():
        text, params = _bindable(entry["sql"], entry["params"])
        try:
            plan = explain(engine, text, params)
        except sa.exc.SQLAlchemyError:
            continue  # a statement that cannot be explained (DDL, a temp table gone): skip it
        for table in dict.fromkeys(plan.scanned_tables):
            name = table.strip('"')
            if name not in sizes:
                with engine.connect() as conn:
                    try:
                        sizes[name] = conn.exec_driver_sql(f'SELECT count(*) FROM "{name}"').scalar_one()
                    except sa.exc.SQLAlchemyError:
                        sizes[name] = 0  # an alias or a CTE, not a table
            if sizes[name] >= min_rows:
                rows.append({"table": name, "rows": sizes[name], "calls": entry["calls"],
                             "total_s": entry["total_s"], "plan": plan.summary(),
                             "sql": " ".join(entry["sql"].split())})
    table = pd.DataFrame(rows, columns=["table", "rows", "calls", "total_s", "plan", "sql"])
    return table.sort_values(["total_s", "calls"], ascending=False).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Detector 3: stale caches


class DictCache:
    """An in-process cache with the interface :func:`find_stale_entries` reads.

    ``get(key)`` (None on a miss), ``set(key, value)``, ``delete(*keys)``, ``keys()``; values are
    stored as JSON text, as Redis would, so a cached value is a copy, never a live object.
    ``hits``, ``misses`` and ``deleted`` count what happened.
    """

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self.hits = self.misses = self.deleted = 0

    def get(self, key: str):
        raw = self._data.get(key)
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(raw)

    def set(self, key: str, value) -> None:
        self._data[key] = json.dumps(value, default=str)

    def delete(self, *keys: str) -> int:
        gone = sum(1 for k in keys if self._data.pop(k, None) is not None)
        self.deleted += gone
        return gone

    def keys(self) -> list[str]:
        return sorted(self._data)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class RedisCache(DictCache):
    """The same interface on Redis, every key under ``prefix`` (e.g. ``ch09:lesson:``).

    ``keys()`` uses SCAN (never KEYS) over the prefix; ``clear()`` deletes them all. Keys are
    given and returned without the prefix.
    """

    def __init__(self, client, prefix: str, ttl_s: int | None = None) -> None:
        super().__init__()
        if not prefix.startswith(NAMESPACE):
            raise ValueError(f"Keys of this chapter start with {NAMESPACE!r}, not {prefix!r}.")
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    def get(self, key: str):
        raw = self.client.get(self.prefix + key)
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(raw)

    def set(self, key: str, value) -> None:
        self.client.set(self.prefix + key, json.dumps(value, default=str), ex=self.ttl_s)

    def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        gone = int(self.client.delete(*(self.prefix + k for k in keys)))
        self.deleted += gone
        return gone

    def keys(self) -> list[str]:
        found = self.client.scan_iter(match=self.prefix + "*", count=500)
        return sorted(k.decode()[len(self.prefix):] if isinstance(k, bytes) else k[len(self.prefix):]
                      for k in found)

    def clear(self) -> None:
        keys = list(self.client.scan_iter(match=self.prefix + "*", count=500))
        for start in range(0, len(keys), 500):
            self.client.delete(*keys[start:start + 500])

    def __len__(self) -> int:
        return len(self.keys())


def _normal(value):
    return json.loads(json.dumps(value, default=str))


def find_stale_entries(cache, recompute: Callable[[str], Any], keys: Iterable[str] | None = None) -> pd.DataFrame:
    """Compare each cached value with the source of truth; return the ones that differ.

    ``cache`` has ``get``/``keys`` (:class:`DictCache`, :class:`RedisCache`); ``recompute(key)``
    computes the value from the database as the cache-aside read would on a miss. ``keys``
    defaults to every key in the cache. Run it after writes: a key listed here is one the
    writes should have invalidated. Returns ``key, cached, fresh`` per stale entry.
    """
    rows = []
    for key in list(cache.keys() if keys is None else keys):
        cached = cache.get(key)
        if cached is None:
            continue
        fresh = _normal(recompute(key))
        if _normal(cached) != fresh:
            rows.append({"key": key, "cached": cached, "fresh": fresh})
    return pd.DataFrame(rows, columns=["key", "cached", "fresh"])


# --------------------------------------------------------------------------------------------
# The lab: a service with three planted issues


def _money(value) -> str:
    return f"{value:.2f}"


# The three pages; the seed makes one of them lazy (the N+1), the others load eagerly.
def _user_orders_lazy(session: Session, user_id: int) -> list:
    orders = session.scalars(_select_orders_of(user_id)).all()
    return [[o.id, o.status, _money(o.total), sum(i.quantity for i in o.items)] for o in orders]


def _user_orders_eager(session: Session, user_id: int) -> list:
    orders = session.scalars(_select_orders_of(user_id).options(selectinload(Order.items))).all()
    return [[o.id, o.status, _money(o.total), sum(i.quantity for i in o.items)] for o in orders]


def _select_orders_of(user_id: int):
    return sa.select(Order).where(Order.user_id == user_id).order_by(Order.id)


def _order_detail_lazy(session: Session, order_id: int) -> list:
    items = session.scalars(sa.select(OrderItem).where(OrderItem.order_id == order_id).order_by(OrderItem.id)).all()
    return [[i.product.name, i.quantity, _money(i.unit_price)] for i in items]


def _order_detail_eager(session: Session, order_id: int) -> list:
    items = session.scalars(sa.select(OrderItem).where(OrderItem.order_id == order_id)
                            .options(selectinload(OrderItem.product)).order_by(OrderItem.id)).all()
    return [[i.product.name, i.quantity, _money(i.unit_price)] for i in items]


def _category_products_lazy(session: Session, category_id: int) -> list:
    products = session.scalars(sa.select(Product).where(Product.category_id == category_id)
                               .order_by(Product.id).limit(12)).all()
    return [[p.id, p.name, _money(p.price), len(p.order_items)] for p in products]


def _category_products_eager(session: Session, category_id: int) -> list:
    products = session.scalars(sa.select(Product).where(Product.category_id == category_id)
                               .order_by(Product.id).limit(12)).all()
    counts = dict(session.execute(
        sa.select(OrderItem.product_id, sa.func.count())
        .where(OrderItem.product_id.in_([p.id for p in products])).group_by(OrderItem.product_id)).all())
    return [[p.id, p.name, _money(p.price), counts.get(p.id, 0)] for p in products]


#: The lab's pages: route -> (lazy loader, eager loader). One is served lazily: the N+1.
LAB_PAGES = {
    "/users/<id>/orders": (_user_orders_lazy, _user_orders_eager),
    "/orders/<id>": (_order_detail_lazy, _order_detail_eager),
    "/categories/<id>/products": (_category_products_lazy, _category_products_eager),
}

#: The lab's lookups: route -> (SQL, the index the service creates for it). One index is missing.
LAB_LOOKUPS = {
    "/users/by-email": ("SELECT id, first_name, last_name FROM users WHERE email = :email",
                        "CREATE INDEX ix_lab_users_email ON users (email)"),
    "/orders/recent": ("SELECT id, total FROM orders WHERE status = :status AND created_at >= :since "
                       "ORDER BY created_at LIMIT 20",
                       "CREATE INDEX ix_lab_orders_status_created ON orders (status, created_at)"),
    "/users/by-name": ("SELECT id, email FROM users WHERE last_name = :last AND first_name = :first",
                       "CREATE INDEX ix_lab_users_name ON users (last_name, first_name)"),
}

#: The lab's writes and the cached entries each one changes.
LAB_WRITES = ("place_order", "change_price", "rename_category")

_lab_state: dict[str, LabService] = {}


def current_lab() -> LabService | None:
    """The :class:`LabService` made last in this kernel (None before the lab's setup cell)."""
    return _lab_state.get("current")


@dataclass
class _Plant:
    n_plus_one: str
    missing_index: str
    stale_write: str


class LabService:
    """A small shop service with three planted issues, drawn from ``seed``.

    Pages (``handle(path)``): a user's orders, an order's items, a category's products, three
    lookups (by email, recent orders by status, by name), a user's summary and a product's card,
    the last two cached (cache-aside). Writes: :meth:`place_order`, :meth:`change_price`,
    :meth:`rename_category`, each deleting the cache keys it makes stale, then whatever
    ``extra_invalidation(event)`` returns.

    Planted: one page is an N+1, one lookup has no index, one write forgets a cache key. Which
    ones depends on ``seed`` (default: random, unseen). ``engine`` is the course dataset: the
    service works on a scratch copy of it (``copy=True``) since its writes change rows;
    :meth:`close` drops the copy and the cache. ``cache`` defaults to a :class:`DictCache`.
    ``issues`` overrides the seed's choice (tests and grading); ``current=False`` keeps the
    service from becoming :func:`current_lab`.
    """

    def __init__(self, engine: Engine, *, seed: int | None = None, cache=None, copy: bool = True,
                 issues: dict | None = None, current: bool = True) -> None:
        rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(4), "big"))
        self._plant = _Plant(rng.choice(list(LAB_PAGES)), rng.choice(list(LAB_LOOKUPS)), rng.choice(LAB_WRITES))
        for name, value in (issues or {}).items():
            setattr(self._plant, name, value)
        self.engine = scratch_copy(engine, f"{NAMESPACE}_lab") if copy else engine
        self._copied = copy
        self.cache = cache if cache is not None else DictCache()
        self.extra_invalidation: Callable[[dict], Iterable[str]] | None = None
        self.loaders = {route: (lazy if route == self._plant.n_plus_one else eager)
                        for route, (lazy, eager) in LAB_PAGES.items()}
        with self.engine.begin() as conn:
            for route, (_sql, ddl) in LAB_LOOKUPS.items():
                if route != self._plant.missing_index:
                    conn.exec_driver_sql(ddl)
            self._sizes = {t: conn.exec_driver_sql(f"SELECT max(id) FROM {t}").scalar_one()
                           for t in ("users", "orders", "products", "categories")}
        if current:
            _lab_state["current"] = self

    # -- reading ----------------------------------------------------------------------------
    @property
    def routes(self) -> list[str]:
        return [*LAB_PAGES, *LAB_LOOKUPS, "/users/<id>/summary", "/products/<id>"]

    def paths(self, n: int = 60, seed: int = 0) -> list[str]:
        """A seeded mix of ``n`` paths over every route."""
        rng = random.Random(seed)
        with self.engine.connect() as conn:
            emails = [r[0] for r in conn.exec_driver_sql("SELECT email FROM users WHERE id % 97 = 1 ORDER BY id")]
            names = [f"{r[0]}/{r[1]}" for r in
                     conn.exec_driver_sql("SELECT last_name, first_name FROM users WHERE id % 89 = 1 ORDER BY id")]
        out = []
        for number in range(n):
            route = self.routes[number % len(self.routes)]
            if route == "/users/by-email":
                out.append(f"/users/by-email?email={rng.choice(emails)}")
            elif route == "/orders/recent":
                out.append(f"/orders/recent?status={rng.choice(['paid', 'shipped', 'pending'])}"
                           f"&since=2024-0{rng.randint(1, 9)}-01")
            elif route == "/users/by-name":
                out.append(f"/users/by-name?name={rng.choice(names)}")
            else:
                table = {"users": "users", "orders": "orders", "categories": "categories",
                         "products": "products"}[route.split("/")[1]]
                out.append(route.replace("<id>", str(rng.randint(1, self._sizes[table]))))
        return out

    def handle(self, path: str):
        """Serve one path; return plain data (what the page would render as JSON)."""
        route, _, query = path.partition("?")
        params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        parts = route.strip("/").split("/")
        if route in LAB_LOOKUPS:
            sql = LAB_LOOKUPS[route][0]
            if route == "/users/by-name":
                last, _, first = params.get("name", "/").partition("/")
                params = {"last": last, "first": first}
            with self.engine.connect() as conn:
                return [list(row) for row in conn.execute(sa.text(sql), params)]
        if len(parts) == 3 and parts[0] == "users" and parts[2] == "summary":
            return self.read(f"user:{int(parts[1])}:summary")
        if len(parts) == 2 and parts[0] == "products":
            return self.read(f"product:{int(parts[1])}:card")
        template = "/" + "/".join("<id>" if p.isdigit() else p for p in parts)
        if template in self.loaders:
            with Session(self.engine) as session:
                return self.loaders[template](session, int(next(p for p in parts if p.isdigit())))
        raise KeyError(f"No route for {path!r}: the routes are {', '.join(self.routes)}.")

    def recompute(self, key: str):
        """The value of a cache key computed from the database (what a miss would store)."""
        kind, ident, _what = key.split(":")
        with self.engine.connect() as conn:
            if kind == "user":
                count, spent = conn.execute(sa.text(
                    "SELECT count(*), coalesce(sum(total), 0) FROM orders WHERE user_id = :id"),
                    {"id": int(ident)}).one()
                return {"orders": int(count), "spent": _money(spent)}
            row = conn.execute(sa.text(
                "SELECT p.name, p.price, c.name FROM products p JOIN categories c ON c.id = p.category_id "
                "WHERE p.id = :id"), {"id": int(ident)}).one()
            return {"name": row[0], "price": _money(row[1]), "category": row[2]}

    def read(self, key: str):
        """Cache-aside: the cached value, or the recomputed one (then cached)."""
        value = self.cache.get(key)
        if value is None:
            value = _normal(self.recompute(key))
            self.cache.set(key, value)
        return value

    # -- writing ----------------------------------------------------------------------------
    def _after_write(self, event: dict, own: list[str]) -> None:
        if event["kind"] == self._plant.stale_write:
            own = [k for k in own if k not in self._forgotten(event)]
        extra = self.extra_invalidation(dict(event)) if self.extra_invalidation else None
        if isinstance(extra, str) or not isinstance(extra, (list, tuple, set, frozenset, type(None))):
            raise TypeError("extra_invalidation must return a list of cache keys (strings), not a "
                            f"{type(extra).__name__}")
        extra = [k for k in (extra or ()) if isinstance(k, str)]
        keys = list(dict.fromkeys([*own, *extra]))
        if keys:
            self.cache.delete(*keys)

    @staticmethod
    def _forgotten(event: dict) -> list[str]:
        if event["kind"] == "place_order":
            return [f"user:{event['user_id']}:summary"]
        if event["kind"] == "change_price":
            return [f"product:{event['product_id']}:card"]
        return [f"product:{pid}:card" for pid in event["product_ids"]]

    def place_order(self, user_id: int, product_id: int, quantity: int = 1) -> int:
        """Insert an order of one product for a user; returns the order id.

        Event: ``{"kind": "place_order", "user_id", "product_id", "order_id"}``.
        """
        with self.engine.begin() as conn:
            price = conn.execute(sa.text("SELECT price FROM products WHERE id = :id"), {"id": product_id}).scalar_one()
            order_id = conn.execute(sa.text("SELECT coalesce(max(id), 0) + 1 FROM orders")).scalar_one()
            conn.execute(sa.text("INSERT INTO orders (id, user_id, status, total, created_at) "
                                 "VALUES (:id, :user, 'paid', :total, :at)"),
                         {"id": order_id, "user": user_id, "total": price * quantity,
                          "at": time.strftime("%Y-%m-%d %H:%M:%S")})
            item_id = conn.execute(sa.text("SELECT coalesce(max(id), 0) + 1 FROM order_items")).scalar_one()
            conn.execute(sa.text("INSERT INTO order_items (id, order_id, product_id, quantity, unit_price) "
                                 "VALUES (:id, :order, :product, :q, :price)"),
                         {"id": item_id, "order": order_id, "product": product_id, "q": quantity, "price": price})
        event = {"kind": "place_order", "user_id": user_id, "product_id": product_id, "order_id": order_id}
        self._after_write(event, [f"user:{user_id}:summary"])
        return order_id

    def change_price(self, product_id: int, price: float) -> None:
        """Set a product's price. Event: ``{"kind": "change_price", "product_id", "price"}``."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("UPDATE products SET price = :p WHERE id = :id"), {"p": price, "id": product_id})
        event = {"kind": "change_price", "product_id": product_id, "price": price}
        self._after_write(event, [f"product:{product_id}:card"])

    def rename_category(self, category_id: int, name: str) -> None:
        """Rename a category. Event: ``{"kind": "rename_category", "category_id", "name",
        "product_ids"}`` (the products of that category)."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("UPDATE categories SET name = :n WHERE id = :id"), {"n": name, "id": category_id})
            product_ids = [r[0] for r in conn.execute(
                sa.text("SELECT id FROM products WHERE category_id = :id ORDER BY id"), {"id": category_id})]
        event = {"kind": "rename_category", "category_id": category_id, "name": name, "product_ids": product_ids}
        self._after_write(event, [f"product:{pid}:card" for pid in product_ids])

    # -- grading and clean-up -----------------------------------------------------------------
    def _grading_key(self) -> dict:
        """The planted issues, for the grader. Calling it gives the lab's answers away; the
        underscore keeps it out of a learner's tab completion."""
        return {"n_plus_one": self._plant.n_plus_one, "missing_index": self._plant.missing_index,
                "missing_index_sql": LAB_LOOKUPS[self._plant.missing_index][0],
                "stale_write": self._plant.stale_write}

    def close(self) -> None:
        """Dispose of the engine, drop the scratch copy, empty the cache."""
        self.cache.clear()
        self.engine.dispose()
        if self._copied:
            drop_namespace(backend_of(self.engine), f"{NAMESPACE}_lab")

    def __repr__(self) -> str:
        return f"<LabService: {len(self.routes)} routes, 3 planted issues>"
